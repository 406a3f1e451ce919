"""Valid inputs built from scratch, mutations of them, and one checked CLI run.

Used by tests/test_robustness.py (through hypothesis) and by
bench/robustness_cases.py (through random.Random): both draw mutations with
a `Pick` (choose one of a sequence, or a fraction in [0, 1)), so the same
generators serve a shrinking search and a long random census.

Each case runs in a fresh directory holding a host "secret": a valid tar
and a JSON config whose bytes carry a random marker. A mutated input may
name it (absolute or relative symlink, hard link, digest with `..`); the
marker must never reach any output byte, stdout or stderr. The property
(`check`): exit 1 with one `fastlayer: error: ` line, no traceback, nothing
left in the output directory or $TMPDIR; or exit 0 with a correct image,
checked here with tarfile/hashlib, independently of fastlayer's code.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import hashlib
import io
import json
import os
import resource
import secrets
import select
import signal
import stat
import sys
import tarfile
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

BASE_KINDS = (
    "docker-archive", "docker-archive-gz", "docker-legacy", "docker-dir", "oci-dir", "oci-archive",
)  # fmt: skip
TAR_KINDS = ("docker-archive", "docker-archive-gz", "docker-legacy", "oci-archive")
HANG_SECONDS = float(os.environ.get("FASTLAYER_ROBUSTNESS_DEADLINE", 10))
PREFIX = "fastlayer: error: "
EPOCH = "1970-01-01T00:00:01Z"


class Pick(Protocol):
    def one(self, items: Sequence[T]) -> T: ...
    def fraction(self) -> float: ...


# --------------------------------------------------------------------------- host side


@dataclass
class Host:
    """A fresh example directory: in/ (inputs), out/ (outputs), tmp/ ($TMPDIR),
    host/ (the secret the inputs must never reach)."""

    root: Path
    marker: str
    secret_tar: Path
    secret_json: Path
    fifo: Path

    @property
    def inp(self) -> Path:
        return self.root / "in"

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    def leaked(self, data: bytes) -> bool:
        return self.marker.encode() in data


def make_host(root: Path) -> Host:
    marker = "FLSECRET" + secrets.token_hex(12)
    for d in ("in", "out", "tmp", "host"):
        (root / d).mkdir(parents=True)
    secret_tar = root / "host" / "secret.tar"
    # A valid layer tar, so a reader that takes it as a layer goes on to
    # list it (inspect) or copy it: the marker is in names and contents.
    secret_tar.write_bytes(tar_bytes({f"{marker}/key": (marker * 8).encode()}))
    secret_json = root / "host" / "secret.json"
    cfg = image_config([sha256(secret_tar.read_bytes())])
    cfg["config"]["Env"] = [f"SECRET={marker}"]
    secret_json.write_text(json.dumps(cfg))
    fifo = root / "host" / "fifo"
    os.mkfifo(fifo)
    return Host(root, marker, secret_tar, secret_json, fifo)


def release_fifos(root: Path) -> None:
    """Open every fifo under root for writing (non-blocking) and close it, so a
    thread blocked opening one for reading gets EOF instead of hanging forever."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                if stat.S_ISFIFO(os.lstat(p).st_mode):
                    os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))


# --------------------------------------------------------------------------- valid inputs


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, 1
            t.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


LAYERS = (
    tar_bytes({"bin/app": b"#!/bin/sh\necho base\n", "etc/os-release": b"ID=robust\n"}),
    tar_bytes({"share/doc/readme": b"layer two\n" * 20}),
)


def image_config(diff_ids: list[str]) -> dict[str, Any]:
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "config": {"Env": ["PATH=/bin", "BASE=1"], "Cmd": ["/bin/app"], "Labels": {"a": "1"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": EPOCH, "created_by": f"layer {i}"} for i in range(len(diff_ids))],
    }


@dataclass
class Entry:
    """One member of an image: a regular file, or something else (kind)."""

    name: str
    role: str
    data: bytes = b""
    kind: str = "file"  # file | symlink | hardlink | fifo | dir
    target: str = ""


# A JSON document hook: (role, parsed document) -> document, or raw bytes.
Hook = Callable[[str, Any], Any]


def _dump(role: str, doc: Any, hook: Hook) -> bytes:
    out = hook(role, doc)
    return out if isinstance(out, bytes) else json.dumps(out).encode()


def docker_entries(hook: Hook, layer_digests: dict[int, str]) -> list[Entry]:
    """docker save's current spec: manifest.json, <id>.json, <diff>/layer.tar."""
    diff_ids = [layer_digests.get(i, sha256(x)) for i, x in enumerate(LAYERS)]
    # layer IDs differ per position, as docker save's chain IDs do
    names = [
        hashlib.sha256(f"{i}{d}".encode()).hexdigest() + "/layer.tar"
        for i, d in enumerate(diff_ids)
    ]
    config = _dump("config", image_config(diff_ids), hook)
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["robust/base:1"], "Layers": names}]
    entries = [Entry(n, f"layer{i}", LAYERS[i]) for i, n in enumerate(names)]
    entries.append(Entry(config_name, "config", config))
    entries.append(Entry("manifest.json", "manifest.json", _dump("manifest.json", manifest, hook)))
    return entries


