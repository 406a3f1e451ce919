"""Base images from disk: docker-archive (current and legacy spec, or both),
OCI image layout directories and OCI archives, with uncompressed, gzip or
zstd layers. Every reader yields the same Image model; layer bytes are read
only when a sink asks (emit.ReaderSource checks them against their diff_id
when asked to).
"""

from __future__ import annotations

import hashlib
import io
import lzma
import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Callable
from typing import Any, BinaryIO

from fastlayer import untrusted as u
from fastlayer.emit import RegionHasher
from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.model import MT_DOCKER_LIST, MT_OCI_INDEX, Image, Layer
from fastlayer.sources import schema
from fastlayer.untrusted import Invalid

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


# Errors a damaged tar, gzip or zstd stream raises while it is read.
_READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
)
# symlink/hard link members followed at most this many hops (tar has no loop check)
MAX_LINKS = 32


def read_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (*_READ_ERRORS, zstandard.ZstdError)


class Guarded:
    """A reader whose read failures (truncated or corrupt data) become one
    FastlayerError naming what was being read."""

    def __init__(self, f: BinaryIO, where: str):
        self.f = f
        self.where = where

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except read_errors() as e:
            raise FastlayerError(f"{self.where}: cannot read: {_reason(e)}") from None

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> Guarded:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text.splitlines()[0] if text else type(e).__name__


class _Files:
    """Named files of an image, in a directory or inside a tar.

    Every name is checked (untrusted.member_name) and must resolve to a
    regular file of this image: inside the directory (symlinks followed only
    while they stay inside), or a regular member of the tar (symlink and hard
    link members followed only to other members, MAX_LINKS hops at most)."""

    def __init__(self, path: str):
        self.path = path
        self.tar: tarfile.TarFile | None = None
        self.members: dict[str, tarfile.TarInfo] = {}
        self.duplicates: set[str] = set()
        self.size = 0
        st = _stat(path)
        if stat.S_ISDIR(st.st_mode):
            return
        if not stat.S_ISREG(st.st_mode):
            raise Invalid(f"image {path}: is {u.file_kind(st.st_mode)}, not a file or directory")
        raw = u.open_regular(path, "image")
        self.size = os.fstat(raw.fileno()).st_size
        try:
            try:
                self.tar = tarfile.open(fileobj=raw)
            except tarfile.ReadError:  # tarfile's own words end in a bare colon
                raw.close()
                raise Invalid(
                    f"image {path}: not a tar archive (uncompressed, gzip, bzip2 or xz); "
                    "an image is a docker-archive, an OCI archive or an OCI layout directory"
                ) from None
            for m in self.tar.getmembers():
                try:
                    name = u.member_name(m.name, "")
                except Invalid:  # a name no manifest can reach: never read
                    continue
                if name in self.members:  # readers disagree on which copy counts
                    self.duplicates.add(name)
                self.members[name] = m
        except read_errors() as e:
            raw.close()
            raise FastlayerError(f"cannot read image {path}: {_reason(e)}") from None
        self._raw = raw

    def where(self, name: str) -> str:
        return f"image {self.path}: {name}"

    def exists(self, name: str) -> bool:
        if self.tar is None:
            return os.path.lexists(os.path.join(self.path, name))
        return name in self.members

    def member(self, name: str, where: str) -> tarfile.TarInfo:
        """The regular member name resolves to, through links inside the archive."""
        current = u.member_name(name, where)
        for _ in range(MAX_LINKS):
            if current in self.duplicates:
                raise Invalid(f"{where}: the archive holds {u.short(current)} more than once")
            m = self.members.get(current)
            if m is None:
                raise Invalid(f"{where}: {u.short(name)} is not in the archive")
            if m.isreg():
                return m
            if not (m.issym() or m.islnk()):
                kind = "a directory" if m.isdir() else "a device or fifo"
                raise Invalid(f"{where}: {u.short(name)} is {kind}, not a regular file")
            current = _link_target(m, where)
        raise Invalid(f"{where}: {u.short(name)}: more than {MAX_LINKS} links (a loop?)")

    def open(self, name: str, where: str | None = None) -> BinaryIO:
        where = where or self.where(name)
        if self.tar is None:
            return u.open_inside(self.path, name, where)
        f = self.tar.extractfile(self.member(name, where))
        assert f is not None  # a regular member always has a reader
        return f  # type: ignore[return-value]

    def json(self, name: str, where: str | None = None) -> Any:
        where = where or self.where(name)
        with self.open(name, where) as f:
            return u.read_json(Guarded(f, where), where)  # type: ignore[arg-type]

    def opener(self, name: str) -> Callable[[], BinaryIO]:
        where = self.where(name)
        return lambda: Guarded(decompressed(self.open(name, where)), where)  # type: ignore[return-value]

    def layer(self, name: str, diff_id: str, comment: str) -> Layer:
        size, region = self.plain(name)
        return Layer(diff_id, self.opener(name), size, comment, region)

    def plain(self, name: str) -> tuple[int | None, tuple[str, int] | None]:
        """(size, (file, offset)) of a blob stored uncompressed, where known
        without reading it; (None, None) for a compressed one."""
        where = self.where(name)
        with self.open(name, where) as f:
            head = Guarded(f, where).read(4)
        if head.startswith(GZIP_MAGIC) or head.startswith(ZSTD_MAGIC):
            return None, None
        if self.tar is None:
            path = u.resolve_inside(self.path, name, where)
            return os.path.getsize(path), (path, 0)
        member = self.member(name, where)
        raw = type(self.tar.fileobj) is io.BufferedReader  # not a decompressing stream
        if raw and member.offset_data + member.size > self.size:
            raise FastlayerError(f"{where}: truncated (the archive ends inside it)")
        return member.size, (self.path, member.offset_data) if raw else None


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        raise FastlayerError(f"cannot read image {path}: {e.strerror}") from None


