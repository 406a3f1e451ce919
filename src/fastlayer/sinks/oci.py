"""OCI image layout sinks: a directory (`--format oci-dir`) or a tar of one (`oci-archive`).

Per the OCI image spec: `oci-layout` {"imageLayoutVersion": "1.0.0"},
`blobs/sha256/<hex>` named by the digest of the blob as stored, and
`index.json` whose descriptors carry `org.opencontainers.image.ref.name`
= the tag (what `skopeo copy oci:DIR:TAG` and `umoci --image DIR:TAG`
look up) and `io.containerd.image.name` = the full `name:tag` (what
`podman load` and containerd name the image by). Layers are stored
uncompressed, gzip or zstd (one media type each); diff_ids in the config
are always of the uncompressed tar.

A blob's name is known only after its bytes: in a directory it is written
to a temporary file in blobs/sha256 and renamed; in an archive it waits in
a spool (sinks/spool.py), except uncompressed layers on a seekable output,
whose header is written back like the docker-archive writer's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator

from fastlayer import untrusted
from fastlayer.errors import FastlayerError
from fastlayer.model import (
    MT_OCI_CONFIG,
    MT_OCI_INDEX,
    MT_OCI_LAYER,
    MT_OCI_LAYER_GZIP,
    MT_OCI_LAYER_ZSTD,
    MT_OCI_MANIFEST,
    OCI_LAYOUT_VERSION,
    Known,
    LayerSource,
    WrittenLayer,
)
from fastlayer.sinks.base import Finishing, ImageRecord, config_bytes, full_tags, split_ref
from fastlayer.sinks.compress import FdWriter, blob_kind, pump_compressed
from fastlayer.sinks.docker_archive import DockerArchiveWriter
from fastlayer.sinks.output import output_fd
from fastlayer.sinks.spool import HashingSpool, Spool

REF_NAME = "org.opencontainers.image.ref.name"
# The full `name:tag`: what `podman load` of an OCI archive names the image by
# (ref.name alone would give localhost/<tag>:latest), as containerd writes it.
IMAGE_NAME = "io.containerd.image.name"
LAYER_TYPES = {"none": MT_OCI_LAYER, "gzip": MT_OCI_LAYER_GZIP, "zstd": MT_OCI_LAYER_ZSTD}
LAYOUT = json.dumps({"imageLayoutVersion": OCI_LAYOUT_VERSION}).encode()


def descriptor(media_type: str, data: bytes) -> dict:
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
        "size": len(data),
    }


def _json(obj: object) -> bytes:
    return json.dumps(obj, indent=2).encode("utf-8")


class _OciImage(Finishing):
    """What both OCI sinks share: layers in, config + manifest + index out."""

    def __init__(self, kind: str, name: str, tag: str):
        self.kind, self.name, self.tag = kind, name, tag
        self.layers: list[WrittenLayer] = []
        # the compressed blob kind stored (None: layers stored uncompressed): a layer
        # fetched from a shared cache in this kind is written as downloaded
        self.stores_blob = blob_kind(kind) if kind != "none" else None

    def as_stored(self, source: LayerSource) -> bool:
        """Whether source gives its blob already compressed as this sink stores it."""
        return self.stores_blob is not None and getattr(source, "blob_kind", None) == (
            self.stores_blob
        )

    def put_blob(self, data: bytes) -> None:
        raise NotImplementedError

    def put_index(self, manifest: dict, refs: list[str]) -> None:
        raise NotImplementedError

    def finish(self, config: dict, repo_tags: list[str]) -> ImageRecord:
        if (config.get("rootfs") or {}).get("diff_ids") != [x.diff_id for x in self.layers]:
            raise ValueError("config rootfs.diff_ids do not match the layers written")
        raw = config_bytes(config)
        self.put_blob(raw)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_OCI_MANIFEST,
            "config": descriptor(MT_OCI_CONFIG, raw),
            "layers": [
                {"mediaType": x.media_type, "digest": x.digest, "size": x.blob_size}
                for x in self.layers
            ],
        }
        manifest_raw = _json(manifest)
        self.put_blob(manifest_raw)
        refs = list(dict.fromkeys(full_tags(repo_tags, self.name, self.tag)))
        self.put_index(descriptor(MT_OCI_MANIFEST, manifest_raw), refs)
        self.finished = True
        mdigest = "sha256:" + hashlib.sha256(manifest_raw).hexdigest()
        return ImageRecord(manifest["config"]["digest"], mdigest, list(self.layers))


def index_json(
    manifests: list[dict], desc: dict, refs: list[str], ref_name: str | None = None
) -> bytes:
    """index.json: earlier entries kept unless they carry the tag of one of refs
    (`name:tag` references), then ours: the tag (or ref_name, when given) as
    ref.name, the full reference as io.containerd.image.name."""
    ours = [
        {**desc, "annotations": {REF_NAME: ref_name or split_ref(ref)[1], IMAGE_NAME: ref}}
        for ref in refs
    ]
    tags = {x["annotations"][REF_NAME] for x in ours}
    kept = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) not in tags]
    ours = ours or [desc]
    return _json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": kept + ours})


class OciDirSink(_OciImage):
    """Writes into a layout directory; blobs by temporary file + rename."""

    def __init__(self, root: str, kind: str, name: str = "", tag: str = ""):
        super().__init__(kind, name, tag)
        self.root = root
        self.blobs = os.path.join(root, "blobs", "sha256")
        self.created: list[str] = []  # what abort() removes from an existing layout
        self._held: dict[str, tuple[str, int]] = {}  # diff_id -> blob found (skips)
        # ref.name of the image in index.json; None: its tag (a batch names each
        # image of a shared layout after its spec, as tags may repeat)
        self.ref_name: str | None = None
        self.old_index: bytes | None = None  # index.json as last read
        self.index_touched = False  # put_index may have replaced index.json
        for d in (os.path.join(root, "blobs"), self.blobs):
            if not os.path.isdir(d):
                os.mkdir(d)
                self.created.append(d)
        if not os.path.exists(os.path.join(root, "oci-layout")):
            self._replace("oci-layout", LAYOUT)
        self._old_manifests()  # a broken index.json fails the build before any work

    def _old_manifests(self) -> list[dict]:
        """The manifests of the layout's index.json, kept as read for abort()."""
        path = os.path.join(self.root, "index.json")
        if not os.path.lexists(path):
            return []
        with untrusted.open_regular(path, "OCI layout index") as f:
            raw = untrusted.read_capped(f, f"OCI layout index {path}")
        manifests = _index_manifests(raw, path)
        self.old_index = raw
        return manifests

    def _replace(self, name: str, data: bytes) -> None:
        path = os.path.join(self.root, name)
        existed = os.path.exists(path)
        self._write_new(path, lambda w: w.write(data), hashing=False)
        if not existed:
            self.created.append(path)

    def _write_new(self, path: str | None, produce: Callable[[FdWriter], object], hashing=True):
        """Write a file atomically; path None: name it by its sha256 in blobs/sha256."""
        fd, tmp = tempfile.mkstemp(dir=self.blobs, prefix=".fastlayer-", suffix=".part")
        try:
            w = FdWriter(fd, hashing)
            result = produce(w)
            os.fchmod(fd, 0o644)
            os.close(fd)
            fd = -1
            if path is None:
                assert w.sha256 is not None
                path = os.path.join(self.blobs, w.sha256.hexdigest())
                if os.path.exists(path):  # same digest, same bytes
                    os.unlink(tmp)
                    return result, w
                self.created.append(path)
            os.replace(tmp, path)
            return result, w
        except BaseException:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def skips(self, known: Known) -> bool:
        """Whether the layout holds the blob a cache names for this layer already
        (then add_layer of a source with that hint reads nothing)."""
        blob = known.blobs.get(blob_kind(self.kind))
        if blob is None:
            return False
        path = os.path.join(self.blobs, blob[0].removeprefix("sha256:"))
        try:
            st = os.lstat(path)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_size != blob[1]:
            return False
        self._held[known.diff_id] = blob
        return True

    def add_layer(self, source: LayerSource, comment: str = "") -> WrittenLayer:
        known = getattr(source, "known", None)
        if known is not None and known.diff_id in self._held:
            digest, blob_size = self._held[known.diff_id]
            layer = WrittenLayer(
                known.diff_id, known.size, digest, blob_size, LAYER_TYPES[self.kind]
            )
            self.layers.append(layer)
            return layer
        if self.as_stored(source):
            layer = self._add_downloaded(source)
        else:
            produce = lambda w: pump_compressed(source, self.kind, w)  # noqa: E731
            (hexd, size), w = self._write_new(None, produce)
            assert w.sha256 is not None
            digest = f"sha256:{w.sha256.hexdigest()}"
            layer = WrittenLayer(f"sha256:{hexd}", size, digest, w.size, LAYER_TYPES[self.kind])
        self.layers.append(layer)
        return layer

    def _add_downloaded(self, source: LayerSource) -> WrittenLayer:
        """A blob a shared cache gave (cache/fetch.py): checked whole before a byte of
        it is copied here, so named by its digest as it is written, not hashed again."""
        digest, blob_size = source.digest, source.blob_size  # type: ignore[attr-defined]
        path = os.path.join(self.blobs, digest.removeprefix("sha256:"))
        existed = os.path.exists(path)
        hexd, _ = self._write_new(path, lambda w: source.copy_blob_to(w.fd), hashing=False)  # type: ignore[attr-defined]
        if not existed:
            self.created.append(path)
        size = source.expected.size  # type: ignore[attr-defined]
        return WrittenLayer(f"sha256:{hexd}", size, digest, blob_size, LAYER_TYPES[self.kind])

    def put_blob(self, data: bytes) -> None:
        self._write_new(None, lambda w: w.write(data))

    def put_index(self, manifest: dict, refs: list[str]) -> None:
        # read again under the layout's lock: another build may add to it meanwhile
        with layout_lock(self.root):
            data = index_json(self._old_manifests(), manifest, refs, self.ref_name)
            self.index_touched = True  # before the rename: a signal may land right after it
            self._replace("index.json", data)

    def abort(self) -> None:
        """Leave the layout as it was: the old index.json back, added files gone."""
        if self.old_index is not None and self.index_touched:
            with contextlib.suppress(OSError):
                self._write_new(os.path.join(self.root, "index.json"), self._put_old_index)
        for path in reversed(self.created):
            with contextlib.suppress(OSError):
                os.rmdir(path) if os.path.isdir(path) else os.unlink(path)

    def _put_old_index(self, w: FdWriter) -> None:
        assert self.old_index is not None
        w.write(self.old_index)