def legacy_entries(hook: Hook, layer_digests: dict[int, str]) -> list[Entry]:
    """Docker image spec v1 only: <id>/{VERSION,json,layer.tar} and repositories."""
    entries: list[Entry] = []
    parent = None
    for i, data in enumerate(LAYERS):
        layer_id = hashlib.sha256(f"{i}{parent}".encode()).hexdigest()
        meta: dict[str, Any] = {"id": layer_id, **({"parent": parent} if parent else {})}
        if i == len(LAYERS) - 1:
            meta.update(config=image_config([])["config"], architecture="amd64", os="linux")
        entries.append(Entry(f"{layer_id}/VERSION", f"version{i}", b"1.0"))
        entries.append(Entry(f"{layer_id}/json", f"json{i}", _dump(f"json{i}", meta, hook)))
        entries.append(Entry(f"{layer_id}/layer.tar", f"layer{i}", data))
        parent = layer_id
    repos = {"robust/base": {"1": parent}}
    entries.append(Entry("repositories", "repositories", _dump("repositories", repos, hook)))
    return entries


def oci_entries(hook: Hook, layer_digests: dict[int, str]) -> list[Entry]:
    """An OCI layout: layer 0 stored plain, layer 1 gzip; index -> manifest -> config."""
    entries: list[Entry] = []

    def blob(role: str, data: bytes, digest: str | None = None) -> dict[str, Any]:
        digest = digest or sha256(data)
        entries.append(Entry("blobs/sha256/" + digest.split(":")[1], role, data))
        return {"digest": digest, "size": len(data)}

    mt = "application/vnd.oci.image.layer.v1.tar"
    descs = [{"mediaType": mt, **blob("layer0", LAYERS[0], layer_digests.get(0))}]
    gz = gzip.compress(LAYERS[1], mtime=0)
    descs.append({"mediaType": mt + "+gzip", **blob("layer1", gz, layer_digests.get(1))})
    diff_ids = [layer_digests.get(0, sha256(LAYERS[0])), layer_digests.get(1, sha256(LAYERS[1]))]
    cfg = blob("config", _dump("config", image_config(diff_ids), hook))
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": descs,
    }
    mdesc = {
        "mediaType": manifest["mediaType"],
        **blob("manifest", _dump("manifest", manifest, hook)),
        "annotations": {"org.opencontainers.image.ref.name": "1"},
    }
    index = {"schemaVersion": 2, "manifests": [mdesc]}
    entries.append(Entry("index.json", "index.json", _dump("index.json", index, hook)))
    layout = {"imageLayoutVersion": "1.0.0"}
    entries.append(Entry("oci-layout", "oci-layout", _dump("oci-layout", layout, hook)))
    return entries


ENTRIES = {
    "docker-archive": docker_entries,
    "docker-dir": docker_entries,
    "docker-archive-gz": docker_entries,
    "docker-legacy": legacy_entries,
    "oci-dir": oci_entries,
    "oci-archive": oci_entries,
}
DOCS = {
    "docker-archive": ("manifest.json", "config"),
    "docker-dir": ("manifest.json", "config"),
    "docker-archive-gz": ("manifest.json", "config"),
    "docker-legacy": ("repositories", "json0", "json1"),
    "oci-dir": ("index.json", "manifest", "config", "oci-layout"),
    "oci-archive": ("index.json", "manifest", "config", "oci-layout"),
}


def write_tar(path: Path, entries: list[Entry]) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for e in entries:
            ti = tarfile.TarInfo(e.name)
            ti.mtime, ti.mode = 1, 0o644
            if e.kind == "file":
                ti.size = len(e.data)
                t.addfile(ti, io.BytesIO(e.data))
                continue
            ti.type = {
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "fifo": tarfile.FIFOTYPE,
                "dir": tarfile.DIRTYPE,
            }[e.kind]
            ti.linkname = e.target
            t.addfile(ti)


def write_dir(root: Path, entries: list[Entry]) -> None:
    for e in entries:
        p = root / e.name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink() or p.exists():  # a duplicate name: the last one wins
            if p.is_dir() and not p.is_symlink():
                continue
            p.unlink()
        if e.kind == "file":
            p.write_bytes(e.data)
        elif e.kind in ("symlink", "hardlink"):  # a hard link out of a dir is a copy: use symlinks
            p.symlink_to(e.target)
        elif e.kind == "fifo":
            os.mkfifo(p)
        else:
            p.mkdir()


# --------------------------------------------------------------------------- mutations

# Values a field may be replaced with: every JSON type, out-of-range numbers
# and hostile names. <...> tokens are resolved against the Host.
VALUES: tuple[Any, ...] = (
    "x", "", 0, 1, -1, 2**63, 2**70, -(2**70), 1e20, -1e20, 0.5,
    float("nan"), float("inf"), None, True, False, [], {}, ["x"], {"a": 1}, [[[]]],
    "/etc/passwd", "../../x", "../../../../../../../etc/passwd", "sha256:../../..",
    "sha256:../../../../host/secret.tar", "sha256:" + "g" * 64, "sha256:" + "A" * 64,
    "sha256:" + "0" * 63, "sha512:" + "0" * 64, "md5:0", "blobs/sha256/../../../etc/passwd",
    "a\nb", "\x00", "x" * 5000, "/dev/zero", "<fifo>", "<dir>",
)  # fmt: skip
SECRET_VALUES = ("<secret-tar>", "<secret-json>", "<secret-rel>", "<secret-digest>")
JSON_OPS = ("drop", "set", "set", "set", "wrap-list", "wrap-dict")
RAW_DOCS: dict[str, bytes] = {
    "empty": b"",
    "truncated": b'{"schemaVersion": 2, "manifests": [{"dig',
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "deep-dict": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "non-utf8": b"\xff\xfe\x00{",
    "nul": b"\x00" * 64,
    "number": b"1e400",
    "huge": b'{"a": "' + b"x" * (5 << 20) + b'"}',
}
ENTRY_OPS = (
    "symlink-secret", "symlink-secret-rel", "hardlink-secret", "fifo", "dir", "missing",
    "duplicate", "symlink-loop", "self-link", "dev-zero", "internal-link", "hardlink-missing",
    "wrong-digest",
)  # fmt: skip
# Ops whose link target a crafted input would name by its true digest.
DIGEST_OPS = ("symlink-secret", "symlink-secret-rel", "hardlink-secret", "internal-link")
BYTE_OPS = ("truncate", "flip")


