"""`fastlayer push`: an image (built now, or on disk) into a registry, uploading only
what the registry lacks.

Each layer's tar is produced once, hashed as it goes (its diff_id), then a
worker thread ships it while the next layer is produced:

- the blob cache (cache.py) names a blob for that diff_id and the registry
  still has it (HEAD), or another repository there has it and it mounts:
  done, nothing compressed or sent;
- else the compressed blob (deterministic gzip or zstd, sinks/compress.py:
  the same tar always gives the same blob) is HEADed, mounted if another
  repository holds it, and uploaded (POST + monolithic PUT) only if still
  missing.

When to compress: if the cache knows blobs of this repository (a re-push),
the tar goes to a spool first, so a cache hit skips compression; on a first
push (few hits expected) it is compressed as it is produced, which takes
compression off the critical path of large layers. Either way no blob is
uploaded that a HEAD finds. Base layers whose diff_id is known before
reading (docker-archive, OCI layout) are looked up before being read at
all; compressed blobs of an OCI layout are HEADed and sent as they are,
never recompressed. Then the config, the manifest by digest, and the tag.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from fastlayer import untrusted
from fastlayer.emit import ReaderSource
from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.model import (
    MT_OCI_CONFIG,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_OCI_MANIFEST,
    Known,
    LayerSource,
    WrittenLayer,
)
from fastlayer.registry.cache import Blob, BlobCache
from fastlayer.registry.client import DEADLINE, STALL, Registry
from fastlayer.registry.pull import TO_OCI, kind_of
from fastlayer.registry.reference import Reference, parse_reference
from fastlayer.sinks.base import ImageRecord, config_bytes
from fastlayer.sinks.compress import blob_kind, compressor, pump_compressed
from fastlayer.sinks.spool import HashingSpool, Spool

LAYER_TYPES = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}
CHUNK = 1 << 20
WORKERS = 3


@dataclass
class PushStats:
    """Counts of layers (present + mounted + uploaded == layers); the config's
    fate apart, as it is no layer."""

    layers: int = 0
    present: int = 0  # the registry had the layer's blob (HEAD)
    mounted: int = 0  # mounted from another repository
    uploaded: int = 0  # layer blobs sent
    uploaded_bytes: int = 0  # every blob sent, config included
    compressed: int = 0  # layers compressed here
    unread: int = 0  # base layers never read (cache + HEAD)
    config: str = ""  # "present", "mounted" or "uploaded"

    def summary(self) -> str:
        noun = "layer" if self.layers == 1 else "layers"
        return (
            f"{self.layers} {noun}: {self.present} present, {self.mounted} mounted, "
            f"{self.uploaded} uploaded, {self.compressed} compressed; config {self.config}; "
            f"{self.uploaded_bytes / (1 << 20):.1f} MiB sent"
        )


@dataclass
class PushResult:
    reference: Reference
    tag: str
    digest: str  # of the manifest
    config_digest: str
    layers: list[WrittenLayer]
    stats: PushStats = field(default_factory=PushStats)
    build: Any = None  # the builder's BuildResult, for a pushed spec
    manifest_size: int = 0


class Body:
    """A request body of known size, read in 1 MiB pieces, that can rewind (auth retry).

    With check, the bytes are hashed as they go and must be exactly size bytes
    of that digest: a mismatch raises before the last piece leaves, so the
    registry never receives the whole of a tampered blob."""

    def __init__(
        self, open_: Callable[[], BinaryIO], size: int, update: Callable[[int], Any],
        check: str | None = None,
    ):  # fmt: skip
        self._open, self.size, self._update, self._check = open_, size, update, check
        self._f: BinaryIO | None = None
        self._hash = hashlib.sha256()
        self._sent = 0

    def __len__(self) -> int:
        return self.size

    def read(self, n: int = -1) -> bytes:
        if self._f is None:
            self._f = self._open()
        # n is the HTTP client's send block: each block must leave within the stall limit
        want = min(n if n > 0 else CHUNK, CHUNK, self.size - self._sent + 1)
        chunk = self._f.read(want)
        if self._check is not None:
            self._hash.update(chunk)
            self._sent += len(chunk)
            if not chunk or self._sent >= self.size:
                self._verify()
        self._update(len(chunk))
        return chunk

    def _verify(self) -> None:
        got = "sha256:" + self._hash.hexdigest()
        if self._sent != self.size or got != self._check:
            raise DigestMismatch(
                f"blob {self._check} to push is {self._sent} bytes hashing to {got}, "
                f"not {self.size} bytes of that digest"
            )

    def seek(self, pos: int, whence: int = 0) -> None:
        self.close()
        self._hash = hashlib.sha256()
        self._sent = 0

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def _spool_reader(spool: Spool) -> Callable[[], BinaryIO]:
    def open_() -> BinaryIO:
        f = os.fdopen(os.dup(spool.fd), "rb", buffering=0)
        f.seek(0)  # a dup shares the offset, which the writes left at the end
        return f  # type: ignore[return-value]

    return open_


def blob_cache(registry: str, cache: Any) -> BlobCache:
    """The blob cache as a build's cache argument says: a directory (or an open
    LayerCache) holds its registry-blobs.json, False (--no-cache) keeps it in
    memory, None: the default one."""
    if cache is False:
        return BlobCache(registry, persist=False)
    if cache is None or cache is True:
        return BlobCache(registry)
    root = getattr(cache, "root", None) or os.fspath(cache)
    return BlobCache(registry, os.path.join(root, "registry-blobs.json"))


class RegistrySink:
    """An image sink (sinks/base.py's protocol) that pushes to one repository.

    add_layer returns at once after producing the layer; the digest and
    blob_size of the returned WrittenLayer are filled in when its worker
    ends, and finish() waits for every worker before the manifest."""

    def __init__(
        self, reg: Registry, repo: str, kind: str = "gzip", workers: int = WORKERS,
        progress: bool = False, cache: Any = None,
    ):  # fmt: skip
        """cache: as a build's cache argument (see blob_cache)."""
        if kind not in LAYER_TYPES:
            raise FastlayerError(f"unknown compression {kind!r}; use gzip, zstd or none")
        self.reg, self.repo, self.kind = reg, repo, kind
        self.cache = blob_cache(reg.registry, cache)
        self.stats = PushStats()
        self.layers: list[WrittenLayer] = []
        self._pool = ThreadPoolExecutor(workers, "fastlayer-push")
        self._slots = threading.BoundedSemaphore(workers + 1)  # spools in flight
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._held: dict[str, Blob] = {}  # diff_id -> blob the repository has (skips)
        self.untagged = False  # put the manifest by digest only (an index's member)
        self.manifest_size = 0
        # blob digest -> a repository of this registry said to hold it (a layer cache
        # shared through the registry): its size checked there, then mounted from there
        self.mount_sources: dict[str, str] = {}
        # (registry, repository, digest) -> the blob's size there: a HEAD, or a layer
        # cache's source_size (cache/remote.py), one HEAD per blob for a whole batch
        self.source_size: Callable[[Registry, str, str], int | None] = _blob_size
        self.mount_fallback: str | None = None  # that cache's repository, for other blobs
        self.takes_shared = True  # False: the shared cache is on another registry
        self._bar = _bar() if progress else None
        # Compress as produced when the cache knows nothing of this repository (a first
        # push: few hits expected); else spool first, so a cache hit skips compression.
        self._fresh = not self.cache.knows_repo(repo)

    # -- layers -----------------------------------------------------------------------

    def skips(self, known: Known) -> bool:
        """Whether the repository has (or can mount) this layer's blob, named by the
        hint or by the blob cache: then add_layer of a source with it reads nothing."""
        hint = known.blobs.get(blob_kind(self.kind))
        blob = self._reuse(known.diff_id, Blob(*hint, LAYER_TYPES[self.kind]) if hint else None)
        if blob is None:
            return False
        self._held[known.diff_id] = blob
        return True

    def add_layer(self, source: LayerSource, comment: str = "") -> WrittenLayer:
        self._raise_failed()
        self.stats.layers += 1
        known = getattr(source, "known", None)
        if known is not None and known.diff_id in self._held:
            self._count(unread=1)
            return self._written(known.diff_id, known.size, self._held[known.diff_id])
        if isinstance(source, ReaderSource):  # diff_id known before reading
            blob = self._reuse(source.layer.diff_id)
            if blob is not None:
                self._count(unread=1)
                return self._written(source.layer.diff_id, source.size or 0, blob)
        self._slots.acquire()
        spool = Spool(source.size)
        try:
            if self._fresh and self.kind != "none":
                # no blob of this repository is known: expect to upload, so compress
                # while producing rather than after (HEAD still precedes any upload)
                hashing = HashingSpool(spool)
                hexd, size = pump_compressed(source, self.kind, hashing)
                self._count(compressed=1)
                blob = Blob(hashing.digest(), spool.size, LAYER_TYPES[self.kind])
                w = WrittenLayer(f"sha256:{hexd}", size, blob.digest, blob.size, blob.media_type)
                task = functools.partial(self._ship_blob, spool, blob, w.diff_id)
            else:
                hexd = source.pump(spool.write)
                w = WrittenLayer(f"sha256:{hexd}", spool.size, "", 0, LAYER_TYPES[self.kind])
                task = functools.partial(self._ship_layer, spool, w)
        except BaseException:
            spool.close()
            self._slots.release()
            raise
        self.layers.append(w)
        self._futures.append(self._pool.submit(task))
        return w

    def _ship_blob(self, spool: Spool, blob: Blob, diff_id: str) -> None:
        """A layer compressed as it was produced: HEAD, mount or upload."""
        try:
            self._ensure(blob, _spool_reader(spool))
            self.cache.remember(self.repo, blob, diff_id, self.kind)
        finally:
            spool.close()
            self._slots.release()

    def add_blob(self, blob: Blob, diff_id: str, open_raw: Callable[[], BinaryIO]) -> WrittenLayer:
        """A layer already compressed as blob (an OCI layout's): sent as it is, if missing."""
        self._raise_failed()
        self.stats.layers += 1
        blob = Blob(blob.digest, blob.size, TO_OCI.get(blob.media_type, blob.media_type))
        w = WrittenLayer(diff_id, 0, blob.digest, blob.size, blob.media_type)
        self.layers.append(w)

        def ship() -> None:
            self._ensure(blob, open_raw, verify=True)
            self.cache.remember(self.repo, blob, diff_id, kind_of(blob.media_type))

        self._futures.append(self._pool.submit(ship))
        return w

    def _written(self, diff_id: str, size: int, blob: Blob) -> WrittenLayer:
        w = WrittenLayer(diff_id, size, blob.digest, blob.size, blob.media_type)
        self.layers.append(w)
        return w

    def _reuse(self, diff_id: str, hint: Blob | None = None) -> Blob | None:
        """The blob of diff_id (hint, else the blob cache's) if this repository has
        it or can mount it."""
        for blob in dict.fromkeys(x for x in (hint, self.cache.layer(diff_id, self.kind)) if x):
            blob = Blob(blob.digest, blob.size, TO_OCI.get(blob.media_type, blob.media_type))
            # a blob a shared layer cache names is rarely here yet: mount first (a mount
            # of a blob the repository has succeeds too), which saves a HEAD per layer
            if blob.digest in self.mount_sources and self._mount(blob) == "":
                self._count(mounted=1)
            elif self._present(blob):
                self._count(present=1)
            elif blob.digest not in self.mount_sources and self._mount(blob) == "":
                self._count(mounted=1)
            else:
                continue
            break
        else:
            return None
        self.cache.remember(self.repo, blob, diff_id, self.kind)
        return blob

    def _ship_layer(self, spool: Spool, w: WrittenLayer) -> None:
        compressed: Spool | None = None
        try:
            blob = self._reuse(w.diff_id)
            if blob is None:
                if self.kind == "none":
                    blob, body = Blob(w.diff_id, spool.size, MT_OCI_LAYER), spool
                else:
                    compressed = Spool(spool.size)
                    digest = _compress(spool, self.kind, compressed)
                    spool.close()
                    self._count(compressed=1)
                    blob, body = Blob(digest, compressed.size, LAYER_TYPES[self.kind]), compressed
                self._ensure(blob, _spool_reader(body))
                self.cache.remember(self.repo, blob, w.diff_id, self.kind)
            w.digest, w.blob_size, w.media_type = blob.digest, blob.size, blob.media_type
        finally:
            spool.close()
            if compressed is not None:
                compressed.close()
            self._slots.release()

    # -- blobs ------------------------------------------------------------------------

    def _present(self, blob: Blob) -> bool:
        return self.reg.blob_size(self.repo, blob.digest) == blob.size

    def _mount(self, blob: Blob) -> str | None:
        """Mount from a repository the cache names: "" when mounted, else the upload URL
        the registry opened instead, or None when no repository was tried."""
        location = None
        shared = self.mount_sources.get(blob.digest)
        # a hint from another machine: the blob must be what it said, which one HEAD
        # there per blob tells; a mount then links that very blob (its digest fixes its
        # size), so no HEAD here
        if (
            shared
            and shared != self.repo
            and (self.source_size(self.reg, shared, blob.digest) == blob.size)
        ):
            location = self.reg.start_upload(self.repo, mount=blob.digest, source=shared)
            if location == "":
                return ""
        others = [r for r in self.cache.repos_with(blob.digest) if r not in (self.repo, shared)]
        if not others and self.mount_fallback not in (None, self.repo, shared):
            others = [self.mount_fallback]  # type: ignore[list-item]
        for other in others:
            location = self.reg.start_upload(self.repo, mount=blob.digest, source=other)
            if location == "":
                return ""
            break  # the registry opened an upload instead: use it
        return location

    def _ensure(
        self, blob: Blob, open_: Callable[[], BinaryIO], verify: bool = False, config: bool = False
    ) -> None:
        """The blob in the repository: already there, mounted, or uploaded (with
        verify, its bytes are checked against its digest as they are sent). Counted
        as a layer's, or with config as the config's."""
        if self._present(blob):
            self._counted("present", config)
            return
        location = self._mount(blob)
        if location == "":
            self._counted("mounted", config)
            return
        location = location or self.reg.start_upload(self.repo)
        body = Body(open_, blob.size, self._progress, blob.digest if verify else None)
        try:
            self.reg.finish_upload(self.repo, location, blob.digest, body, blob.size)  # type: ignore[arg-type]
        finally:
            body.close()
        self._count(uploaded_bytes=blob.size)
        self._counted("uploaded", config)

    def _counted(self, outcome: str, config: bool) -> None:
        if config:
            self.stats.config = outcome
        else:
            self._count(**{outcome: 1})

    def _count(self, **kw: int) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _progress(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def _raise_failed(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]

    # -- the image --------------------------------------------------------------------

    def finish(self, config: dict, repo_tags: list[str]) -> ImageRecord:
        """Push config and manifest; repo_tags' first tag (or "latest") tags it."""
        tag = repo_tags[0].rpartition(":")[2] if repo_tags else "latest"
        return self.finish_raw(config_bytes(config), tag)

    def finish_raw(self, config_raw: bytes, tag: str) -> ImageRecord:
        for f in self._futures:
            f.result()
        self._pool.shutdown()
        config_digest = "sha256:" + hashlib.sha256(config_raw).hexdigest()
        config = Blob(config_digest, len(config_raw), MT_OCI_CONFIG)
        self._ensure(config, lambda: _BytesReader(config_raw), config=True)
        self.cache.remember(self.repo, config)  # so another repository can mount it
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": {
                "mediaType": MT_OCI_CONFIG,
                "digest": config_digest,
                "size": len(config_raw),
            },
            "layers": [
                {"mediaType": x.media_type, "digest": x.digest, "size": x.blob_size}
                for x in self.layers
            ],
        }
        raw = json.dumps(manifest, indent=2).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        self.reg.put_manifest(self.repo, digest, raw, MT_OCI_MANIFEST)
        if not self.untagged:
            self.reg.put_manifest(self.repo, tag, raw, MT_OCI_MANIFEST)
        self.manifest_size = len(raw)
        self.cache.save()
        self._close_bar()
        return ImageRecord(config_digest, digest, list(self.layers))

    def abort(self) -> None:
        for f in self._futures:
            f.cancel()
        self._pool.shutdown(wait=True)
        self.cache.save()  # what did get uploaded is worth remembering
        self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _blob_size(reg: Registry, repo: str, digest: str) -> int | None:
    return reg.blob_size(repo, digest)


