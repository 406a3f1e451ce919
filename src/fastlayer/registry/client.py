"""The HTTP side of the OCI distribution protocol, over `requests`.

One `Registry` per host: a pooled requests Session per thread (Sessions
are not thread-safe), credentials from auth.py, and bearer tokens shared
by all threads, kept per scope. A request that meets 401 answers the challenge once (basic, or a
token from the realm for the challenge's scope) and is sent again; request
bodies are files that can be rewound, or bytes. Every failure becomes one
FastlayerError line naming the registry, the repository and what was asked.

What a registry sends is untrusted (DESIGN.md section 9):

- Credentials are bound to the registry's origin (scheme, host, port):
  redirects are followed here, not by requests, and a hop to another
  origin (a CDN, an upload `Location` elsewhere) carries no Authorization.
  Basic credentials are sent only once the registry asked for them. A
  bearer challenge's realm gets the basic credentials, as Docker's token
  flow defines (the token service is usually another host), but only from
  the registry's own challenge, and only over HTTPS unless the user chose
  plain HTTP (--insecure); a redirect from the realm gets none. A move from
  HTTPS to plain HTTP is refused. ~/.netrc is not read.
- Deadlines: every request has connect and read timeouts (the read timeout
  is the stall limit: no byte for that long is an error), and an overall
  deadline: a watchdog shuts every socket of the registry when it passes,
  so a server trickling headers or a body 1 byte/s ends too. urllib3 sends
  a request body under the connect timeout, so that is the stall limit too
  (at most CONNECT), and bodies go in SEND_BLOCK pieces: a registry that
  takes no byte of an upload for that long ends it as a stall.
- Server text in messages is shortened, control characters escaped, and
  anything that looks like a credential masked (`server_text`).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import re
import socket
import threading
import time
import weakref
import zlib
from collections.abc import Iterator
from typing import BinaryIO
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from fastlayer import untrusted
from fastlayer.errors import FastlayerError
from fastlayer.registry.auth import Credentials, find_credentials, parse_challenge

CONNECT = 30.0  # seconds to open a connection (at most: never past the stall limit)
STALL = 60.0  # seconds without a byte before a transfer counts as stalled
DEADLINE = 3600.0  # the default overall limit of one pull or push (0: none)
USER_AGENT = "fastlayer"
MAX_REDIRECTS = 5
MAX_TOKEN_RESPONSE = 1 << 20
MESSAGE = 200  # characters of server text shown in a message
CHUNK = 1 << 20
# A request body goes out in sendall() calls of this size, each of which must end
# within the stall limit (Python bounds a whole sendall): 64 KiB in 60 s is ~1 KiB/s.
SEND_BLOCK = 64 << 10
_REDIRECTS = (301, 302, 303, 307, 308)
_TOKEN = re.compile(r"[!-~]{1,65536}")  # visible ASCII: it goes into a header


class RegistryError(FastlayerError):
    """The registry answered with an unexpected status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


# -- deadlines ------------------------------------------------------------------------