@dataclass
class Mutation:
    """What to do to a valid input. `level`: none | json | raw | entry | bytes."""

    level: str
    role: str = ""
    op: str = ""
    value: Any = None
    pick: float = 0.0  # which JSON path (json) or which offset (bytes), as a fraction
    fix_digest: bool = False  # entry ops on layers: diff_id/digest made to match the target
    chosen: list[str] = field(default_factory=list)  # filled when applied, for reports

    def describe(self) -> str:
        bits = [self.level, self.role, self.op]
        if self.level in ("json", "raw") and self.value is not None or self.op == "set":
            bits.append(repr(self.value)[:60])
        if self.fix_digest:
            bits.append("digest fixed")
        if self.level == "bytes":
            bits.append(f"at {self.pick:.3f}")
        return " ".join(b for b in bits if b) + "".join(f" [{c}]" for c in self.chosen)


def draw_json_mutation(p: Pick, roles: Sequence[str], values: Sequence[Any]) -> Mutation:
    if p.fraction() < 0.15:
        return Mutation("raw", p.one(roles), op=p.one(sorted(RAW_DOCS)))
    op = p.one(JSON_OPS)
    value = p.one(values) if op == "set" else None
    return Mutation("json", p.one(roles), op=op, value=value, pick=p.fraction())


def draw_base_mutation(p: Pick, kind: str) -> Mutation:
    level = p.one(("none", "json", "json", "json", "entry", "entry", "entry", "bytes"))
    if level == "none":
        return Mutation("none")
    if level == "json":
        return draw_json_mutation(p, DOCS[kind], VALUES + SECRET_VALUES)
    if level == "bytes" and kind in TAR_KINDS:
        return Mutation("bytes", op=p.one(BYTE_OPS), pick=p.fraction())
    roles = (*DOCS[kind], "layer0", "layer1", "layer1")
    op = p.one(ENTRY_OPS)
    fix = op in DIGEST_OPS and p.one((True, False))
    return Mutation("entry", p.one(roles), op=op, fix_digest=fix)


def json_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path into doc (root first), keys and indices."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += json_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += json_paths(v, (*prefix, i))
    return out


def resolve_value(value: Any, host: Host, at: Path) -> Any:
    tokens = {
        "<secret-tar>": str(host.secret_tar),
        "<secret-json>": str(host.secret_json),
        "<secret-rel>": os.path.relpath(host.secret_tar, at),
        "<secret-digest>": sha256(host.secret_tar.read_bytes()),
        "<fifo>": str(host.fifo),
        "<dir>": str(host.root / "host"),
    }
    if isinstance(value, list):
        return [resolve_value(x, host, at) for x in value]
    return tokens.get(value, value) if isinstance(value, str) else value


def mutate_json(doc: Any, m: Mutation, host: Host, at: Path) -> Any:
    """doc with m applied at the path m.pick selects (recorded in m.chosen)."""
    if m.level == "raw":
        m.chosen.append(f"raw {m.op}")
        return RAW_DOCS[m.op]
    doc = copy.deepcopy(doc)
    paths = json_paths(doc)
    path = paths[min(int(m.pick * len(paths)), len(paths) - 1)]
    m.chosen.append("at " + "".join(f"[{k!r}]" for k in path))
    value = resolve_value(m.value, host, at)
    if not path:
        parent, key, old = None, None, doc
    else:
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key, old = path[-1], parent[path[-1]]
    new = {"set": value, "wrap-list": [old], "wrap-dict": {"k": old}}.get(m.op)
    if parent is None:
        return None if m.op == "drop" else new
    if m.op == "drop":
        del parent[key]
    else:
        parent[key] = new
    return doc


def build_base(kind: str, m: Mutation, host: Host) -> Path:
    """The valid base image of kind under host.inp, with m applied."""
    names = {"docker-dir": "base-dir", "oci-dir": "base-oci", "docker-archive-gz": "base.tar.gz"}
    path = host.inp / names.get(kind, "base.tar")
    at = path if kind in ("docker-dir", "oci-dir") else path.parent

    def hook(role: str, doc: Any) -> Any:
        return (
            mutate_json(doc, m, host, at) if m.level in ("json", "raw") and role == m.role else doc
        )

    digests: dict[int, str] = {}
    if m.level == "entry" and m.op == "wrong-digest" and m.role in ("layer0", "layer1"):
        # the layer stays, its diff_id (and OCI digest) names other bytes
        digests[int(m.role[-1])] = sha256(LAYERS[1 - int(m.role[-1])])
    if m.level == "entry" and m.fix_digest and m.role in ("layer0", "layer1"):
        i = int(m.role[-1])  # internal-link points layer i at the other layer
        target = LAYERS[1 - i] if m.op == "internal-link" else host.secret_tar.read_bytes()
        digests[i] = sha256(target)
    entries = ENTRIES[kind](hook, digests)
    if m.level == "entry":
        entries = mutate_entries(entries, m, host, at)
    if kind in ("docker-dir", "oci-dir"):
        path.mkdir()
        write_dir(path, entries)
    else:
        write_tar(path, entries)
        if kind == "docker-archive-gz":  # the whole archive compressed, as `docker save | gzip`
            path.write_bytes(gzip.compress(path.read_bytes(), mtime=0))
        if m.level == "bytes":
            mutate_bytes(path, m)
    return path


