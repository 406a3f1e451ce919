"""A real registry for tests: Debian's `docker-registry` on 127.0.0.1, filesystem storage.

`Registry.start(base, users=...)` runs `docker-registry serve` on a free
loopback port (optionally with htpasswd basic auth), waits (bounded) until
/v2/ answers, and keeps its log, whose access-log lines let tests count
what was uploaded. `stop()` ends exactly the process it started.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import socket
import subprocess
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
{auth}"""

AUTH = """\
auth:
  htpasswd:
    realm: fastlayer-test
    path: {htpasswd}
"""

_ACCESS = re.compile(r'"(GET|HEAD|PUT|POST|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    def __init__(self, base: Path, users: dict[str, str] | None = None):
        self.exe = validators.require("docker-registry")
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.root = self.base / "storage"
        self.port = free_port()
        self.log_path = self.base / "registry.log"
        auth = ""
        if users:
            htpasswd = self.base / "htpasswd"
            htpasswd.write_text("".join(f"{u}:{bcrypt_hash(p)}\n" for u, p in users.items()))
            auth = AUTH.format(htpasswd=htpasswd)
        self.config = self.base / "config.yml"
        self.config.write_text(CONFIG.format(root=self.root, port=self.port, auth=auth))
        self.proc: subprocess.Popen | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Registry:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the process keeps it)
        self.proc = subprocess.Popen(
            [self.exe, "serve", str(self.config)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited:\n{self.log_path.read_text()}")
            try:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2).close()
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
        self.port = free_port()
        self.server = None

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
        import base64
        import json
        import threading
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

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def token_registry(base: Path, users: dict[str, str]) -> tuple[Registry, TokenService]:
    """A registry whose auth is bearer tokens from a TokenService (not yet started)."""
    try:
        service = TokenService(base, users)
    except ImportError:
        validators.unavailable("python cryptography (to sign test tokens) not installed")
        raise
    reg = Registry(base)
    auth = TOKEN_AUTH.format(port=service.port, cert=service.cert_path)
    reg.config.write_text(reg.config.read_text() + auth)
    return reg, service
