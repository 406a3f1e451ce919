"""Single-pass layer emission: walk, then read, hash and ship each byte once.

Three threads form a pipeline over a small pool of buffers: the native
reader fills a buffer (GIL released), the hasher runs sha256 over it
(OpenSSL releases the GIL for large updates), the writer hands it to the
sink. On two cores reading+writing and hashing overlap, so a layer costs
about as much as hashing it alone. Memory stays at the pool's size.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath

from fastlayer import untrusted
from fastlayer._native.tarstream import LayerSourceError, LayerStream
from fastlayer.errors import DigestMismatch, FastlayerError
from fastlayer.model import Known, Layer, LayerSource

BUFSIZE = 1 << 19
NBUF = 16

# nixpkgs starts every store layer with these two directories, mode 0755.
NIX_LEAD_DIRS = [(b"/nix", 0o755), (b"/nix/store", 0o755)]


@dataclass(frozen=True)
class Owner:
    """What every entry of a generated layer carries, whatever is on disk."""

    mtime: int = 1
    uid: int = 0
    gid: int = 0
    uname: str = "root"
    gname: str = "root"


def archive_name(path: str) -> str:
    """The absolute archive name tarfile gives a path (pathlib-normalised)."""
    return "/" + str(PurePosixPath(path)).lstrip("/")


def fsencode(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def store_layer(paths: Sequence[str], owner: Owner, root: str | None = None) -> LayerStream:
    """Walk store paths into a layer (nixpkgs' entry order); reads nothing yet.

    root: a directory the store lives under (a chroot store); entries keep
    their store names."""
    roots = []
    for p in paths:
        arc = archive_name(p)
        fs = (root.rstrip("/") + arc) if root else arc
        roots.append((fsencode(fs), fsencode(arc)))
    return walk(NIX_LEAD_DIRS, roots, owner)


def walk_ahead(makers: Sequence[Callable[[], LayerStream]]) -> Iterator[LayerStream]:
    """Yield each maker's stream while the next one is walked on another thread.

    The walk is syscall-bound and releases the GIL; overlapping it with the
    previous layer's streaming takes it off the critical path."""

    def start(make: Callable[[], LayerStream]) -> tuple[threading.Thread, list]:
        box: list = []

        def run() -> None:
            try:
                box.append(make())
            except BaseException as e:  # re-raised in the consumer
                box.append(e)

        t = threading.Thread(target=run, name="fastlayer-walk", daemon=True)
        t.start()
        return t, box

    pending = start(makers[0]) if makers else None
    for i in range(len(makers)):
        assert pending is not None
        thread, box = pending
        thread.join()
        pending = start(makers[i + 1]) if i + 1 < len(makers) else None
        if isinstance(box[0], BaseException):
            if pending is not None:
                pending[0].join()
            raise box[0]
        yield box[0]


def walk(
    lead_dirs: list[tuple[bytes, int]], roots: list[tuple[bytes, bytes]], owner: Owner
) -> LayerStream:
    try:
        return LayerStream(
            lead_dirs,
            roots,
            owner.mtime,
            owner.uid,
            owner.gid,
            fsencode(owner.uname),
            fsencode(owner.gname),
        )
    except LayerSourceError as e:
        raise FastlayerError(str(e)) from None


_STOP = None
# Buffers outlive a layer: fresh ones would cost a page fault per 4 KiB each time.
_POOL: list[bytearray] = []


def _take_buffers() -> list[bytearray]:
    taken = []
    while len(taken) < NBUF:
        try:
            taken.append(_POOL.pop())
        except IndexError:
            taken.append(bytearray(BUFSIZE))
    return taken


def pump(stream: LayerStream, write: Callable[[memoryview], object]) -> str:
    """Produce the whole layer into write(); returns its sha256 hex (diff_id).

    Raises FastlayerError if a source file fails or changes; write() errors
    propagate as they are."""
    free: queue.SimpleQueue = queue.SimpleQueue()
    to_hash: queue.SimpleQueue = queue.SimpleQueue()
    to_write: queue.SimpleQueue = queue.SimpleQueue()
    bufs = _take_buffers()
    for buf in bufs:
        free.put(buf)
    digest = hashlib.sha256()
    failure: list[BaseException] = []

    def read() -> None:
        try:
            while True:
                buf = free.get()
                if buf is _STOP:
                    break
                n = stream.fill(buf)
                to_hash.put((buf, n))
                if n == 0:
                    return
        except BaseException as e:  # handed to the caller's thread below
            failure.append(e)
        to_hash.put((_STOP, 0))

    def hash_() -> None:
        while True:
            buf, n = to_hash.get()
            if buf is not _STOP and n:
                digest.update(memoryview(buf)[:n])
            to_write.put((buf, n))
            if buf is _STOP or n == 0:
                return

    threads = [threading.Thread(target=f, daemon=True) for f in (read, hash_)]
    for t in threads:
        t.start()
    written = 0
    try:
        while True:
            buf, n = to_write.get()
            if buf is _STOP:
                break
            if n == 0:
                break
            write(memoryview(buf)[:n])
            written += n
            free.put(buf)
    finally:
        free.put(_STOP)
        for t in threads:
            t.join()
        _POOL.extend(bufs)
    if failure:
        e = failure[0]
        if isinstance(e, LayerSourceError):
            raise FastlayerError(str(e)) from None
        raise e
    if written != stream.size:  # the walk promised this size in the header
        raise FastlayerError(f"layer size {written} differs from the planned {stream.size}")
    return digest.hexdigest()


_ERROR = "error"


class Pipeline:
    """Several layers through one read | hash | write pipeline, without bubbles.

    pump() drains at each layer's end: the reader idles while the last
    buffers are hashed and written, the hasher while the first are read.
    Here one reader thread walks (one layer ahead) and fills layer after
    layer as long as buffers are free, and one hasher keeps a digest per
    layer, so with many small layers both cores stay busy. The consumer
    takes sources() in order and pumps each completely before the next.
    """

    def __init__(self, makers: Sequence[Callable[[], LayerStream]]):
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._to_hash: queue.SimpleQueue = queue.SimpleQueue()
        self._to_write: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: queue.SimpleQueue = queue.SimpleQueue()
        self._bufs = _take_buffers()
        for buf in self._bufs:
            self._free.put(buf)
        self._closed = False
        self._threads = [
            threading.Thread(target=self._read, args=(makers,), daemon=True),
            threading.Thread(target=self._hash, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, makers: Sequence[Callable[[], LayerStream]]) -> None:
        try:
            for stream in walk_ahead(makers):
                self._streams.put(stream)
                while True:
                    buf = self._free.get()
                    if buf is _STOP:
                        return
                    n = stream.fill(buf)
                    self._to_hash.put((buf, n))
                    if n == 0:
                        break
            self._streams.put(_STOP)
        except BaseException as e:  # handed to the consumer, in order
            self._streams.put(e)
            self._to_hash.put((_ERROR, e))
        finally:
            self._to_hash.put((_STOP, 0))

    def _hash(self) -> None:
        digest = hashlib.sha256()
        while True:
            buf, n = self._to_hash.get()
            if buf is _STOP:
                return
            if buf is _ERROR:
                self._to_write.put((_ERROR, n, None))
            elif n:
                digest.update(memoryview(buf)[:n])
                self._to_write.put((buf, n, None))
            else:  # the layer's end
                self._to_write.put((buf, 0, digest.hexdigest()))
                digest = hashlib.sha256()

    def sources(self) -> Iterator[LayerSource]:
        """One LayerSource per layer, in order; pump each before taking the next."""
        while True:
            item = self._streams.get()
            if item is _STOP:
                return
            if isinstance(item, BaseException):
                raise _user_error(item)
            yield _PipedSource(self, item)

    def _drain(self, stream: LayerStream, write: Callable[[memoryview], object]) -> str:
        written = 0
        while True:
            buf, n, digest = self._to_write.get()
            if buf is _ERROR:
                raise _user_error(n)
            if n == 0:
                self._free.put(buf)
                break
            write(memoryview(buf)[:n])
            written += n
            self._free.put(buf)
        if written != stream.size:  # the walk promised this size in the header
            raise FastlayerError(f"layer size {written} differs from the planned {stream.size}")
        return digest

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for _ in range(2):  # the reader may wait for a buffer, twice at most
            self._free.put(_STOP)
        for t in self._threads:
            t.join()
        _POOL.extend(self._bufs)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PipedSource:
    def __init__(self, pipeline: Pipeline, stream: LayerStream):
        self.pipeline = pipeline
        self.stream = stream
        self.size: int | None = stream.size

    def pump(self, write: Callable[[memoryview], object]) -> str:
        return self.pipeline._drain(self.stream, write)


def _user_error(e: BaseException) -> BaseException:
    return FastlayerError(str(e)) if isinstance(e, LayerSourceError) else e


class StreamSource:
    """A walked layer as a model.LayerSource: exact size known, bytes pumped once."""

    def __init__(self, stream: LayerStream):
        self.stream = stream
        self.size: int | None = stream.size

    def pump(self, write: Callable[[memoryview], object]) -> str:
        return pump(self.stream, write)


class KnownOnly:
    """A layer the sink holds already (sink.skips said so for this hint): it is
    never produced, so asking for its bytes is a bug."""

    def __init__(self, known: Known):
        self.known = known
        self.size: int | None = known.size

    def pump(self, write: Callable[[memoryview], object]) -> str:
        raise AssertionError("a layer the sink holds was asked for its bytes")


class ReaderSource:
    """A model.Layer (e.g. of a base image) as a LayerSource.

    With verify (the default for base images) the bytes are hashed as they
    go by and a mismatch aborts with DigestMismatch naming the layer; without
    it the diff_id is trusted. A layer stored as it is (layer.region) is
    copied by the kernel either way; when verified, its region is hashed on
    other threads, ahead of and alongside the copy (see RegionHasher). A base
    file that shrinks or changes meanwhile aborts the build (FastlayerError)."""

    def __init__(self, layer: Layer, verify: bool = False):
        self.layer = layer
        self.verify = verify
        self.size: int | None = layer.size

    @property
    def region(self) -> tuple[str, int] | None:
        """Where the bytes lie as they are, for a kernel copy."""
        return self.layer.region if self.size is not None else None

    def copy_to(self, out_fd: int, offset: int) -> str:
        """Have the kernel copy the layer's bytes into out_fd at offset (see region)."""
        assert self.region is not None and self.size is not None
        path, src_offset = self.region
        end = src_offset + self.size
        claimed = self.layer.diff_id.removeprefix("sha256:")
        if not self.verify:
            with untrusted.open_regular(path, "base layer") as src:
                before = self._identity(src.fileno(), path, end)
                self._copy(src.fileno(), path, out_fd, offset, before)
            return claimed
        hasher, index = RegionHasher.for_region(path, src_offset, self.size)
        try:
            src_fd, before = hasher.fd(path)
            self._identity(src_fd, path, end)  # fails early if it is already short
            pending = hasher.start(index)
            self._copy(src_fd, path, out_fd, offset, before)
            try:
                got = pending.result()
            except SourceEnded as e:
                raise self._changed(path, f"it ended {e.missing} bytes early") from None
            if self._identity(src_fd, path, end) != before:  # changed while hashed
                raise self._changed(path, "its size or modification time changed")
            self._check(got)
        except BaseException:
            hasher.close()
            raise
        if index == len(hasher.regions) - 1:  # the image's last layer: release all
            hasher.close()
        return claimed

    def _copy(self, src_fd: int, path: str, out_fd: int, offset: int, before: Identity) -> None:
        """The kernel copy, with the file's identity checked after it."""
        assert self.region is not None and self.size is not None
        try:
            copy_range(src_fd, self.region[1], out_fd, offset, self.size)
        except SourceEnded as e:
            raise self._changed(path, f"it ended {e.missing} bytes early") from None
        if identity(os.fstat(src_fd)) != before:
            raise self._changed(path, "its size or modification time changed")

    def _identity(self, fd: int, path: str, end: int) -> Identity:
        st = os.fstat(fd)
        if st.st_size < end:
            raise FastlayerError(
                f"base layer {self.layer.comment}: {path} is {st.st_size} bytes, "
                f"but the layer ends at byte {end} (truncated?)"
            )
        return identity(st)

    def _changed(self, path: str, what: str) -> FastlayerError:
        return FastlayerError(
            f"base layer {self.layer.comment}: {path} changed while it was read "
            f"({what}); is another job rewriting it?"
        )

    def pump(self, write: Callable[[memoryview], object]) -> str:
        digest = hashlib.sha256() if self.verify else None
        total = 0
        with self.layer.open() as reader:
            while chunk := reader.read(BUFSIZE):
                if digest is not None:
                    digest.update(chunk)
                write(memoryview(chunk))
                total += len(chunk)
        if self.size is not None and total != self.size:
            raise FastlayerError(
                f"base layer {self.layer.comment}: {total} bytes read, not its {self.size} "
                "(did the file change while it was read?)"
            )
        if digest is not None:
            self._check(digest.hexdigest())
        return self.layer.diff_id.removeprefix("sha256:")

    def _check(self, got: str) -> None:
        if got != self.layer.diff_id.removeprefix("sha256:"):
            raise DigestMismatch(
                f"base layer {self.layer.comment}: content hashes to sha256:{got}, "
                f"not its diff_id {self.layer.diff_id}"
            )


Identity = tuple[int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    """What changes when a file is rewritten, truncated or replaced."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class SourceEnded(Exception):
    """A file had fewer bytes than the region read from it promised (it shrank)."""

    def __init__(self, missing: int):
        super().__init__(f"source ended {missing} bytes early")
        self.missing = missing


class RegionHasher:
    """sha256 of an image's uncompressed layer regions, hashed ahead of their copy.

    A verified base costs one hash of every byte; on two cores that hash
    runs beside the kernel copy instead of after it. Readers register the
    regions of an image in order (hash_ahead); the first verified copy_to
    starts two threads that hash its region and up to AHEAD following ones,
    each read (hash_range) from the same open file the copy reads from.
    Results are only ever used for the region they were computed over, and
    only if the file's identity (size, mtime, inode) is the same after the
    copy as when it was opened, before any of it was read."""

    AHEAD = 2  # regions hashed beyond the one being copied (bounds wasted work)
    _by_region: dict[tuple[str, int, int], tuple[RegionHasher, int]] = {}

    def __init__(self, regions: list[tuple[str, int, int]]):
        self.regions = regions
        self._fds: dict[str, tuple[int, Identity]] = {}
        self._futures: dict[int, Future[str]] = {}
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @classmethod
    def hash_ahead(cls, regions: list[tuple[str, int, int]]) -> None:
        """Announce an image's (file, offset, size) regions, bottom layer first."""
        if len(cls._by_region) > 100_000:  # announced but never copied: forget them
            cls._by_region.clear()
        group = cls(list(dict.fromkeys(regions)))  # a region shared by two layers, once
        for i, region in enumerate(group.regions):
            cls._by_region[region] = (group, i)

    @classmethod
    def for_region(cls, path: str, offset: int, size: int) -> tuple[RegionHasher, int]:
        found = cls._by_region.pop((path, offset, size), None)
        return found if found is not None else (cls([(path, offset, size)]), 0)

    def fd(self, path: str) -> tuple[int, Identity]:
        """One descriptor per file, shared by the copy and the hash, and the
        file's identity when it was opened."""
        with self._lock:
            if path not in self._fds:
                with untrusted.open_regular(path, "base layer") as f:
                    fd = os.dup(f.fileno())
                self._fds[path] = (fd, identity(os.fstat(fd)))
            return self._fds[path]

    def start(self, index: int) -> Future[str]:
        """The hash of region index, and those of the next AHEAD regions begun."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(2, thread_name_prefix="fastlayer-verify")
            pool = self._pool
        for i in range(index, min(index + 1 + self.AHEAD, len(self.regions))):
            if i not in self._futures:
                path, offset, size = self.regions[i]
                self._futures[i] = pool.submit(hash_range, self.fd(path)[0], offset, size)
        return self._futures.pop(index)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            fds, self._fds = self._fds, {}
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for fd, _ in fds.values():
            os.close(fd)


# Why pread and not mmap: a page of an mmap that another process truncated
# away raises SIGBUS on its next touch, and the process dies without a
# message or its cleanup (issue 9). pread just returns short. The cost is
# the copy into user memory; into a small buffer that stays in the core's
# cache it is ~0.15 s sys per GiB more than mmap (8 MiB buffers: ~0.5 s).
# Measured (95 layers, 1 GiB, 2 shared cores, copy alone 0.62-0.72 s):
# mmap 0.86 s, pread 512 KiB 0.91 s (128 KiB-2 MiB alike), whole builds
# 1.19 vs 1.22 s best; hashing the copy's output instead (an mmap of our
# own file, pipelined with the copy chunk by chunk) 1.2 s: a layer's hash
# cannot start before its copy, so hashes of layers no longer overlap, and
# the output's 4 KiB tmpfs pages cost more to map than the base's.
HASH_BUF = 512 << 10
_buffers = threading.local()


def hash_range(fd: int, offset: int, size: int) -> str:
    """sha256 hex of size bytes of fd at offset, read with preadv into a
    reused per-thread buffer (hashlib drops the GIL on each large update).
    Raises SourceEnded if the file ends first."""
    buf = getattr(_buffers, "buf", None)
    if buf is None:
        buf = _buffers.buf = memoryview(bytearray(HASH_BUF))
    digest = hashlib.sha256()
    pos, end = offset, offset + size
    while pos < end:
        n = os.preadv(fd, [buf[: min(HASH_BUF, end - pos)]], pos)
        if n == 0:
            raise SourceEnded(end - pos)
        digest.update(buf[:n])
        pos += n
    return digest.hexdigest()


def copy_range(src_fd: int, src_offset: int, out_fd: int, out_offset: int, count: int) -> None:
    """count bytes from src_fd at src_offset to out_fd at out_offset, in the kernel:
    copy_file_range (a reflink or in-kernel copy), else sendfile across file systems.
    Raises SourceEnded if src_fd ends first (it shrank)."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(
                src_fd, out_fd, count - done, src_offset + done, out_offset + done
            )
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            os.lseek(out_fd, out_offset + done, os.SEEK_SET)
            n = os.sendfile(out_fd, src_fd, src_offset + done, count - done)
        if n == 0:
            raise SourceEnded(count - done)
        done += n