class _BytesReader:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, n: int = -1) -> bytes:
        cut = len(self.data) if n < 0 else n
        data, self.data = self.data[:cut], self.data[cut:]
        return data

    def close(self) -> None:
        pass


def _compress(spool: Spool, kind: str, out: Spool) -> str:
    """Compress spool's bytes into out; returns "sha256:<hex>" of the compressed blob."""
    target = HashingSpool(out)
    comp = compressor(kind, target)
    offset = 0
    while offset < spool.size:
        chunk = os.pread(spool.fd, min(4 * CHUNK, spool.size - offset), offset)
        if not chunk:
            raise OSError("layer spool ended early")
        comp.write(chunk)
        offset += len(chunk)
    comp.close()
    return target.digest()


def _bar():
    from tqdm import tqdm

    return tqdm(
        unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False,
        dynamic_ncols=True, desc="push",
    )  # fmt: skip


# -- what push drives -----------------------------------------------------------------


def open_registry(
    dest: Reference, insecure: bool, workers: int, timeout: float | None, stall: float | None
) -> Registry:
    """The client for dest's registry, with a connection per worker and two spare."""
    return Registry(
        dest.registry, dest.api_host, insecure, pool=workers + 2, timeout=timeout, stall=stall
    )


def run_push(dest: Reference, sink: RegistrySink, body: Callable[[], tuple[ImageRecord, str]]):
    """body() builds into sink; its result as a PushResult, the sink aborted if it fails."""
    try:
        record, tag = body()
    except BaseException:
        sink.abort()
        raise
    return PushResult(dest, tag, record.manifest_digest or "", record.config_digest,
                      record.layers, sink.stats)  # fmt: skip