def _link_target(m: tarfile.TarInfo, where: str) -> str:
    """The member name a link member points to; it must stay inside the archive."""
    if m.issym():  # relative to the link's directory
        if m.linkname.startswith("/"):
            raise Invalid(f"{where}: {m.name} links outside the archive ({u.short(m.linkname)})")
        target = posixpath.normpath(posixpath.join(posixpath.dirname(m.name), m.linkname))
    else:  # hard links name a member from the archive's root
        target = m.linkname
    if target == ".." or target.startswith("../") or target.startswith("/"):
        raise Invalid(f"{where}: {m.name} links outside the archive ({u.short(m.linkname)})")
    return u.member_name(target, where)


def open_image(
    path: str, tag: str | None = None, os_name: str = "linux", arch: str | None = None
) -> Image:
    """Any supported base image at path; tag picks one image of several."""
    if not os.path.lexists(path):
        if path.startswith("docker://"):
            raise FastlayerError(f"{path} is in a registry: fetch it to a file first "
                                 f"(fastlayer pull {path} -o FILE)")  # fmt: skip
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
    where = files.where("manifest.json")
    manifests = schema.docker_manifest(files.json("manifest.json"), where)
    entry = _pick(files.path, manifests, tag, lambda m: m.get("RepoTags") or [])
    config = schema.image_config(files.json(entry["Config"]), files.where(entry["Config"]))
    paths = entry["Layers"]
    diff_ids = schema.diff_ids_match(len(paths), config, f"image {files.path}")
    layers = [files.layer(p, d, comment=p) for p, d in zip(paths, diff_ids, strict=True)]
    return _announced(Image(config, layers, list(entry.get("RepoTags") or [])))


# A v1 parent chain longer than this is no image (docker caps layers at 127).
MAX_CHAIN = 1000


def _legacy(files: _Files, tag: str | None) -> Image:
    """Docker image spec v1: a repositories file and a parent chain of layer dirs."""
    repos = schema.repositories(files.json("repositories"), files.where("repositories"))
    choices = [(f"{name}:{t}", top) for name, tags in repos.items() for t, top in tags.items()]
    if not choices:
        raise FastlayerError(f"image {files.path}: repositories names no image")
    picked = _pick(files.path, choices, tag, lambda c: [c[0]])
    chain: list[str] = []
    metas: list[dict] = []
    layer_id: str | None = picked[1]
    while layer_id:
        if layer_id in chain:
            raise FastlayerError(f"image {files.path}: parent chain loops at {layer_id}")
        if len(chain) >= MAX_CHAIN:
            raise FastlayerError(f"image {files.path}: parent chain longer than {MAX_CHAIN}")
        chain.append(layer_id)
        where = files.where(f"{layer_id}/json")
        meta = u.of_type(files.json(f"{layer_id}/json"), dict, where)
        metas.append(meta)
        parent = u.field(meta, "parent", (str, type(None)), where, default=None)
        layer_id = schema.layer_dir(parent, f"{where}.parent") if parent else None
    chain.reverse()
    top = metas[0]
    # v1 archives carry no diff_ids: hash each layer once, here.
    layers = []
    for layer_id in chain:
        name = f"{layer_id}/layer.tar"
        with files.opener(name)() as f:
            digest, size = _hash_tar(f, files.where(name))
        diff_id = "sha256:" + digest
        layers.append(Layer(diff_id, files.opener(name), size, comment=name))
    config = {k: top[k] for k in ("created", "author", "architecture", "os", "variant") if k in top}
    config["config"] = top.get("config") or {}
    config["rootfs"] = {"type": "layers", "diff_ids": [x.diff_id for x in layers]}
    schema.image_config(config, files.where(f"{chain[-1]}/json"))
    return Image(config, layers, [picked[0]])