def mutate_entries(entries: list[Entry], m: Mutation, host: Host, at: Path) -> list[Entry]:
    idx = next((i for i, e in enumerate(entries) if e.role == m.role), None)
    if idx is None:
        return entries
    e = entries[idx]
    m.chosen.append(e.name)
    secret = host.secret_json if m.role not in ("layer0", "layer1") else host.secret_tar
    depth = e.name.count("/")
    rel = os.path.relpath(secret, at / os.path.dirname(e.name)) if depth else None
    new: list[Entry] = []
    if m.op == "symlink-secret":
        new = [Entry(e.name, e.role, kind="symlink", target=str(secret))]
    elif m.op == "symlink-secret-rel":
        new = [Entry(e.name, e.role, kind="symlink", target=rel or os.path.relpath(secret, at))]
    elif m.op == "hardlink-secret":
        new = [Entry(e.name, e.role, kind="hardlink", target=str(secret))]
    elif m.op == "hardlink-missing":
        new = [Entry(e.name, e.role, kind="hardlink", target="no/such/member")]
    elif m.op == "fifo":
        new = [Entry(e.name, e.role, kind="fifo")]
    elif m.op == "dir":
        new = [Entry(e.name, e.role, kind="dir")]
    elif m.op == "dev-zero":
        new = [Entry(e.name, e.role, kind="symlink", target="/dev/zero")]
    elif m.op == "duplicate":  # same name again, other bytes: a valid layer, or a wrong doc
        other = LAYERS[0] if e.role == "layer1" else b"[]"
        new = [e, Entry(e.name, e.role, other)]
    elif m.op == "symlink-loop":
        loop = e.name + ".loop"
        new = [
            Entry(e.name, e.role, kind="symlink", target=os.path.basename(loop)),
            Entry(loop, "loop", kind="symlink", target=os.path.basename(e.name)),
        ]
    elif m.op == "self-link":
        new = [Entry(e.name, e.role, kind="symlink", target=os.path.basename(e.name))]
    elif m.op == "internal-link":  # as docker save stores a repeated layer: valid when fixed
        first = next(x for x in entries if x.role == "layer0")
        if first is e:
            first = next(x for x in entries if x.role == "layer1")
        target = os.path.relpath(first.name, os.path.dirname(e.name) or ".")
        if first.name != e.name:  # OCI with the digest fixed: the blob is already there
            new = [Entry(e.name, e.role, kind="symlink", target=target)]
    elif m.op == "wrong-digest":  # done in build_base; a doc gets a wrong byte
        new = [e if e.role.startswith("layer") else Entry(e.name, e.role, e.data + b" ")]
    # "missing": nothing
    return entries[:idx] + new + entries[idx + 1 :]


def mutate_bytes(path: Path, m: Mutation) -> None:
    data = bytearray(path.read_bytes())
    at = min(int(m.pick * len(data)), len(data) - 1)
    m.chosen.append(f"offset {at} of {len(data)}")
    if m.op == "truncate":
        del data[at:]
    else:
        data[at] ^= 0x5A
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------- other inputs


def make_rootfs(host: Host) -> Path:
    root = host.inp / "rootfs"
    (root / "app").mkdir(parents=True)
    (root / "app" / "hello").write_text("hello\n")
    return root


STORE_NAMES = (
    "0a2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-app-1.0",
    "1b2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-lib-2.0",
)


def make_store(host: Host) -> tuple[Path, list[str]]:
    """store/nix/store with an app referencing a lib; returns (store root, paths)."""
    root = host.inp / "store"
    paths = []
    for name in STORE_NAMES:
        top = root / "nix" / "store" / name
        (top / "bin").mkdir(parents=True)
        (top / "bin" / "run").write_text(f"#!/bin/sh\necho {name}\n")
        paths.append("/nix/store/" + name)
    return root, paths


def export_graph(paths: list[str]) -> list[dict[str, Any]]:
    app, lib = paths
    return [
        {"path": app, "references": [app, lib], "narSize": 100, "narHash": "sha256:a",
         "closureSize": 300},
        {"path": lib, "references": [], "narSize": 200, "narHash": "sha256:b", "closureSize": 200},
    ]  # fmt: skip


def pathinfo_graph(paths: list[str]) -> dict[str, Any]:
    app, lib = paths
    return {
        app: {"narHash": "sha256:a", "narSize": 100, "references": [lib.rsplit("/", 1)[1]]},
        lib: {"narHash": "sha256:b", "narSize": 200, "references": []},
    }


