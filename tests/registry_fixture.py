"""A real registry for tests: Debian's `docker-registry` on 127.0.0.1, filesystem storage.

`Registry(base, users=..., tls=...).start()` runs `docker-registry serve` on
127.0.0.1 (optionally with htpasswd basic auth, or TLS with a given
certificate), waits (bounded) until /v2/ answers, and keeps its log, whose
access-log lines let tests count what was uploaded. `stop()` ends exactly the
process it started.

Ports are never picked and closed to be bound later (another test running in
parallel could take one in between): the registry binds port 0 itself and
its log says which port it got; a restart asks for that same port again.
The token service binds its port when it is made.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import validators

CONFIG = """\
version: 0.1
log:
  level: info
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
  secret: fastlayer-test-secret
{tls}{auth}"""

TLS = """\
  tls:
    certificate: {cert}
    key: {key}
"""

AUTH = """\
auth:
  htpasswd:
    realm: fastlayer-test
    path: {htpasswd}
"""

_LISTENING = re.compile(rb"listening on 127\.0\.0\.1:(\d+)")
_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)')


def bcrypt_hash(password: str) -> str:
    """A bcrypt hash for htpasswd (the only scheme the registry accepts)."""
    with contextlib.suppress(ImportError):
        import bcrypt  # type: ignore[import-not-found]

        return bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    with contextlib.suppress(ImportError):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt  # libxcrypt's bcrypt; Python < 3.13

        hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        if hashed and hashed.startswith("$2"):
            return hashed
    exe = validators.find_tool("htpasswd")
    if exe:
        out = subprocess.run([exe, "-nbB", "x", password], capture_output=True, text=True)
        return out.stdout.strip().split(":", 1)[1]
    validators.unavailable("no bcrypt: python bcrypt, crypt with bcrypt, or htpasswd")
    raise AssertionError("unreachable")


class Registry:
    def __init__(
        self, base: Path, users: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ):  # fmt: skip
        """tls: (certificate, key) PEM files: the registry speaks HTTPS only."""
        self.exe = validators.require("docker-registry")
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.root = self.base / "storage"
        self.port = 0  # known once started
        self.log_path = self.base / "registry.log"
        self.tls = tls
        auth = ""
        if users:
            htpasswd = self.base / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in users.items()))
            auth = AUTH.format(htpasswd=htpasswd)
        self.config = self.base / "config.yml"
        self._tls = TLS.format(cert=tls[0], key=tls[1]) if tls else ""
        self._auth = auth
        self._write_config()
        self.proc: subprocess.Popen | None = None

    def _write_config(self) -> None:
        text = CONFIG.format(root=self.root, port=self.port, tls=self._tls, auth=self._auth)
        self.config.write_text(text + getattr(self, "extra_config", ""))

    def add_config(self, text: str) -> None:
        """Append to the config (top-level sections such as auth)."""
        self.extra_config = getattr(self, "extra_config", "") + text
        self._write_config()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        """Serve: on a port of its own choosing the first time, the same one after."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(
            [self.exe, "serve", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        context = None
        if self.tls:  # only whether it answers: the tests check the certificate
            context = ssl.create_default_context()
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited:\n{self.log_path.read_text()}")
            if not self.port:
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    m = _LISTENING.search(f.read())
                if m is None:
                    time.sleep(0.05)
                    continue
                self.port = int(m[1])
                self._write_config()  # a restart binds this port again
            scheme = "https" if self.tls else "http"
            try:
                urllib.request.urlopen(
                    f"{scheme}://{self.host}/v2/", timeout=2, context=context
                ).close()
                return self
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError("docker-registry did not answer within 20 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a registry that dies mid-request."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def requests(self) -> list[tuple[str, str, int]]:
        """(method, uri, status) of every request served so far (the access log)."""
        text = self.log_path.read_text(errors="replace")
        return [(m[1], m[2], int(m[3])) for m in _ACCESS.finditer(text)]

    def mark(self) -> int:
        return len(self.requests())

    def uploads_since(self, mark: int) -> list[str]:
        """Digests of the blobs uploaded (completing PUTs) after mark."""
        out = []
        for method, uri, status in self.requests()[mark:]:
            if method == "PUT" and "/blobs/uploads/" in uri and status == 201:
                m = re.search(r"digest=sha256(?::|%3A)([0-9a-f]{64})", uri)
                out.append("sha256:" + m[1] if m else uri)
        return out

    def blob_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


# --- a bearer-token registry: Docker's token flow, with a token service of our own ---------

TOKEN_AUTH = """\
auth:
  token:
    realm: http://127.0.0.1:{port}/token
    service: fastlayer-test
    issuer: fastlayer-test-issuer
    rootcertbundle: {cert}
"""


class TokenService:
    """A token service (Docker's token spec) on 127.0.0.1: ES256 JWTs with an x5c chain.

    Anonymous callers get pull only; a user with the right password gets what
    the scope asks for. Every request's scopes and user are kept in `asked`."""

    def __init__(self, base: Path, users: dict[str, str]):
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.users = users
        self.asked: list[tuple[str | None, list[str]]] = []
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastlayer-test-token")])
        now = datetime.datetime.now(datetime.timezone.utc)
        delta = datetime.timedelta
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - delta(hours=1))
            .not_valid_after(now + delta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        Path(base).mkdir(parents=True, exist_ok=True)
        self.cert_path = Path(base) / "token-cert.pem"
        self.cert_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self._der = self.cert.public_bytes(serialization.Encoding.DER)
        self.server = self._server()  # bound here: port 0, the kernel picks, no race
        self.port = self.server.server_address[1]
        self._thread: threading.Thread | None = None

    def token(self, user: str | None, scopes: list[str]) -> str:
        import base64
        import json
        import secrets

        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        access = []
        for scope in scopes:
            for one in scope.split(" "):
                kind, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                granted = actions.split(",") if user else ["pull"]
                access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(self._der).decode()]}
        claims = {
            "iss": "fastlayer-test-issuer", "sub": user or "", "aud": "fastlayer-test",
            "exp": now + 300, "nbf": now - 10, "iat": now, "jti": secrets.token_hex(8),
            "access": access,
        }  # fmt: skip
        signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def start(self) -> TokenService:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def _server(self):
        import base64
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import parse_qs, urlparse

        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                query = parse_qs(urlparse(self.path).query)
                user = None
                header = self.headers.get("Authorization", "")
                if header.startswith("Basic "):
                    name, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                    if service.users.get(name) != pw:
                        self.send_response(401)
                        self.end_headers()
                        return
                    user = name
                scopes = query.get("scope", [])
                service.asked.append((user, scopes))
                body = json.dumps({"token": service.token(user, scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        return ThreadingHTTPServer(("127.0.0.1", 0), Handler)

    def stop(self) -> None:
        if self._thread is not None:
            self.server.shutdown()  # waits for serve_forever: only once it runs
            self._thread = None
        self.server.server_close()


def token_registry(base: Path, users: dict[str, str]) -> tuple[Registry, TokenService]:
    """A registry whose auth is bearer tokens from a TokenService (not yet started)."""
    try:
        service = TokenService(base, users)
    except ImportError:
        validators.unavailable("python cryptography (to sign test tokens) not installed")
        raise
    reg = Registry(base)
    reg.add_config(TOKEN_AUTH.format(port=service.port, cert=service.cert_path))
    return reg, service
