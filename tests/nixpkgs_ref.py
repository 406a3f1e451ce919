"""nixpkgs' scripts as the reference: their outputs recorded once as data, and the
scripts themselves when they are present.

tests/data/nixpkgs/*.json.gz hold the inputs the compatibility tests feed to
nixpkgs' auto-layer.py, closure-graph.py, flatten_references_graph and
stream_layered_image.py, with what those scripts returned (written by
tests/data/nixpkgs/record.py; no nixpkgs code is kept in this repository). Every
test compares fastlayer with the recorded outputs, so they run on any machine.

When FASTLAYER_REF_DIR (default /tmp/ref) holds the scripts, the same tests also
run them live on the same inputs and compare fastlayer with that output too.
Copy them from a nixpkgs checkout (P = pkgs/build-support):

    FASTLAYER_REF_DIR/auto-layer.py               P/docker/auto-layer.py
    FASTLAYER_REF_DIR/stream_layered_image.py     P/docker/stream_layered_image.py
    FASTLAYER_REF_DIR/closure-graph.py            P/references-by-popularity/closure-graph.py
    FASTLAYER_REF_DIR/flatten_references_graph/   P/flatten-references-graph/src/
                                                  flatten_references_graph/ (needs
                                                  `pip install igraph toolz`)
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "nixpkgs"
REF_DIR = Path(os.environ.get("FASTLAYER_REF_DIR", "/tmp/ref"))


@functools.cache
def recorded(name: str) -> dict:
    """tests/data/nixpkgs/NAME.json.gz, as recorded from nixpkgs' scripts."""
    with gzip.open(DATA / f"{name}.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


def write_recorded(name: str, data: dict) -> Path:
    """Write NAME.json.gz reproducibly (no gzip timestamp)."""
    DATA.mkdir(parents=True, exist_ok=True)
    path = DATA / f"{name}.json.gz"
    # key order kept: a conf's "config" is written by the script in its input order
    text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(text.encode())
    return path


def script(name: str) -> Path | None:
    """FASTLAYER_REF_DIR/NAME when it exists."""
    path = REF_DIR / name
    return path if path.exists() else None


# --- running the scripts live ----------------------------------------------


def run_auto_layer(nodes: list[dict], limit: int, tmp: Path) -> list[list[str]] | None:
    """auto-layer.py's layers for `nodes`, or None without the script."""
    exe = script("auto-layer.py")
    if exe is None:
        return None
    f = tmp / "auto-graph.json"
    f.write_text(json.dumps(nodes))
    out = subprocess.run(
        [sys.executable, str(exe), str(f), "/dev/null", str(limit)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def run_closure_graph(nodes: list[dict], tmp: Path) -> list[str] | None:
    """closure-graph.py's ranking of `nodes` (given under the key "graph"), or None."""
    exe = script("closure-graph.py")
    if exe is None:
        return None
    f = tmp / "popularity-graph.json"
    f.write_text(json.dumps({"graph": nodes}))
    out = subprocess.run(
        [sys.executable, str(exe), str(f), "graph"], capture_output=True, text=True, check=True
    ).stdout
    return out.splitlines()


@functools.cache
def flatten_references_graph():
    """nixpkgs' flatten_references_graph function, or None without it (or igraph/toolz)."""
    if script("flatten_references_graph") is None:
        return None
    try:
        import igraph  # noqa: F401
        import toolz  # noqa: F401
    except ImportError:
        return None
    if str(REF_DIR) not in sys.path:
        sys.path.insert(0, str(REF_DIR))
    from flatten_references_graph.flatten_references_graph import flatten_references_graph as f

    return f


def run_pipeline(graph: list[dict], steps, exclude) -> dict | None:
    """{"layers": [...]} or {"error": "TypeName"} from flatten_references_graph, or None."""
    f = flatten_references_graph()
    if f is None:
        return None
    try:
        return {"layers": f(json.loads(json.dumps(graph)), steps, exclude_paths=exclude)}
    except (TypeError, KeyError, AssertionError) as e:
        return {"error": type(e).__name__}


# --- a fixed store for stream_layered_image.py -------------------------------

STORE = "/nix/store"
LIB = STORE + "/1b2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-lib-2.0"
APP = STORE + "/0a2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-app-1.0"
ALIAS = STORE + "/3c2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-lib-alias"
CUSTOM = STORE + "/2c2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-customisation-layer"
BASE = STORE + "/4d2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-base-image.tar"


def _pseudo_random(n: int, seed: int) -> bytes:
    out, block = bytearray(), seed.to_bytes(8, "big")
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


def fixed_store(root: Path) -> None:
    """ROOT/nix/store with the same bytes, names and modes on every machine (every
    mode is set explicitly, so the umask does not matter); its paths are read as
    /nix/store/... (`fastlayer stream-nix --root ROOT`)."""

    def host(p: str) -> Path:
        return root / p.lstrip("/")

    def write(p: Path, data: bytes, mode: int) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        p.chmod(mode)

    lib, app = host(LIB), host(APP)
    write(lib / "lib/libx.so.1.0", _pseudo_random(100_000, 1), 0o555)
    (lib / "lib/libx.so").symlink_to("libx.so.1.0")
    os.link(lib / "lib/libx.so.1.0", lib / "lib/libx-hardlink.so")  # a regular file in the tar
    write(lib / "share/block512", _pseudo_random(512, 2), 0o644)
    write(lib / "share/empty", b"", 0o444)
    write(lib / "share/caf\u00e9.txt", b"non-ascii name\n", 0o644)
    # component-wise order traps: a < a/b < a-b < a.c
    write(lib / "share/a/b", b"a/b\n", 0o644)
    write(lib / "share/a-b", b"a-b\n", 0o644)
    write(lib / "share/a.c", b"a.c\n", 0o644)
    (lib / "share/emptydir").mkdir()
    write(app / "bin/app", f"#!/bin/sh\ncat {LIB}/lib/libx.so\n".encode(), 0o755)
    write(app / ("long-" + "n" * 120), b"long name\n", 0o644)
    write(app / "deep/1/2/3/4/5/leaf", b"deep leaf\n", 0o444)
    (app / "share").symlink_to(LIB + "/lib")
    (app / "dangling").symlink_to("../does-not-exist")
    host(ALIAS).symlink_to(LIB + "/share")

    custom = host(CUSTOM)
    custom.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        ti = tarfile.TarInfo("bin")
        ti.type, ti.linkname, ti.mtime = tarfile.SYMTYPE, APP + "/bin", 1
        t.addfile(ti)
    write(custom / "layer.tar", buf.getvalue(), 0o444)
    write(custom / "checksum", hashlib.sha256(buf.getvalue()).hexdigest().encode(), 0o444)

    for top in (lib, app, custom):
        for d, _, _ in os.walk(top):
            Path(d).chmod(0o755)
    (lib / "share/emptydir").chmod(0o750)
    (app / "deep/1/2").chmod(0o555)
    for d in (lib, app, custom):
        d.chmod(0o555)


def stream_cases() -> list[dict]:
    """The confs recorded from stream_layered_image.py over `fixed_store`, in order
    (a case with "from_image" uses the output of the case named in "base")."""
    common = {
        "architecture": "amd64",
        "os": "linux",
        "store_dir": STORE,
        "from_image": None,
        "customisation_layer": CUSTOM,
        "repo_tag": "reg.example:5000/team/app:1.0",
        "created": "1970-01-01T00:00:01Z",
        "mtime": "1970-01-01T00:00:01Z",
        "uid": "0",
        "gid": "0",
        "uname": "root",
        "gname": "root",
    }
    plain = {
        **common,
        "config": {"Env": ["PATH=/bin", "FROM_CHILD=1", "LAST=child"], "Cmd": ["/bin/app"]},
        "store_layers": [[LIB, ALIAS], [APP]],
    }
    owners = {
        **plain,
        "store_layers": [[APP, LIB], [ALIAS]],
        "uid": "1000",
        "gid": "100",
        "uname": "user",
        "gname": "users",
        "mtime": "2024-01-02T03:04:05+00:00",
        "created": "2024-05-06T07:08:09+02:00",
    }
    base = {
        **common,
        "config": {"Env": ["FROM_PARENT=1", "LAST=parent", "PATH=/usr/bin"]},
        "store_layers": [[LIB]],
        "repo_tag": "base:1",
    }
    child = {
        **plain,
        "store_layers": [[APP]],
        "from_image": BASE,
        "created": "2024-05-06T07:08:09+02:00",
    }
    return [
        {"name": "plain", "conf": plain, "tag": None},
        {"name": "tag-override", "conf": plain, "tag": "other:tag"},
        {"name": "owners-and-times", "conf": owners, "tag": None},
        {"name": "base", "conf": base, "tag": None},
        {"name": "from-image", "conf": child, "tag": None, "base": "base"},
    ]


def archive_summary(data: bytes) -> dict:
    """What is recorded of an archive: its sha256 and size, and each member's
    name, size and sha256 (to point at the member that differs)."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            body = t.extractfile(m).read() if m.isfile() else b""
            members.append([m.name, m.size, hashlib.sha256(body).hexdigest()])
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "members": members}


_NAMESPACE = (
    'mount -t tmpfs none /nix && mkdir /nix/store && mount --bind "$1/nix/store" /nix/store'
    ' && shift && exec "$@"'
)


def stream_in_namespace(exe: Path, conf: Path, root: Path, tag: str | None = None) -> bytes:
    """stream_layered_image.py on `conf`, seeing ROOT/nix/store as /nix/store (needs
    root, unshare and a /nix directory)."""
    argv = ["unshare", "-m", "sh", "-c", _NAMESPACE, "sh", str(root), sys.executable, str(exe)]
    argv += [str(conf), *(["-t", tag] if tag else [])]
    return subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, check=True, timeout=600
    ).stdout