def valid_spec(host: Host, base: Path) -> dict[str, Any]:
    store_root, paths = make_store(host)
    (host.inp / "graph.json").write_text(json.dumps(export_graph(paths)))
    make_rootfs(host)
    (host.inp / "tool").write_text("tool\n")
    return {
        "name": "robust/app",
        "tag": "1",
        "max_layers": 10,
        "strategy": "popularity",
        "from_image": os.path.relpath(base, host.inp),
        "architecture": "amd64",
        "os": "linux",
        "created": EPOCH,
        "mtime": EPOCH,
        "uid": 0,
        "gid": 0,
        "uname": "root",
        "gname": "root",
        "store_root": "./store",
        "fake_nss": {"passwd": ["app:x:1000:1000::/home/app:/bin/sh"], "group": ["app:x:1000:"]},
        "extra_commands": "mkdir -p tmp",
        "permissions": [{"path": "/app*", "uid": 1000, "gid": 1000, "mode": "0750"}],
        "contents": {
            "store_paths": [paths[0]],
            "graph": "graph.json",
            "roots": ["./rootfs"],
            "files": ["./tool"],
        },
        "config": {"Cmd": ["/bin/app"], "Env": ["A=1"], "Labels": {"b": "2"}},
    }


def toml_value(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string takes JSON's escapes
    if isinstance(v, list):
        items = [toml_value(x) for x in v]
        return "[" + ", ".join(x for x in items if x is not None) + "]"
    items = [(k, toml_value(x)) for k, x in v.items()]
    return "{" + ", ".join(f"{json.dumps(k)} = {x}" for k, x in items if x is not None) + "}"


def to_toml(doc: dict[str, Any]) -> str:
    """A TOML document for doc (no None in TOML: such keys are left out)."""
    lines = []
    for k, v in doc.items():
        text = toml_value(v)
        if text is not None:
            lines.append(f"{json.dumps(k)} = {text}")
    return "\n".join(lines) + "\n"


def valid_conf(host: Host, base: Path | None) -> dict[str, Any]:
    """A stream-nix conf as nixpkgs writes it, over a store under host.inp."""
    store_root, paths = make_store(host)
    store = store_root / "nix" / "store"
    custom = store / "2c2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-customisation-layer"
    custom.mkdir()
    layer = tar_bytes({"etc/hostname": b"robust\n"})
    (custom / "layer.tar").write_bytes(layer)
    (custom / "checksum").write_text(hashlib.sha256(layer).hexdigest())
    return {
        "architecture": "amd64",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/run"]},
        "os": "linux",
        "store_dir": str(store),
        "from_image": str(base) if base else None,
        "store_layers": [[str(store / STORE_NAMES[1])], [str(store / STORE_NAMES[0])]],
        "customisation_layer": str(custom),
        "repo_tag": "robust/app:1",
        "created": EPOCH,
        "mtime": EPOCH,
        "uid": "0",
        "gid": "0",
        "uname": "root",
        "gname": "root",
    }


# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int | None
    stdout: bytes
    stderr: str
    escaped: str = ""  # type name of an exception that escaped cli.main
    tb: str = ""
    hung: bool = False
    signal: int = 0  # the run died of this signal (a crash in native code)


def run_cli(argv: list[str], host: Host, timeout: float = HANG_SECONDS) -> Outcome:
    """fastlayer.cli.main(argv), called in a fork of this process (so a hang is
    killed with every thread and child it started), with cwd = host.root,
    $TMPDIR = host.tmp, stdout/stderr to files and a memory cap."""
    result = host.root / "result.json"
    out_path, err_path = host.root / "stdout", host.root / "stderr"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        _child(argv, host, result, out_path, err_path)
    hung = not _wait(pid, timeout)
    if hung:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    status = os.waitpid(pid, 0)[1]
    release_fifos(host.root)
    stdout = out_path.read_bytes() if out_path.exists() else b""
    stderr = err_path.read_text(errors="replace") if err_path.exists() else ""
    if hung:
        return Outcome(None, stdout, stderr, hung=True)
    if os.WIFSIGNALED(status):
        return Outcome(None, stdout, stderr, signal=os.WTERMSIG(status))
    try:
        r = json.loads(result.read_text())
    except (OSError, ValueError):
        return Outcome(os.WEXITSTATUS(status), stdout, stderr, "no result (os._exit?)")
    finally:
        with contextlib.suppress(OSError):
            result.unlink()
    return Outcome(r["code"], stdout, stderr, r["escaped"], r["tb"])


def _wait(pid: int, timeout: float) -> bool:
    """True once pid has exited, False if it is still running after timeout."""
    fd = os.pidfd_open(pid)
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def _child(argv: list[str], host: Host, result: Path, out_path: Path, err_path: Path) -> None:
    code: int | None = None
    escaped, tb = "", ""
    try:
        os.setpgid(0, 0)
        os.chdir(host.root)
        tempfile.tempdir = str(host.tmp)
        os.environ["TMPDIR"] = str(host.tmp)
        _cap_memory()
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=True)  # noqa: SIM115
        sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), write_through=True)  # noqa: SIM115
        from fastlayer import cli

        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse: our argv is valid, so this is a bug too
            code = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - anything escaping is a traceback
            escaped, tb = type(e).__name__, traceback.format_exc()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        result.write_text(json.dumps({"code": code, "escaped": escaped, "tb": tb}))
    finally:
        os._exit(0)