def push_image(
    path: str, dest_text: str, *, image_tag: str | None = None, compress: str = "gzip",
    insecure: bool = False, workers: int = WORKERS, progress: bool = False,
    timeout: float | None = DEADLINE, stall: float | None = STALL, cache: Any = None,
) -> PushResult:  # fmt: skip
    """Push an image on disk (docker-archive, OCI layout or archive) as it is.

    Every layer read is checked against its diff_id (or, sent as stored, its
    blob digest) as it passes; timeout and stall as for pull()."""
    from fastlayer.sources import base_image as bi

    dest = parse_reference(dest_text)
    if dest.digest:
        raise FastlayerError(f"{dest_text}: push to a tag, not a digest")
    if not os.path.exists(path):
        raise FastlayerError(f"image to push does not exist: {path}")
    image = bi.open_image(path, image_tag)
    files = bi._Files(path)  # noqa: SLF001 (raw config bytes and blob descriptors)
    reg = open_registry(dest, insecure, workers, timeout, stall)
    sink = RegistrySink(reg, dest.repository, compress, workers, progress, cache)

    def body() -> tuple[ImageRecord, str]:
        descs = _oci_layer_descs(files, image) if files.exists("oci-layout") else None
        for i, layer in enumerate(image.layers):
            d = descs[i] if descs else None
            if d is not None and kind_of(d["mediaType"]) != "none":
                blob = Blob(d["digest"], d["size"], d["mediaType"])
                name = untrusted.blob_path(d["digest"], f"image {path}: layer {i}")
                sink.add_blob(blob, layer.diff_id, lambda name=name: files.open(name))
            else:
                sink.add_layer(ReaderSource(layer, verify=True), layer.comment)
        tag = dest.tag or (image.repo_tags[0].rpartition(":")[2] if image.repo_tags else "latest")
        raw = _config_raw(files, image)
        return sink.finish_raw(raw, tag), tag

    try:
        return run_push(dest, sink, body)
    finally:
        reg.close()


