"""Small real inputs for the layer cache tests: a fake Nix store, a [[layers]]
directory, a roots directory and a verified base archive, plus ways to read
what a build wrote (pipe, fifo, OCI layout) and what the cache holds."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from closures import make_closure, store_name

import fastlayer

# where the fastlayer under test lives (src/ in a dev tree)
SRC = str(Path(fastlayer.__file__).resolve().parent.parent)
DEEP = "lib/a/b/c/libdeep.so"  # a file well below its store path's root
_FIFOS = itertools.count()


def noise(seed: str, size: int) -> bytes:
    """size bytes that do not compress to nothing (every byte is hashed)."""
    block = b"".join(hashlib.sha256(f"{seed}{i}".encode()).digest() for i in range(256))
    return (block * (size // len(block) + 1))[:size]


@dataclass
class World:
    top: Path
    root: Path  # the chroot store: ROOT/nix/store/...
    paths: dict[str, str]  # package name -> store path
    graph: Path
    spec: dict

    def on_disk(self, name: str) -> Path:
        return self.root / self.paths[name].lstrip("/")

    def write_spec(self, name: str = "spec.json", **extra: object) -> Path:
        p = self.top / name
        p.write_text(json.dumps({**self.spec, **extra}))
        return p

    def with_new_path(self, old: str, new: str, files: dict[str, bytes]) -> dict:
        """A spec where package old is replaced by a new store path (a new name, as
        Nix gives a changed package), holding files; the graph rewritten to match."""
        path = store_name(new)
        top = self.root / path.lstrip("/")
        for rel, data in files.items():
            (top / rel).parent.mkdir(parents=True, exist_ok=True)
            (top / rel).write_bytes(data)
        nodes = json.loads(self.graph.read_text())
        swap = {self.paths[old]: path}
        for n in nodes:
            n["path"] = swap.get(n["path"], n["path"])
            n["references"] = [swap.get(r, r) for r in n["references"]]
        graph = self.top / f"graph-{new}.json"
        graph.write_text(json.dumps(nodes))
        store_paths = [swap.get(p, p) for p in self.spec["contents"]["store_paths"]]
        contents = {**self.spec["contents"], "store_paths": store_paths, "graph": str(graph)}
        return {**self.spec, "contents": contents}


def make_world(top: Path, *, base: bool = True) -> World:
    """Four store paths (one layer each), a [[layers]] directory, a roots
    directory and, with base, a two-layer uncompressed base archive (verified)."""
    from test_verified_copy import docker_archive, layer_tar

    top.mkdir(parents=True, exist_ok=True)
    root = top / "root"
    paths, graph = make_closure(
        root,
        {
            "app-1.0": {"bin/app": "#!/bin/sh\necho app\n", "share/doc/README": "app docs\n"},
            "libdeep-2.1": {
                DEEP: noise("deep", 300_000),
                "lib/libtop.so": noise("top", 5000),
                "lib/link.so": "->a/b/c/libdeep.so",
            },  # fmt: skip
            "greeting": {"share/greeting": "hello from fastlayer\n"},
            "data-3": {"share/data/blob.bin": noise("data", 120_000)},
        },
        {"app-1.0": ["libdeep-2.1", "greeting", "data-3"], "libdeep-2.1": ["greeting"]},
    )
    srv = top / "srv"
    (srv / "sub").mkdir(parents=True)
    (srv / "index.html").write_text("<p>served</p>\n")
    (srv / "sub" / "data.bin").write_bytes(noise("srv", 40_000))
    rootfs = top / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "motd").write_text("welcome\n")
    spec: dict = {
        "name": "cache/app",
        "tag": "t1",
        "store_root": str(root),
        "contents": {
            "store_paths": [paths["app-1.0"]],
            "graph": str(graph),
            "roots": [str(rootfs)],
            "root_layers": "per-root",
        },
        "layers": [{"paths": [str(srv)], "dest": "/var"}],
        "config": {"Cmd": ["/bin/app"]},
    }
    if base:
        layers = [layer_tar("base-a", 200_000, 1), layer_tar("base-b", 300_000, 2)]
        spec["from_image"] = str(docker_archive(top / "base.tar", layers))
        spec["verify_base"] = True
    return World(top, root, paths, graph, spec)


# --- running fastlayer ----------------------------------------------------------------


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """fastlayer in a process of its own; stdout is a pipe (bytes)."""
    return subprocess.run(
        [sys.executable, "-m", "fastlayer", *args],
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": SRC, **(env or {})},
        **kw,
    )


def one_error_line(err: str, *culprits: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlayer: error: "), err
    assert "Traceback" not in err
    for c in culprits:
        assert c in lines[0], lines[0]
    return lines[0]


def warnings_of(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith("fastlayer: warning: ")]


@contextlib.contextmanager
def fifo_reader(path: Path):
    """A fifo at path, drained by a thread; yields a list that then holds the bytes."""
    os.mkfifo(path)
    got: list[bytes] = []

    def drain() -> None:
        with open(path, "rb") as f:
            got.append(f.read())

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        yield got
    finally:
        t.join(0.2)  # done, or about to be, once the writer closed it
        while t.is_alive():  # the build failed before opening it: let the reader go
            fd = os.open(path, os.O_RDWR)  # a writer that never blocks (Linux)
            t.join(0.05)
            os.close(fd)
            t.join(0.05)
        os.unlink(path)


def build_to_pipe(spec: dict | str, top: Path, **kw) -> bytes:
    """fastlayer.build into a fifo (not seekable: the pipe path), in this process."""
    fifo = top / f"pipe-{next(_FIFOS)}"
    with fifo_reader(fifo) as got:
        fastlayer.build(spec, str(fifo), **kw)
    return got[0]


# --- what a build left ------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def entry_files(cache: Path) -> dict[str, bytes]:
    """key -> bytes of every entry file in a cache directory."""
    d = cache / "layers" / "v1"
    if not d.is_dir():
        return {}
    return {p.stem: p.read_bytes() for p in d.glob("*/*.json")}


def entry_path(cache: Path, key: str) -> Path:
    return cache / "layers" / "v1" / key[:2] / f"{key}.json"


def layout_files(layout: Path) -> dict[str, str]:
    """relative path -> sha256 of every file in an OCI layout."""
    return {
        str(p.relative_to(layout)): sha256_hex(p.read_bytes())
        for p in sorted(layout.rglob("*"))
        if p.is_file()
    }