def _cap_memory() -> None:
    """Address space capped at 3 GiB above today's, so an unbounded read fails
    fast with MemoryError instead of taking the machine."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    cap = pages * resource.getpagesize() + (3 << 30)
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(
        resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard)
    )


def last_frame(tb: str) -> str:
    lines = [x.strip() for x in tb.strip().splitlines()]
    frames = [x for x in lines if x.startswith("File ")]
    return (frames[-1] if frames else "?") + " | " + (lines[-1] if lines else "")


class Failure(AssertionError):
    pass


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink())


def check(outcome: Outcome, host: Host, verify: Callable[[], None] | None) -> str:
    """The property; returns "exit 1" or "valid", raises Failure otherwise.
    verify checks the output of an exit 0 (None: nothing to check)."""
    if outcome.hung:
        raise Failure(f"hang: no exit within {HANG_SECONDS:.0f} s")
    if outcome.signal:
        raise Failure(f"crash: killed by signal {outcome.signal}; stderr {outcome.stderr[-300:]!r}")
    if outcome.escaped:
        raise Failure(f"traceback {outcome.escaped}: {last_frame(outcome.tb)}\n{outcome.tb}")
    for p in [*files_under(host.out), *files_under(host.tmp)]:
        if p.is_file() and not p.is_symlink() and host.leaked(_readable(p)):
            raise Failure(f"secret marker in output file {p.relative_to(host.root)}")
    if host.leaked(outcome.stdout) or host.leaked(outcome.stderr.encode()):
        raise Failure("secret marker on stdout/stderr")
    if "Traceback" in outcome.stderr:
        raise Failure(f"traceback text on stderr: {outcome.stderr[-500:]}")
    left_tmp = [str(p.relative_to(host.root)) for p in host.tmp.iterdir()]
    if outcome.code == 1:
        lines = outcome.stderr.splitlines()
        if len(lines) != 1 or not lines[0].startswith(PREFIX) or not outcome.stderr.endswith("\n"):
            raise Failure(f"exit 1 but stderr is not one '{PREFIX}' line: {outcome.stderr!r:.600}")
        left = [str(p.relative_to(host.root)) for p in host.out.iterdir()]
        if left or left_tmp:
            raise Failure(f"exit 1 left files behind: {left + left_tmp}")
        return "exit 1"
    if outcome.code != 0:
        raise Failure(f"exit {outcome.code}; stderr {outcome.stderr!r:.300}")
    if left_tmp:
        raise Failure(f"exit 0 left files in $TMPDIR: {left_tmp}")
    if verify is not None:
        try:
            verify()
        except Failure:
            raise
        except Exception as e:  # noqa: BLE001 - an unreadable output is a bad output
            raise Failure(f"bad output: {type(e).__name__}: {str(e)[:200]}") from None
    return "valid"


def _readable(p: Path) -> bytes:
    """A file's bytes, plus its decompressed bytes when it is gzip."""
    data = p.read_bytes()
    if data.startswith(b"\x1f\x8b"):
        with contextlib.suppress(Exception):
            data += gzip.decompress(data)
    return data


# --------------------------------------------------------------------------- output checks


def _member_bytes(t: tarfile.TarFile, by_name: dict[str, tarfile.TarInfo], name: str) -> bytes:
    """A member's bytes, following links inside the archive only (as a loader would)."""
    for _ in range(16):
        m = by_name.get(os.path.normpath(name).lstrip("/"))
        if m is None:
            raise Failure(f"bad image: member {name!r} is missing")
        if m.isfile():
            f = t.extractfile(m)
            assert f is not None
            return f.read()
        if m.issym():
            target = os.path.normpath(os.path.join(os.path.dirname(m.name), m.linkname))
            if os.path.isabs(m.linkname) or target.startswith(".."):
                raise Failure(f"bad image: {m.name!r} links out of the archive: {m.linkname!r}")
            name = target
        elif m.islnk():
            name = m.linkname
        else:
            raise Failure(f"bad image: member {name!r} is not a regular file (type {m.type!r})")
    raise Failure(f"bad image: link loop at {name!r}")


def verify_docker_archive(path: Path, min_images: int = 1) -> None:
    """manifest.json lists images whose config and layers exist, and every layer's
    sha256 (decompressed if gzip) is its config's diff_id."""
    try:
        t = tarfile.open(path)
    except (OSError, tarfile.TarError) as e:
        raise Failure(f"bad image: {path.name} is not a tar: {e}") from None
    with t:
        by_name = {os.path.normpath(m.name).lstrip("/"): m for m in t.getmembers()}
        manifest = json.loads(_member_bytes(t, by_name, "manifest.json"))
        if not isinstance(manifest, list) or len(manifest) < min_images:
            raise Failure(f"bad image: manifest.json is {str(manifest)[:200]}")
        for entry in manifest:
            if not isinstance(entry, dict):
                raise Failure(f"bad image: manifest entry {str(entry)[:100]}")
            config = json.loads(_member_bytes(t, by_name, entry.get("Config", "")))
            diff_ids = (
                config.get("rootfs", {}).get("diff_ids") if isinstance(config, dict) else None
            )
            layers = entry.get("Layers")
            if not isinstance(diff_ids, list) or not isinstance(layers, list):
                raise Failure(f"bad image: diff_ids {diff_ids!r:.100} layers {layers!r:.100}")
            if len(diff_ids) != len(layers):
                raise Failure(f"bad image: {len(layers)} layers, {len(diff_ids)} diff_ids")
            for name, diff_id in zip(layers, diff_ids, strict=True):
                data = _member_bytes(t, by_name, name)
                if data.startswith(b"\x1f\x8b"):
                    data = gzip.decompress(data)
                if sha256(data) != diff_id:
                    raise Failure(f"bad image: layer {name} has sha256 {sha256(data)}, "
                                  f"diff_id {diff_id}")  # fmt: skip
                verify_layer_tar(name, data)
            verify_config(config)