def _oci_docs(files: Any) -> list[tuple[str, dict]]:
    """(name, document) of every manifest an OCI layout's index reaches, types checked."""
    out: list[tuple[str, dict]] = []
    stack = _descs(files, "index.json")
    seen: set[str] = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue  # an index that lists itself
        seen.add(name)
        doc = _doc(files, name)
        if "manifests" in doc:
            stack.extend(_descs(files, name, doc))
        else:
            out.append((name, doc))
    return out


def _doc(files: Any, name: str) -> dict:
    return untrusted.of_type(files.json(name), dict, f"image {files.path}: {name}")


def _descs(files: Any, name: str, doc: dict | None = None) -> list[str]:
    """The blob names an index's manifests[] point at."""
    doc = doc if doc is not None else _doc(files, name)
    where = f"image {files.path}: {name}"
    items = untrusted.field(doc, "manifests", list, where, default=[])
    return [
        untrusted.blob_path(
            untrusted.of_type(d, dict, f"{where}.manifests[{i}]").get("digest"),
            f"{where}.manifests[{i}].digest",
        )  # fmt: skip
        for i, d in enumerate(items)
    ]


def _layer_desc(d: Any, where: str) -> dict:
    d = untrusted.of_type(d, dict, where)
    untrusted.digest(d.get("digest"), f"{where}.digest")
    untrusted.integer(untrusted.field(d, "size", int, where), f"{where}.size")
    untrusted.field(d, "mediaType", str, where)
    return d


