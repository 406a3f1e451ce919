"""A registry that misbehaves on purpose, on 127.0.0.1 (binds its own port).

`Hostile()` serves nothing until a test adds routes: `on(method, regex, fn)`,
where fn(handler, match) answers with `send()` or writes raw bytes itself
(with `read_body=False` the request body is left unread, for fn to ignore).
Every request is recorded in `seen` with its headers, so tests can assert
which host saw which Authorization. A small valid image (`Image`) gives the
documents to serve, and to break.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Image:
    """One uncompressed layer, a config and an OCI manifest, all consistent."""

    layer: bytes = b""
    config: bytes = b""
    manifest: bytes = b""
    blobs: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def make(cls, content: bytes = b"hello from a hostile registry\n") -> Image:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("greeting")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        layer = buf.getvalue()
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "config": {},
             "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}
        ).encode()  # fmt: skip
        return cls(layer, config).with_manifest(
            {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
             "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                        "digest": sha(config), "size": len(config)},
             "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                         "digest": sha(layer), "size": len(layer)}]}
        )  # fmt: skip

    def with_manifest(self, manifest: dict | bytes) -> Image:
        raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        return Image(
            self.layer,
            self.config,
            raw,
            {sha(self.layer): self.layer, sha(self.config): self.config},
        )

    @property
    def digest(self) -> str:
        return sha(self.manifest)


Route = Callable[["Handler", re.Match], None]


class Handler(BaseHTTPRequestHandler):
    server: Server

    def _any(self) -> None:
        route = self._route()
        length = self.headers.get("Content-Length")
        body = b""
        if length and length.isdigit() and (route is None or route[0]):
            body = self.rfile.read(int(length))
        self.server.owner.seen.append(
            Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        if route is not None:
            _, fn, m = route
            try:
                fn(self, m)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should
            return
        self.send(404, b'{"errors": [{"code": "NOT_FOUND", "message": "no route"}]}')

    def _route(self) -> tuple[bool, Route, re.Match] | None:
        """(read the body first?, handler, match) of the first route for this request."""
        for method, pattern, fn, read_body in self.server.owner.routes:
            m = pattern.fullmatch(self.path.split("?", 1)[0])
            if method == self.command and m:
                return read_body, fn, m
        return None

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _any  # noqa: N815 (http.server's names)

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in headers.items():
            if v is not None:
                self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def trickle(self, data: bytes, every: float = 1.0) -> None:
        """Write data one byte at a time, every `every` seconds, until done or stopped."""
        for i in range(len(data)):
            if self.server.owner.stopping.is_set():
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(every)

    def log_message(self, *args) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: Hostile


class Hostile:
    def __init__(self) -> None:
        self.routes: list[tuple[str, re.Pattern, Route, bool]] = []
        self.seen: list[Seen] = []
        self.stopping = threading.Event()
        self.server = Server(("127.0.0.1", 0), Handler)  # the port is bound here, no race
        self.server.owner = self
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def on(self, method: str, pattern: str, fn: Route, read_body: bool = True) -> Hostile:
        self.routes.append((method, re.compile(pattern), fn, read_body))
        return self

    def serve_image(self, image: Image, repo: str = "team/app") -> Hostile:
        """Answer manifest and blob GETs of image as a good registry would."""

        def manifest(h: Handler, m: re.Match) -> None:
            h.send(200, image.manifest, {"Content-Type": OCI_MANIFEST})

        def blob(h: Handler, m: re.Match) -> None:
            data = image.blobs.get(m[1])
            h.send(200, data) if data is not None else h.send(404)

        self.on("GET", rf"/v2/{repo}/manifests/[^/]+", manifest)
        self.on("GET", rf"/v2/{repo}/blobs/(sha256:[0-9a-f]{{64}})", blob)
        return self

    def authorizations(self) -> list[str]:
        return [s.headers["authorization"] for s in self.seen if "authorization" in s.headers]

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