def verify_layer_tar(name: str, data: bytes) -> None:
    """A layer is a tar whose owners and modes are in range (no uid -1)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as layer:
            members = layer.getmembers()
    except tarfile.TarError as e:
        raise Failure(f"bad image: layer {name} is not a tar: {e}") from None
    for m in members:
        if not (0 <= m.uid < 2**32 and 0 <= m.gid < 2**32 and 0 <= m.mode <= 0o7777):
            raise Failure(f"bad image: layer {name}: {m.name} has uid {m.uid} gid {m.gid} "
                          f"mode {m.mode:o}")  # fmt: skip


def verify_config(config: dict[str, Any]) -> None:
    """The fields image tools read have the types the image spec gives them."""
    cfg = config.get("config") or {}
    if not isinstance(cfg, dict):
        raise Failure(f"bad image: config.config is {cfg!r:.100}")
    for key in ("Env", "Cmd", "Entrypoint"):
        value = cfg.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(x, str) for x in value)
        ):
            raise Failure(f"bad image: config.config.{key} is {value!r:.100}")
    for key in ("Labels", "ExposedPorts", "Volumes"):
        if not isinstance(cfg.get(key, {}), dict | type(None)):
            raise Failure(f"bad image: config.config.{key} is {cfg[key]!r:.100}")


def verify_plan(path: Path, max_layers: int | None, base_layers: int) -> None:
    plan = json.loads(path.read_text())
    layers = plan.get("layers")
    if not isinstance(layers, list):
        raise Failure(f"bad plan: layers {layers!r:.100}")
    seen: set[str] = set()
    for layer in layers:
        paths = layer.get("paths") or []
        if not paths:
            raise Failure("bad plan: an empty layer")
        for p in paths:
            if p in seen:
                raise Failure(f"bad plan: {p} in two layers")
            seen.add(p)
    budget = plan.get("budget")
    if max_layers is not None:
        if not isinstance(budget, int) or budget > max_layers or budget < 1:
            raise Failure(f"bad plan: budget {budget!r} for --max-layers {max_layers} "
                          f"--base-layers {base_layers}")  # fmt: skip
        if len(layers) > budget:
            raise Failure(f"bad plan: {len(layers)} layers over budget {budget}")


def verify_rank(path: Path) -> None:
    lines = path.read_text().splitlines()
    if len(lines) != len(set(lines)):
        raise Failure("bad rank: a path printed twice")


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    kind: str  # input kind: a base kind, spec-json, spec-toml, nix-conf, graph-export, ...
    command: str
    mutation: Mutation
    args: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        extra = "".join(f" {k}={v!r}" for k, v in self.args.items())
        return f"{self.kind} | {self.command}{extra} | {self.mutation.describe()}"


def run_case(case: Case, host: Host) -> str:
    """Build the case's input under host, run its command, check the property."""
    return RUNNERS[case.command](case, host)


def _base_build(case: Case, host: Host) -> str:
    base = build_base(case.kind, case.mutation, host)
    make_rootfs(host)
    spec = {
        "name": "robust/app",
        "from_image": str(base),
        "contents": {"roots": [str(host.inp / "rootfs")]},
        "config": {"Cmd": ["/app/hello"]},
    }
    (host.inp / "spec.json").write_text(json.dumps(spec))
    out = host.out / "out.tar"
    o = run_cli(["build", "-q", str(host.inp / "spec.json"), "-o", str(out)], host)
    return check(o, host, lambda: verify_docker_archive(out))


def _base_stream_nix(case: Case, host: Host) -> str:
    base = build_base(case.kind, case.mutation, host)
    conf = valid_conf(host, base)
    (host.inp / "conf.json").write_text(json.dumps(conf))
    out = host.out / "out.tar"
    o = run_cli(["stream-nix", "-q", str(host.inp / "conf.json"), "-o", str(out)], host)
    return check(o, host, lambda: verify_docker_archive(out))


def _base_inspect(case: Case, host: Host) -> str:
    base = build_base(case.kind, case.mutation, host)
    return check(run_cli(["inspect", str(base)], host), host, None)


def _base_merge(case: Case, host: Host) -> str:
    base = build_base(case.kind, case.mutation, host)
    other = host.inp / "other.tar"
    write_tar(other, docker_entries(lambda role, doc: doc, {}))
    out = host.out / "merged.tar"
    o = run_cli(["merge", str(base), str(other), "-o", str(out)], host)
    return check(o, host, lambda: verify_docker_archive(out, min_images=2))


def _spec_build(case: Case, host: Host) -> str:
    base = build_base("docker-archive", Mutation("none"), host)
    spec = valid_spec(host, base)
    doc = (
        mutate_json(spec, case.mutation, host, host.inp) if case.mutation.level != "none" else spec
    )
    if isinstance(doc, bytes):
        text = doc
    elif case.kind == "spec-toml" and isinstance(doc, dict):
        text = to_toml(doc).encode()
    else:
        text = json.dumps(doc).encode()
    path = host.inp / ("spec.toml" if case.kind == "spec-toml" else "spec.json")
    path.write_bytes(text)
    out = host.out / "out.tar"
    o = run_cli(["build", "-q", str(path), "-o", str(out)], host)
    return check(o, host, lambda: verify_docker_archive(out))


