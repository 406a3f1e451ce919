"""The HTTP side of the OCI distribution protocol, over `requests`.

One `Registry` per host: a pooled requests Session per thread (Sessions
are not thread-safe), credentials from auth.py, and bearer tokens shared
by all threads, kept per scope. A request that meets 401 answers the challenge once (basic, or a
token from the realm for the challenge's scope) and is sent again; request
bodies are files that can be rewound, or bytes. Every failure becomes one
FastlayerError line naming the registry, the repository and what was asked.
"""

from __future__ import annotations

import base64
import re
import threading
from typing import BinaryIO
from urllib.parse import urljoin

import requests

from fastlayer.errors import FastlayerError
from fastlayer.registry.auth import Credentials, find_credentials, parse_challenge

TIMEOUT = (30, 300)  # connect, read (seconds)
USER_AGENT = "fastlayer"


class RegistryError(FastlayerError):
    """The registry answered with an unexpected status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class Registry:
    def __init__(self, registry: str, api_host: str, insecure: bool = False, pool: int = 8):
        self.registry = registry  # as the user wrote it, for messages and credentials
        self.base = f"{'http' if insecure else 'https'}://{api_host}"
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
            adapter = requests.adapters.HTTPAdapter(pool_connections=2, pool_maxsize=self._pool)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
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
        what: names the request in errors ("HEAD blob sha256:...")."""
        url = urljoin(self.base + "/", url)
        for attempt in range(2):
            if attempt and hasattr(data, "seek"):
                data.seek(0)  # type: ignore[union-attr]
            h = {**(headers or {}), **self._auth_header(scope)}
            try:
                r = self.session.request(
                    method, url, headers=h, data=data, params=params, stream=stream,
                    timeout=TIMEOUT, allow_redirects=True,
                )  # fmt: skip
            except requests.exceptions.SSLError as e:
                raise FastlayerError(
                    f"registry {self.registry}: TLS verification failed ({_reason(e)}); "
                    "--insecure talks plain HTTP to a local registry"
                ) from None
            except requests.exceptions.RequestException as e:
                raise FastlayerError(
                    f"registry {self.registry} unreachable during {what}: {_reason(e)}"
                ) from None
            if r.status_code != 401 or attempt:
                break
            r.close()
            self._answer(r.headers.get("WWW-Authenticate", ""), scope, what)
        if r.status_code in ok or r.status_code in allow:
            return r
        raise self._error(r, what)

    def _auth_header(self, scope: str) -> dict[str, str]:
        with self._lock:
            token = self._tokens.get(scope)
        if token:
            return {"Authorization": f"Bearer {token}"}
        if self._basic and self.credentials:
            return {"Authorization": _basic(self.credentials)}
        return {}

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
        query = {k: params[k] for k in ("service",) if k in params}
        query["scope"] = params.get("scope", scope)
        auth = (self.credentials.username, self.credentials.password) if self.credentials else None
        try:
            r = self.session.get(params["realm"], params=query, auth=auth, timeout=TIMEOUT)
        except requests.exceptions.RequestException as e:
            raise FastlayerError(
                f"registry {self.registry}: token service unreachable: {_reason(e)}"
            ) from None
        if r.status_code in (401, 403):
            who = "the stored credentials were refused" if auth else "anonymous access denied"
            raise RegistryError(
                f"registry {self.registry}: token for {what} refused ({who}, {r.status_code})",
                r.status_code,
            )
        try:
            body = r.json()
            return body.get("token") or body["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise FastlayerError(
                f"registry {self.registry}: token service answered {r.status_code} without a token"
            ) from None

    def _error(self, r: requests.Response, what: str) -> RegistryError:
        detail = ""
        try:
            errors = r.json().get("errors") or []
            detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (ValueError, AttributeError):
            pass
        finally:
            r.close()
        hint = {
            401: "credentials missing or refused",
            403: "access denied",
            404: "not found",
        }.get(r.status_code, "")
        text = ", ".join(x for x in (hint, detail) if x)
        return RegistryError(
            f"registry {self.registry}: {what} failed with {r.status_code}"
            + (f" ({text})" if text else ""),
            r.status_code,
        )

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
        r.close()
        return r.headers.get("Docker-Content-Digest", "")

    def blob_size(self, repo: str, digest: str) -> int | None:
        """HEAD a blob: its size if the repository has it, else None."""
        r = self.request(
            "HEAD", f"/v2/{repo}/blobs/{digest}", scope=_push(repo),
            what=f"HEAD blob {digest[:19]} in {repo}", allow=(404,),
        )  # fmt: skip
        r.close()
        if r.status_code == 404:
            return None
        return int(r.headers.get("Content-Length", -1))

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
        r.close()
        if r.status_code == 201 and params:
            return ""
        location = r.headers.get("Location")
        if not location:
            raise FastlayerError(f"registry {self.registry}: upload started without a Location")
        return urljoin(self.base + "/", location)

    def finish_upload(self, repo: str, location: str, digest: str, body: BinaryIO, size: int):
        """Monolithic upload: PUT the whole blob with its digest."""
        r = self.request(
            "PUT", location, scope=_push(repo), what=f"PUT blob {digest[:19]} to {repo}",
            ok=(201, 204), params={"digest": digest},
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            data=body,
        )  # fmt: skip
        r.close()


def _pull(repo: str) -> str:
    return f"repository:{repo}:pull"


def _push(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def _basic(c: Credentials) -> str:
    return "Basic " + base64.b64encode(f"{c.username}:{c.password}".encode()).decode()


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
