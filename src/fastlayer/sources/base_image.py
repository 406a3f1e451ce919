"""Base images from disk: docker-archive (current and legacy spec, or both),
OCI image layout directories and OCI archives, with uncompressed, gzip or
zstd layers. Every reader yields the same Image model; layer bytes are read
only when a sink asks (emit.ReaderSource checks them against their diff_id
when asked to).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any, BinaryIO

from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.model import MT_DOCKER_LIST, MT_OCI_INDEX, Image, Layer

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def decompressed(raw: BinaryIO) -> BinaryIO:
    """The uncompressed bytes of a layer blob, whatever it was stored as."""
    buffered = io.BufferedReader(raw, 1 << 16) if not hasattr(raw, "peek") else raw
    head = buffered.peek(4)[:4]  # type: ignore[attr-defined]
    if head.startswith(GZIP_MAGIC):
        import gzip

        return gzip.GzipFile(fileobj=buffered, mode="rb")  # type: ignore[return-value]
    if head.startswith(ZSTD_MAGIC):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)
    return buffered  # type: ignore[return-value]


class _Files:
    """Named files of an image, in a directory or inside a tar (./ prefixes ignored)."""

    def __init__(self, path: str):
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        if not os.path.isdir(path):
            try:
                self.tar = tarfile.open(path)
            except (OSError, tarfile.TarError) as e:
                raise FastlayerError(f"cannot read image {path}: {e}") from None
            for m in self.tar.getmembers():
                self.members.setdefault(_norm(m.name), m)

    def exists(self, name: str) -> bool:
        if self.tar is None:
            return os.path.exists(os.path.join(self.path, name))
        return _norm(name) in self.members

    def open(self, name: str) -> BinaryIO:
        if self.tar is None:
            try:
                return open(os.path.join(self.path, name), "rb")
            except OSError as e:
                raise FastlayerError(
                    f"image {self.path}: cannot read {name}: {e.strerror}"
                ) from None
        member = self.members.get(_norm(name))
        f = self.tar.extractfile(member) if member is not None else None
        if f is None:  # extractfile follows symlinks and hard links to the data
            raise FastlayerError(f"image {self.path} has no file {name}")
        return f  # type: ignore[return-value]

    def json(self, name: str) -> Any:
        with self.open(name) as f:
            try:
                return json.load(f)
            except ValueError as e:
                raise FastlayerError(f"image {self.path}: {name} is not valid JSON: {e}") from None

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        return lambda: decompressed(self.open(name))

    def layer(self, name: str, diff_id: str, comment: str) -> Layer:
        size, region = self.plain(name)
        return Layer(diff_id, self.opener(name), size, comment, region)

    def plain(self, name: str) -> tuple[int | None, tuple[str, int] | None]:
        """(size, (file, offset)) of a blob stored uncompressed, where known
        without reading it; (None, None) for a compressed one."""
        with self.open(name) as f:
            head = f.read(4)
        if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
            return None, None
        if self.tar is None:
            path = os.path.join(self.path, name)
            return os.path.getsize(path), (path, 0)
        member = self.members[_norm(name)]
        while member.issym() or member.islnk():  # extractfile followed these too
            member = self.tar._find_link_target(member)  # noqa: SLF001
        raw = type(self.tar.fileobj) is io.BufferedReader  # not a decompressing stream
        return member.size, (self.path, member.offset_data) if raw else None


def _norm(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def open_image(
    path: str, tag: str | None = None, os_name: str = "linux", arch: str | None = None
) -> Image:
    """Any supported base image at path; tag picks one image of several."""
    if not os.path.exists(path):
        raise FastlayerError(f"base image does not exist: {path}")
    files = _Files(path)
    if files.exists("oci-layout"):
        return _oci(files, tag, os_name, arch)
    if files.exists("manifest.json"):
        return _docker(files, tag)
    if files.exists("repositories"):
        return _legacy(files, tag)
    raise FastlayerError(
        f"{path} is neither a docker-archive (manifest.json or repositories) nor an OCI image"
    )


def _docker(files: _Files, tag: str | None) -> Image:
    manifests = files.json("manifest.json")
    if not isinstance(manifests, list) or not manifests:
        raise FastlayerError(f"image {files.path}: manifest.json lists no image")
    entry = _pick(files.path, manifests, tag, lambda m: m.get("RepoTags") or [])
    config = files.json(entry["Config"])
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    paths = entry.get("Layers", [])
    if len(paths) != len(diff_ids):
        raise FastlayerError(
            f"image {files.path}: {len(paths)} layers but {len(diff_ids)} diff_ids in its config"
        )
    layers = [files.layer(p, d, comment=p) for p, d in zip(paths, diff_ids, strict=True)]
    return Image(config, layers, list(entry.get("RepoTags") or []))


def _legacy(files: _Files, tag: str | None) -> Image:
    """Docker image spec v1: a repositories file and a parent chain of layer dirs."""
    repos = files.json("repositories")
    choices = [(f"{name}:{t}", top) for name, tags in repos.items() for t, top in tags.items()]
    if not choices:
        raise FastlayerError(f"image {files.path}: repositories names no image")
    picked = _pick(files.path, choices, tag, lambda c: [c[0]])
    chain: list[str] = []
    layer_id: str | None = picked[1]
    while layer_id:
        if layer_id in chain:
            raise FastlayerError(f"image {files.path}: parent chain loops at {layer_id}")
        chain.append(layer_id)
        layer_id = files.json(f"{layer_id}/json").get("parent")
    chain.reverse()
    top = files.json(f"{chain[-1]}/json")
    # v1 archives carry no diff_ids: hash each layer once, here.
    layers = []
    for layer_id in chain:
        h = hashlib.sha256()
        size = 0
        with decompressed(files.open(f"{layer_id}/layer.tar")) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        diff_id = "sha256:" + h.hexdigest()
        name = f"{layer_id}/layer.tar"
        layers.append(Layer(diff_id, files.opener(name), size, comment=name))
    config = {k: top[k] for k in ("created", "author", "architecture", "os", "variant") if k in top}
    config["config"] = top.get("config") or {}
    config["rootfs"] = {"type": "layers", "diff_ids": [x.diff_id for x in layers]}
    return Image(config, layers, [picked[0]])


def _oci(files: _Files, tag: str | None, os_name: str, arch: str | None) -> Image:
    index = files.json("index.json")
    manifests = index.get("manifests") or []
    if not manifests:
        raise FastlayerError(f"image {files.path}: index.json lists no manifest")

    def names(d: dict) -> list[str]:
        ref = (d.get("annotations") or {}).get("org.opencontainers.image.ref.name")
        return [ref] if ref else []

    want = (
        tag.rsplit(":", 1)[-1] if tag and ":" in tag and tag not in _all(manifests, names) else tag
    )
    desc = _pick(files.path, manifests, want, names)
    manifest = _blob_json(files, desc)
    while manifest.get("mediaType") in (MT_OCI_INDEX, MT_DOCKER_LIST) or "manifests" in manifest:
        desc = _platform(files.path, manifest.get("manifests") or [], os_name, arch)
        manifest = _blob_json(files, desc)
    config = _blob_json(files, manifest["config"])
    diff_ids = config.get("rootfs", {}).get("diff_ids", [])
    descs = manifest.get("layers") or []
    if len(descs) != len(diff_ids):
        raise FastlayerError(
            f"image {files.path}: {len(descs)} layers but {len(diff_ids)} diff_ids in its config"
        )
    layers = [
        files.layer(_blob_path(x["digest"]), d, comment=x["digest"])
        for x, d in zip(descs, diff_ids, strict=True)
    ]
    return Image(config, layers, names(desc))


def _all(items: list, names: Callable[[Any], list[str]]) -> list[str]:
    return [n for item in items for n in names(item)]


def _pick(path: str, items: list, tag: str | None, names: Callable[[Any], list[str]]) -> Any:
    if tag is None:
        if len(items) > 1:
            raise FastlayerError(
                f"image {path} holds {len(items)} images; pick one by tag: "
                + ", ".join(_all(items, names) or ["(untagged)"])
            )
        return items[0]
    for item in items:
        if tag in names(item):
            return item
    raise FastlayerError(
        f"image {path} has no image tagged {tag!r}; it has: "
        + (", ".join(_all(items, names)) or "(untagged images only)")
    )


def _platform(path: str, descs: list[dict], os_name: str, arch: str | None) -> dict:
    arch = arch or _host_arch()
    for d in descs:
        p = d.get("platform") or {}
        if p.get("os") == os_name and p.get("architecture") == arch:
            return d
    raise FastlayerError(f"image {path} has no {os_name}/{arch} manifest")


def _host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def _blob_path(digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return f"blobs/{algo}/{hexpart}"


def _blob_json(files: _Files, desc: dict) -> Any:
    """A small JSON blob, checked against its descriptor's digest."""
    with files.open(_blob_path(desc["digest"])) as f:
        data = f.read()
    if "sha256:" + hashlib.sha256(data).hexdigest() != desc["digest"]:
        raise DigestMismatch(f"image {files.path}: blob {desc['digest']} does not match its digest")
    return json.loads(data)