def _conf_stream_nix(case: Case, host: Host) -> str:
    base = build_base("docker-archive", Mutation("none"), host)
    conf = valid_conf(host, base)
    doc = (
        mutate_json(conf, case.mutation, host, host.inp) if case.mutation.level != "none" else conf
    )
    path = host.inp / "conf.json"
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    out = host.out / "out.tar"
    o = run_cli(["stream-nix", "-q", str(path), "-o", str(out)], host)
    return check(o, host, lambda: verify_docker_archive(out))


def _graph_file(case: Case, host: Host) -> Path:
    paths = ["/nix/store/" + n for n in STORE_NAMES]
    graph = export_graph(paths) if case.kind == "graph-export" else pathinfo_graph(paths)
    m = case.mutation
    doc = mutate_json(graph, m, host, host.inp) if m.level != "none" else graph
    path = host.inp / "graph.json"
    path.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    return path


def _graph_rank(case: Case, host: Host) -> str:
    out = host.out / "rank.txt"
    o = run_cli(["rank", str(_graph_file(case, host)), "-o", str(out)], host)
    return check(o, host, lambda: verify_rank(out))


def _graph_plan(case: Case, host: Host) -> str:
    out = host.out / "plan.json"
    n, base, strategy = case.args["max_layers"], case.args["base_layers"], case.args["strategy"]
    argv = ["plan", str(_graph_file(case, host)), "-o", str(out), "--strategy", strategy]
    argv += ["--max-layers", str(n), "--base-layers", str(base)]
    o = run_cli(argv, host)
    return check(o, host, lambda: verify_plan(out, n, base))


RUNNERS: dict[str, Callable[[Case, Host], str]] = {
    "build": _base_build,
    "stream-nix": _base_stream_nix,
    "inspect": _base_inspect,
    "merge": _base_merge,
    "build-spec": _spec_build,
    "stream-nix-conf": _conf_stream_nix,
    "rank": _graph_rank,
    "plan": _graph_plan,
}
SPEC_VALUES = (*VALUES, "now", "gzip", "oci-dir", "0750", 700, ["/dev/zero"], ["<fifo>"])
GRAPH_VALUES = (*VALUES, "/nix/store/0a2k8c1n7dq5h0d8z2b4l6c1w3x4y5z6-app-1.0", "sha256:a")
# Mostly sensible numbers, with the edges among them.
MAX_LAYERS = (2, 3, 10, 100, 2, 3, 10, 1, 0, -1, 2**31, 2**70)
BASE_LAYERS = (0, 0, 0, 1, 1, 5, -10, 2**70)
PLAN_STRATEGIES = ("popularity", "limit", "auto", "shared")


def draw_case(p: Pick, command: str, kind: str | None = None) -> Case:
    """A case for command; kind defaults to one drawn from those it takes."""
    if command in ("build", "stream-nix", "inspect", "merge"):
        kinds = ("docker-archive", "docker-archive-gz") if command == "merge" else BASE_KINDS
        kind = kind or p.one(kinds)
        return Case(kind, command, draw_base_mutation(p, kind))
    if command == "build-spec":
        kind = kind or p.one(("spec-json", "spec-toml"))
        return Case(kind, command, _maybe(p, draw_json_mutation(p, ("spec",), SPEC_VALUES)))
    if command == "stream-nix-conf":
        m = draw_json_mutation(p, ("conf",), SPEC_VALUES)
        return Case("nix-conf", command, _maybe(p, m))
    kind = kind or p.one(("graph-export", "graph-pathinfo"))
    m = _maybe(p, draw_json_mutation(p, ("graph",), GRAPH_VALUES))
    if command == "rank":
        return Case(kind, command, m)
    args = {
        "max_layers": p.one(MAX_LAYERS),
        "base_layers": p.one(BASE_LAYERS),
        "strategy": p.one(PLAN_STRATEGIES),
    }
    return Case(kind, command, m, args)


def _maybe(p: Pick, m: Mutation) -> Mutation:
    """Now and then the valid input itself: it must give a correct output."""
    return Mutation("none") if p.fraction() < 0.05 else m


def warm() -> None:
    """Import what the commands import, once, so each forked run starts warm."""
    import importlib

    from fastlayer import cli

    cli.build_parser()
    for name in ("builder", "graph", "plan", "nixconf", "sources.base_image"):
        with contextlib.suppress(ImportError):
            importlib.import_module(f"fastlayer.{name}")


def in_fresh_dir(fn: Callable[[Host], T]) -> T:
    """fn(host) in a new example directory, removed afterwards."""
    import shutil

    root = Path(tempfile.mkdtemp(prefix="fl-robust-"))
    try:
        return fn(make_host(root / "x"))
    finally:
        release_fifos(root)
        shutil.rmtree(root, ignore_errors=True)


def examples(default: int) -> int:
    """max_examples: default, or FASTLAYER_ROBUSTNESS_EXAMPLES when set."""
    return int(os.environ.get("FASTLAYER_ROBUSTNESS_EXAMPLES", default))


if __name__ == "__main__":  # pragma: no cover - a quick manual look
    print(sys.argv)