class Deadline:
    """The overall limit and stall limit of one registry conversation.

    A watchdog thread shuts every socket opened for it once the overall
    limit passes, which ends reads that the per-read timeout cannot (a byte
    every second resets it)."""

    def __init__(self, registry: str, timeout: float | None, stall: float | None):
        self.registry = registry
        self.timeout = timeout or None
        self.stall = stall or None
        self.end = time.monotonic() + timeout if timeout else None
        self.expired = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sockets: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        if self.end is not None:
            threading.Thread(target=self._watch, daemon=True, name="fastlayer-deadline").start()

    def remaining(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()

    def check(self, what: str) -> None:
        left = self.remaining()
        if self.expired.is_set() or (left is not None and left <= 0):
            raise self.error(what)

    def connect_timeout(self) -> float:
        """Seconds to connect, and (urllib3 2) to hand each piece of a body over."""
        return min(CONNECT, self.stall or CONNECT)

    def timeouts(self, what: str) -> tuple[float, float | None]:
        """(connect, read) for a request: never past the overall deadline."""
        self.check(what)
        left = self.remaining()
        reads = [x for x in (self.stall, left) if x is not None]
        return min(self.connect_timeout(), left or CONNECT), min(reads) if reads else None

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
        if self.expired.is_set():
            _shut(sock)

    def close(self) -> None:
        self._stop.set()

    def error(self, what: str) -> FastlayerError:
        return FastlayerError(
            f"registry {self.registry}: {what} did not finish within the {self.timeout:g} s "
            "deadline (--timeout)"
        )

    def failure(self, what: str, e: BaseException, sending: bool = False) -> FastlayerError:
        """The one-line error for a transfer that broke: deadline, stall or network.
        sending: the request had a body, which may be what stalled."""
        if self.expired.is_set():
            return self.error(what)
        if _is_timeout(e) and self.stall is not None:
            if isinstance(e, requests.exceptions.ConnectTimeout):
                return FastlayerError(
                    f"registry {self.registry}: no connection within "
                    f"{self.connect_timeout():g} s for {what}"
                )
            moved = " sent or received" if sending else ""
            return FastlayerError(
                f"registry {self.registry}: {what} stalled: no data{moved} for {self.stall:g} s "
                "(--stall-timeout)"
            )
        return FastlayerError(f"registry {self.registry} unreachable during {what}: {_reason(e)}")

    def _watch(self) -> None:
        assert self.end is not None
        if self._stop.wait(max(0.0, self.end - time.monotonic())):
            return
        self.expired.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """End every read and write on sock now, from any thread."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed, or detached by the TLS wrapper (its twin is tracked too)


_TIMEOUTS = (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)


def _is_timeout(e: BaseException) -> bool:
    """Whether a timeout is anywhere in e's chain (requests wraps urllib3 wraps socket)."""
    todo: list[object] = [e]
    seen: set[int] = set()
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, urllib3.exceptions.NewConnectionError):
            continue  # urllib3 2 makes "connection refused" a ConnectTimeoutError too
        if isinstance(x, _TIMEOUTS):
            return True
        todo += [x.__cause__, x.__context__, getattr(x, "reason", None), *x.args[:1]]
    return False


def _tracked_pools(deadline: Deadline) -> dict[str, type]:
    """urllib3 pool classes whose connections register their sockets with deadline."""

    def conn_class(base: type) -> type:
        class Tracked(base):  # type: ignore[valid-type, misc]
            def _new_conn(self):  # the plain socket, tracked before any TLS handshake
                sock = super()._new_conn()
                deadline.track(sock)
                return sock

            def connect(self) -> None:
                super().connect()
                if self.sock is not None:
                    deadline.track(self.sock)  # the TLS socket that replaced it

        return Tracked

    http_conn = conn_class(urllib3.connection.HTTPConnection)
    https_conn = conn_class(urllib3.connection.HTTPSConnection)
    pool = urllib3.connectionpool
    return {
        "http": type("TrackedPool", (pool.HTTPConnectionPool,), {"ConnectionCls": http_conn}),
        "https": type("TrackedTLSPool", (pool.HTTPSConnectionPool,), {"ConnectionCls": https_conn}),
    }


class _Adapter(HTTPAdapter):
    def __init__(self, deadline: Deadline, **kw: int):
        self._pools = _tracked_pools(deadline)  # before super().__init__, which builds the manager
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw) -> None:
        super().init_poolmanager(*args, **{**kw, "blocksize": SEND_BLOCK})
        self.poolmanager.pool_classes_by_scheme = dict(self._pools)

    def proxy_manager_for(self, proxy: str, **kw):
        fresh = proxy not in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **{**kw, "blocksize": SEND_BLOCK})
        if fresh:
            manager.pool_classes_by_scheme = dict(self._pools)
        return manager


def _no_netrc(r: requests.PreparedRequest) -> requests.PreparedRequest:
    """A session-wide auth that adds nothing: it keeps requests from reading ~/.netrc."""
    return r


# -- the registry ---------------------------------------------------------------------


# Headers describing a request body: dropped when a 303 turns the request into a GET.
_BODY = ("content-length", "content-type", "content-range", "content-encoding")