@contextlib.contextmanager
def layout_lock(root: str) -> Iterator[None]:
    """An exclusive flock on the layout directory while index.json is read and
    replaced, so concurrent builds into one layout keep each other's images."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _index_manifests(raw: bytes, path: str) -> list[dict]:
    """The manifests of an existing index.json, each an object."""
    index = untrusted.of_type(untrusted.parse_json(raw, path), dict, path)
    manifests = untrusted.field(index, "manifests", (list, type(None)), path, None) or []
    where = f"{path}: manifests"
    return untrusted.each(manifests, where, lambda m, w: untrusted.of_type(m, dict, w))


def _check_layout_dir(output: str) -> None:
    """An existing -o for oci-dir must be a layout directory (or an empty one)."""
    try:
        st = os.stat(output)
    except FileNotFoundError:
        raise FastlayerError(f"cannot write {output}: it is a dangling symlink") from None
    except OSError as e:
        raise FastlayerError(f"cannot write {output}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        hint = "; --format oci-archive streams" if not stat.S_ISREG(st.st_mode) else ""
        raise FastlayerError(
            f"cannot write {output}: it is {untrusted.file_kind(st.st_mode)}, "
            f"not an OCI image layout directory{hint}"
        )
    if os.listdir(output) and not os.path.exists(os.path.join(output, "oci-layout")):
        raise FastlayerError(f"{output} exists and is not an OCI image layout directory")


@contextlib.contextmanager
def oci_dir_sink(output: str, kind: str, name: str, tag: str) -> Iterator[OciDirSink]:
    """A new directory appears whole (built beside it, then renamed); an existing
    layout (or empty directory) gets the image added, and on error loses what was added."""
    if os.path.lexists(output):
        _check_layout_dir(output)
        sink = OciDirSink(output, kind, name, tag)
        try:
            yield sink
            sink.check_finished()
        except BaseException:
            sink.abort()
            raise
        return
    parent = os.path.dirname(os.path.abspath(output))
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=".fastlayer-", suffix=".part")
    except OSError as e:
        raise FastlayerError(f"cannot write {output}: {e.strerror}") from None
    try:
        os.chmod(tmp, 0o755)
        sink = OciDirSink(tmp, kind, name, tag)
        yield sink
        sink.check_finished()
        try:
            os.rename(tmp, output)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise FastlayerError(
                f"cannot create the layout {output}: another process created it meanwhile "
                "(run again to add to it)"
            ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class OciArchiveSink(_OciImage):
    """An OCI layout as a tar stream: oci-layout, blobs/, then index.json last."""

    def __init__(self, writer: DockerArchiveWriter, kind: str, name="", tag="", mtime=0):
        super().__init__(kind, name, tag)
        self.writer, self.mtime = writer, mtime
        self.names: set[str] = set()  # blob entries written, not to repeat one
        writer.add_bytes("oci-layout", LAYOUT, mtime)
        writer.add_dir("blobs/", mtime)
        writer.add_dir("blobs/sha256/", mtime)

    def add_layer(self, source: LayerSource, comment: str = "") -> WrittenLayer:
        if self.kind == "none":
            hexd, size = self.writer.add_layer_as(source, self.mtime, lambda h: f"blobs/sha256/{h}")
            self.names.add(hexd)
            layer = WrittenLayer(f"sha256:{hexd}", size, f"sha256:{hexd}", size, MT_OCI_LAYER)
        else:
            spool = Spool(source.size, self.writer.spool_dir)
            try:
                out = HashingSpool(spool)
                if self.as_stored(source):
                    hexd = source.pump_blob(out.write)  # type: ignore[attr-defined]
                    size = source.expected.size  # type: ignore[attr-defined]
                else:
                    hexd, size = pump_compressed(source, self.kind, out)
                blob = out.sha256.hexdigest()
                if blob in self.names:
                    spool.close()
                else:
                    self.names.add(blob)
                    self.writer.add_spool(f"blobs/sha256/{blob}", spool, self.mtime)
            except BaseException:
                spool.close()
                raise
            kind_type = LAYER_TYPES[self.kind]
            layer = WrittenLayer(f"sha256:{hexd}", size, f"sha256:{blob}", spool.size, kind_type)
        self.layers.append(layer)
        return layer

    def put_blob(self, data: bytes) -> None:
        hexd = hashlib.sha256(data).hexdigest()
        if hexd not in self.names:
            self.names.add(hexd)
            self.writer.add_bytes(f"blobs/sha256/{hexd}", data, self.mtime)

    def put_index(self, manifest: dict, refs: list[str]) -> None:
        self.writer.add_bytes("index.json", index_json([], manifest, refs), self.mtime)
        self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


@contextlib.contextmanager
def oci_archive_sink(
    output: str | None, kind: str, name: str, tag: str, mtime: int
) -> Iterator[OciArchiveSink]:
    with output_fd(output) as fd:
        writer = DockerArchiveWriter(fd)
        sink = OciArchiveSink(writer, kind, name, tag, mtime)
        try:
            yield sink
            sink.check_finished()
        except BaseException:
            sink.abort()
            raise


def add_image_index(
    root: str, members: list[tuple[str, dict]], ref: str, replaced: list[str]
) -> str:
    """Put an OCI image index naming the layout's manifests `members` [(digest,
    platform)] in blobs, and into index.json under ref (`name:tag`), in place of
    the entries whose ref.name is in replaced. Returns the index's digest."""
    blobs = os.path.join(root, "blobs", "sha256")
    manifests = []
    for digest, platform in members:
        path = os.path.join(blobs, digest.removeprefix("sha256:"))
        manifests.append({"mediaType": MT_OCI_MANIFEST, "digest": digest,
                          "size": os.path.getsize(path), "platform": platform})  # fmt: skip
    raw = _json({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": manifests})
    desc = descriptor(MT_OCI_INDEX, raw)
    sink = OciDirSink(root, "none")
    sink.put_blob(raw)
    with layout_lock(root):
        old = [
            m for m in sink._old_manifests()
            if (m.get("annotations") or {}).get(REF_NAME) not in replaced
        ]  # fmt: skip
        sink._replace("index.json", index_json(old, desc, [ref]))
    return desc["digest"]