def _config_name(doc: dict, where: str) -> str:
    config = untrusted.field(doc, "config", dict, where)
    return untrusted.blob_path(config.get("digest"), f"{where}.config.digest")


def _oci_layer_descs(files: Any, image: Any) -> list[dict] | None:
    """The layer descriptors of the OCI manifest open_image chose (found by its config)."""
    for name, doc in _oci_docs(files):
        where = f"image {files.path}: {name}"
        raw = untrusted.field(doc, "layers", list, where, default=[])
        layers = [_layer_desc(d, f"{where}.layers[{i}]") for i, d in enumerate(raw)]
        cfg = _doc(files, _config_name(doc, where))
        rootfs = cfg.get("rootfs")
        diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if diff_ids == image.diff_ids and len(layers) == len(image.layers):
            return layers
    return None


def _config_raw(files: Any, image: Any) -> bytes:
    """The image's config as stored (so its id is kept), or as fastlayer writes it."""
    names: list[str] = []
    if files.exists("manifest.json"):
        where = f"image {files.path}: manifest.json"
        entries = untrusted.of_type(files.json("manifest.json"), list, where)
        for i, entry in enumerate(entries):
            entry = untrusted.of_type(entry, dict, f"{where}[{i}]")
            names.append(untrusted.member_name(entry.get("Config"), f"{where}[{i}].Config"))
    if files.exists("oci-layout"):
        names += [_config_name(doc, f"image {files.path}: {n}") for n, doc in _oci_docs(files)]
    for name in names:
        with files.open(name) as f:
            raw = untrusted.read_capped(f, f"image {files.path}: {name}")
        if untrusted.parse_json(raw, f"image {files.path}: {name}") == image.config:
            return raw
    return config_bytes(image.config)