class HashingReader:
    """A reader that hashes and counts every byte read through it (a layer
    checked while it is copied or parsed)."""

    def __init__(self, f: BinaryIO | Guarded):
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        self.size += len(data)
        return data


def _hash_tar(f: BinaryIO, where: str) -> tuple[str, int]:
    """(sha256 hex, size) of a legacy layer, which must parse as a tar: with no
    digest to check it against, a damaged header is the one damage we can see."""
    tee = HashingReader(f)
    try:
        with tarfile.open(fileobj=tee, mode="r|") as tar:  # type: ignore[call-overload]
            for _ in tar:  # headers checked; the data is read past (and hashed)
                pass
    except tarfile.TarError as e:
        raise Invalid(f"{where}: not a tar archive ({_reason(e)})") from None
    while tee.read(1 << 20):  # the zero blocks and padding after the end marker
        pass
    return tee.digest.hexdigest(), tee.size


_REF_NAME = "org.opencontainers.image.ref.name"
# Nested image indexes followed at most this deep.
MAX_INDEX_DEPTH = 8


def _oci(files: _Files, tag: str | None, os_name: str, arch: str | None) -> Image:
    manifests = schema.oci_index(files.json("index.json"), files.where("index.json"))
    if not manifests:
        raise FastlayerError(f"image {files.path}: index.json lists no manifest")

    def names(d: dict) -> list[str]:
        """The full `name:tag` (io.containerd.image.name) first, then the tag
        (ref.name): either picks the image."""
        notes = d.get("annotations") or {}
        found = (notes.get("io.containerd.image.name"), notes.get(_REF_NAME))
        return list(dict.fromkeys(n for n in found if n))

    want = (
        tag.rsplit(":", 1)[-1] if tag and ":" in tag and tag not in _all(manifests, names) else tag
    )
    desc = _pick(files.path, manifests, want, names)
    picked = desc  # its names are the image's, whichever platform is taken below
    manifest = _blob_json(files, desc)
    for _ in range(MAX_INDEX_DEPTH):
        if not _is_index(manifest):
            break
        where = files.where(u.blob_path(desc["digest"], ""))
        desc = _platform(files.path, schema.oci_index(manifest, where), os_name, arch)
        manifest = _blob_json(files, desc)
    else:
        raise FastlayerError(f"image {files.path}: image indexes nested too deeply")
    where = files.where(u.blob_path(desc["digest"], ""))
    config_desc, descs = schema.oci_manifest(manifest, where)
    config_where = files.where(u.blob_path(config_desc["digest"], ""))
    config = schema.image_config(_blob_json(files, config_desc), config_where)
    diff_ids = schema.diff_ids_match(len(descs), config, f"image {files.path}")
    layers = [
        files.layer(u.blob_path(x["digest"], ""), d, comment=x["digest"])
        for x, d in zip(descs, diff_ids, strict=True)
    ]
    return _announced(Image(config, layers, names(picked)[:1]))


def _announced(image: Image) -> Image:
    """Tell emit where the layers stored as they are lie, so a verified copy
    can hash the next ones while it copies this one."""
    regions = [(x.region[0], x.region[1], x.size) for x in image.layers if x.region and x.size]
    RegionHasher.hash_ahead(regions)  # type: ignore[arg-type]
    return image


def _is_index(doc: object) -> bool:
    return isinstance(doc, dict) and (
        doc.get("mediaType") in (MT_OCI_INDEX, MT_DOCKER_LIST) or "manifests" in doc
    )


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
    have = [
        "/".join(str(p[k]) for k in ("os", "architecture", "variant") if p.get(k))
        for p in (d.get("platform") or {} for d in descs)
    ]
    raise FastlayerError(
        f"image {path} has no {os_name}/{arch} manifest; it has: "
        + (", ".join(h for h in have if h) or "no platform named")
    )


def _host_arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(machine, machine)


def _blob_json(files: _Files, desc: dict) -> Any:
    """A small JSON blob, checked against its descriptor's size and digest."""
    name = u.blob_path(desc["digest"], files.where("descriptor"))
    where = files.where(name)
    if desc["size"] > u.MAX_JSON:
        raise Invalid(f"{where}: descriptor size {desc['size']} is over {u.MAX_JSON} bytes")
    with files.open(name, where) as f:
        data = u.read_capped(Guarded(f, where), where)  # type: ignore[arg-type]
    algo, _, hexpart = desc["digest"].partition(":")
    if hashlib.new(algo, data).hexdigest() != hexpart or len(data) != desc["size"]:
        raise DigestMismatch(f"{where}: does not match its descriptor's digest and size")
    return u.parse_json(data, where)