class Registry:
    def __init__(
        self, registry: str, api_host: str, insecure: bool = False, pool: int = 8,
        timeout: float | None = DEADLINE, stall: float | None = STALL,
    ):  # fmt: skip
        self.registry = registry  # as the user wrote it, for messages and credentials
        self.base = f"{'http' if insecure else 'https'}://{api_host}"
        self.insecure = insecure
        self.origin = _origin(self.base)
        self.deadline = Deadline(registry, timeout, stall)
        self._lock = threading.Lock()
        self._pool = pool
        self._local = threading.local()  # a Session per thread: Sessions are not thread-safe
        self._sessions: list[requests.Session] = []
        self.credentials: Credentials | None = find_credentials(registry)
        self._tokens: dict[str, str] = {}  # our scope -> bearer token
        self._basic = False  # the registry asked for basic auth

    @property
    def session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            adapter = _Adapter(self.deadline, pool_connections=2, pool_maxsize=self._pool)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            session.headers["Accept-Encoding"] = "identity"  # digests are of the bytes sent
            session.auth = _no_netrc
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        self.deadline.close()
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    # -- the one request path --------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        what: str,
        ok: tuple[int, ...] = (200,),
        headers: dict[str, str] | None = None,
        data: bytes | BinaryIO | None = None,
        params: dict[str, str] | None = None,
        stream: bool = False,
        allow: tuple[int, ...] = (),
    ) -> requests.Response:
        """Send, answering one auth challenge; a status outside ok + allow raises.

        scope: `repository:NAME:pull[,push]`, what this request needs.
        stream: kept for callers; every response is streamed (read it with
        chunks() or read_capped(), or close it).
        what: names the request in errors ("HEAD blob sha256:...")."""
        url = urljoin(self.base + "/", url)
        for attempt in range(2):
            r = self._send(
                method, url, what, headers=headers, data=data, params=params,
                auth=(self.origin, self._auth_header(scope)),
            )  # fmt: skip
            # only the registry's own challenge is answered, never one met after a redirect
            if r.status_code != 401 or attempt or _origin(r.url) != self.origin:
                break
            r.close()  # not kept alive: registries may close after a 401
            self._answer(r.headers.get("WWW-Authenticate", ""), scope, what)
        if r.status_code in ok or r.status_code in allow:
            return r
        raise self._error(r, what)

    def _send(
        self, method: str, url: str, what: str, *, headers: dict[str, str] | None = None,
        data: bytes | BinaryIO | None = None, params: dict[str, str] | None = None,
        auth: tuple[tuple[str, str, int], dict[str, str]],
    ) -> requests.Response:  # fmt: skip
        """One request, following redirects here: auth[1] (the Authorization header)
        goes only to a URL of origin auth[0]."""
        origin, auth_header = auth
        for _ in range(MAX_REDIRECTS + 1):
            self._check_target(url, what)
            if hasattr(data, "seek"):
                data.seek(0)  # type: ignore[union-attr]  # a retry or a 307 sends it again
            h = {**(headers or {}), **(auth_header if _origin(url) == origin else {})}
            connect, read = self.deadline.timeouts(what)
            try:
                # always streamed: a body is read only through read_capped or chunks,
                # so an endless or huge one is never loaded whole
                r = self.session.request(
                    method, url, headers=h, data=data, params=params, stream=True,
                    timeout=(connect, read), allow_redirects=False,
                )  # fmt: skip
            except requests.exceptions.SSLError as e:
                if self.deadline.expired.is_set():
                    raise self.deadline.error(what) from None
                raise FastlayerError(
                    f"registry {self.registry}: TLS verification failed ({_reason(e)}); "
                    "--insecure talks plain HTTP to a local registry"
                ) from None
            except (requests.exceptions.RequestException, OSError) as e:
                raise self.deadline.failure(what, e, sending=data is not None) from None
            if r.status_code not in _REDIRECTS:
                return r
            location = r.headers.get("Location")
            r.close()
            if not location:
                raise FastlayerError(
                    f"registry {self.registry}: {what} redirected ({r.status_code}) "
                    "without a Location"
                )
            url, params = urljoin(r.url, location), None  # r.url already holds the params
            if r.status_code == 303 and method != "HEAD":
                # a GET without the body, and without the headers that describe one:
                # a Content-Length kept would make the server wait for bytes never sent
                method, data = "GET", None
                headers = {k: v for k, v in (headers or {}).items() if k.lower() not in _BODY}
        raise FastlayerError(
            f"registry {self.registry}: more than {MAX_REDIRECTS} redirects during {what}"
        )

    def _check_target(self, url: str, what: str) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https"):
            raise FastlayerError(
                f"registry {self.registry}: {what} sent to a {server_text(scheme, limit=20)} URL; "
                "only http and https are followed"
            )
        if scheme == "http" and not self.insecure:
            raise FastlayerError(
                f"registry {self.registry}: {what} redirected to plain HTTP "
                f"({server_text(url, self._secrets(), 80)}); refused"
            )

    def _auth_header(self, scope: str) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scope)
        if token:
            return {"Authorization": f"Bearer {token}"}
        if self._basic and self.credentials:
            return {"Authorization": _basic(self.credentials)}
        return {}  # nothing before the registry asks

    def _answer(self, header: str, scope: str, what: str) -> None:
        challenge = parse_challenge(header)
        if challenge.scheme == "basic":
            if not self.credentials:
                raise RegistryError(
                    f"registry {self.registry} needs credentials for {what} (401); "
                    "log in with `podman login` or `docker login`, or set REGISTRY_AUTH_FILE",
                    401,
                )
            self._basic = True
        elif challenge.scheme == "bearer" and "realm" in challenge.params:
            token = self._fetch_token(challenge.params, scope, what)
            with self._lock:
                self._tokens[scope] = token
        else:
            raise RegistryError(
                f"registry {self.registry}: 401 for {what}, no usable challenge", 401
            )

    def _fetch_token(self, params: dict[str, str], scope: str, what: str) -> str:
        """Docker's token flow: GET realm?service=&scope= (with basic credentials if any)."""
        realm = params["realm"]
        where = f"registry {self.registry}: token service"
        if urlsplit(realm).scheme not in ("http", "https") or not urlsplit(realm).hostname:
            shown = server_text(realm, self._secrets(), 80)
            raise FastlayerError(f"{where}: realm {shown} is not an http(s) URL")
        query = {k: params[k] for k in ("service",) if k in params}
        query["scope"] = params.get("scope", scope)
        header = {"Authorization": _basic(self.credentials)} if self.credentials else {}
        what_token = f"token request for {what}"
        r = self._send("GET", realm, what_token, params=query, auth=(_origin(realm), header))
        try:
            if r.status_code in (401, 403):
                who = "the stored credentials were refused" if header else "anonymous access denied"
                raise RegistryError(
                    f"{where}: token for {what} refused ({who}, {r.status_code})", r.status_code
                )
            if r.status_code != 200:
                raise RegistryError(f"{where}: answered {r.status_code} for {what}", r.status_code)
            raw = self.read_capped(r, what_token, MAX_TOKEN_RESPONSE)
        finally:
            r.close()
        return _token_of(untrusted.parse_json(raw, f"{where} response"), where)

    def _secrets(self) -> list[str]:
        """What must never be printed: the password, its basic header, our tokens."""
        out = []
        if self.credentials:
            if self.credentials.password:
                out.append(self.credentials.password)
            out.append(_basic(self.credentials).split(" ", 1)[1])
        with self._lock:
            out.extend(self._tokens.values())
        return out

    def _error(self, r: requests.Response, what: str) -> RegistryError:
        detail = ""
        try:
            raw = self.read_capped(r, what, 64 << 10)
            errors = untrusted.parse_json(raw, what).get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (FastlayerError, AttributeError, TypeError):
            pass
        finally:
            r.close()
        hint = {
            401: "credentials missing or refused",
            403: "access denied",
            404: "not found",
        }.get(r.status_code, "")
        detail = server_text(detail, self._secrets()) if detail else ""
        text = ", ".join(x for x in (hint, detail) if x)
        return RegistryError(
            f"registry {self.registry}: {what} failed with {r.status_code}"
            + (f" ({text})" if text else ""),
            r.status_code,
        )

    # -- bodies -----------------------------------------------------------------------

    def chunks(self, r: requests.Response, what: str, size: int = CHUNK) -> Iterator[bytes]:
        """The body's bytes as they come (at most size at a time, raw, not decoded);
        a stall, the deadline or a broken connection is one FastlayerError."""
        while True:
            self.deadline.check(what)
            try:
                chunk = r.raw.read1(size, decode_content=False)
            except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError) as e:
                raise self.deadline.failure(what, e) from None
            if not chunk:
                return
            yield chunk

    def read_capped(self, r: requests.Response, what: str, cap: int = untrusted.MAX_JSON) -> bytes:
        """A small body (manifest, config, token), at most cap bytes after decoding,
        whatever Content-Length says: more is an error, never an allocation."""
        length = content_length(r)
        if length is not None and length > cap:
            raise untrusted.Invalid(f"registry {self.registry}: {what}: larger than {cap} bytes "
                                    f"(Content-Length {length})")  # fmt: skip
        decode = _decoder(r.headers.get("Content-Encoding", ""), self.registry, what)
        buf = bytearray()
        for chunk in self.chunks(r, what, min(CHUNK, cap + 1)):
            buf += decode(chunk, cap + 1 - len(buf))
            if len(buf) > cap:
                raise untrusted.Invalid(
                    f"registry {self.registry}: {what}: larger than {cap} bytes"
                )
        buf += decode(b"", cap + 1 - len(buf))
        if len(buf) > cap:
            raise untrusted.Invalid(f"registry {self.registry}: {what}: larger than {cap} bytes")
        return bytes(buf)

    def done(self, r: requests.Response, drain: int = 0) -> None:
        """Close a response. Its connection goes back to the pool for the next request
        (keep-alive: no new connection per request) when its body was read to the end
        or had none; with drain, a body of at most that many bytes is read off first.
        Any other connection is closed: its unread bytes would be the next answer's."""
        raw = r.raw
        if drain and not _ended(raw):
            with contextlib.suppress(FastlayerError):
                left = drain
                for chunk in self.chunks(r, "reading a small answer", drain):
                    left -= len(chunk)
                    if left < 0:
                        break
        if _ended(raw):
            raw.release_conn()
        else:
            r.close()

    # -- the distribution API -------------------------------------------------------

    def get_manifest(self, repo: str, reference: str, accept: list[str]) -> requests.Response:
        return self.request(
            "GET", f"/v2/{repo}/manifests/{reference}", scope=_pull(repo),
            what=f"GET manifest {repo}:{reference}" if ":" not in reference
            else f"GET manifest {repo}@{reference}",
            headers={"Accept": ", ".join(accept)}, stream=True,
        )  # fmt: skip

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> str:
        r = self.request(
            "PUT", f"/v2/{repo}/manifests/{reference}", scope=_push(repo),
            what=f"PUT manifest {repo}:{reference}", ok=(201, 200),
            headers={"Content-Type": media_type}, data=data,
        )  # fmt: skip
        self.done(r)
        return r.headers.get("Docker-Content-Digest", "")

    def blob_size(self, repo: str, digest: str) -> int | None:
        """HEAD a blob: its size if the repository has it, else None.

        A 200 without a readable Content-Length, or whose Docker-Content-Digest
        names another blob, does not count as having it."""
        r = self.request(
            "HEAD", f"/v2/{repo}/blobs/{digest}", scope=_push(repo),
            what=f"HEAD blob {digest[:19]} in {repo}", allow=(404,),
        )  # fmt: skip
        self.done(r)
        if r.status_code == 404:
            return None
        named = r.headers.get("Docker-Content-Digest")
        if named is not None and named.strip() != digest:
            return None
        return content_length(r)

    def get_blob(self, repo: str, digest: str) -> requests.Response:
        return self.request(
            "GET", f"/v2/{repo}/blobs/{digest}", scope=_pull(repo),
            what=f"GET blob {digest} of {repo}", stream=True,
        )  # fmt: skip

    def start_upload(self, repo: str, mount: str | None = None, source: str | None = None) -> str:
        """POST an upload; with mount/source, ask for a cross-repository mount first.

        Returns "" when mounted, else the upload URL."""
        params = {"mount": mount, "from": source} if mount and source else None
        scope = _push(repo) + (f" repository:{source}:pull" if params else "")
        r = self.request(
            "POST", f"/v2/{repo}/blobs/uploads/", scope=scope,
            what=f"POST upload to {repo}", ok=(201, 202), params=params,
        )  # fmt: skip
        self.done(r, drain=4096)
        if r.status_code == 201 and params:
            return ""
        location = r.headers.get("Location")
        if not location:
            raise FastlayerError(f"registry {self.registry}: upload started without a Location")
        return urljoin(r.url, location)

    def finish_upload(self, repo: str, location: str, digest: str, body: BinaryIO, size: int):
        """Monolithic upload: PUT the whole blob with its digest."""
        r = self.request(
            "PUT", location, scope=_push(repo), what=f"PUT blob {digest[:19]} to {repo}",
            ok=(201, 204), params={"digest": digest},
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            data=body,
        )  # fmt: skip
        self.done(r, drain=4096)


def _ended(raw: urllib3.response.HTTPResponse | None) -> bool:
    """Whether a response's body has been read to its end (or it had none)."""
    return raw is not None and (raw.length_remaining == 0 or raw.closed)


def content_length(r: requests.Response) -> int | None:
    """The Content-Length header as a number, or None when absent or not a number."""
    text = r.headers.get("Content-Length", "").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    return int(text)


def _decoder(encoding: str, registry: str, what: str):
    """decode(chunk, room) -> at most room bytes of decoded output: a compressed
    body (though identity was asked) cannot expand past the cap."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return lambda chunk, room: chunk
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise FastlayerError(
            f"registry {registry}: {what}: unsupported Content-Encoding "
            f"{server_text(encoding, limit=40)}"
        )
    d = zlib.decompressobj(47 if "gzip" in encoding else 15)  # 47: a gzip header

    def decode(chunk: bytes, room: int) -> bytes:
        try:
            return d.decompress(d.unconsumed_tail + chunk, max(1, room))
        except zlib.error:
            raise FastlayerError(f"registry {registry}: {what}: corrupt {encoding} body") from None

    return decode


def _token_of(body: object, where: str) -> str:
    body = untrusted.of_type(body, dict, f"{where} response")
    for key in ("token", "access_token"):
        value = body.get(key)
        if value:
            token = untrusted.of_type(value, str, f"{where} response.{key}")
            if not _TOKEN.fullmatch(token):
                raise untrusted.Invalid(
                    f"{where} response.{key}: not a token (visible ASCII, at most 64 KiB)"
                )
            return token
    raise untrusted.Invalid(f"{where} response: no token or access_token")


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of url: what credentials are bound to."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme, 0)


def _pull(repo: str) -> str:
    return f"repository:{repo}:pull"


def _push(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def _basic(c: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()


# -- server text in messages ----------------------------------------------------------

_CREDENTIAL_PATTERNS = [
    # "Authorization: Basic xyz", "Bearer xyz": the scheme kept, the value masked
    re.compile(r"(?i)\b(basic|bearer)(\s+)[^\s\"',;]+"),
    # JSON fields that carry secrets: "token": "xyz"
    re.compile(
        r"(?i)(\"(?:token|access_token|refresh_token|id_token|password|passwd|secret|auth|"
        r"authorization|identitytoken|registrytoken)\"\s*:\s*)\"(?:[^\"\\]|\\.)*\""
    ),
    # query or form fields: token=xyz
    re.compile(
        r"(?i)\b((?:token|access_token|refresh_token|password|passwd|secret|auth)=)[^&\s\"']+"
    ),
]


def server_text(text: object, secrets: list[str] | None = None, limit: int = MESSAGE) -> str:
    """Text from a server made fit for one message line: credentials masked (the
    user's own secrets where they appear verbatim, and anything shaped like one),
    control and invisible characters escaped, at most limit characters."""
    s = str(text)
    for secret in sorted(secrets or [], key=len, reverse=True):
        if len(secret) >= 3:
            s = s.replace(secret, "***")
    s = _CREDENTIAL_PATTERNS[0].sub(lambda m: f"{m[1]}{m[2]}***", s)
    s = _CREDENTIAL_PATTERNS[1].sub(lambda m: f'{m[1]}"***"', s)
    s = _CREDENTIAL_PATTERNS[2].sub(lambda m: f"{m[1]}***", s)
    s = "".join(c if c.isprintable() else _escape(c) for c in s)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _reason(e: BaseException) -> str:
    """A short cause of a requests failure ("Connection refused"), no URLs or headers."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip()
    for known in ("Connection aborted", "Read timed out", "Connection reset", "Remote end closed"):
        if known.lower() in text.lower():
            return known
    return type(e).__name__
