"""Deterministic multi-core gzip and zstd, for whole archives and OCI blobs.

gzip: ISA-L (`isal`) deflates fixed 1 MiB blocks on every core, each with
the previous block's last 32 KiB as its dictionary (pigz's scheme). The
blocks are cut at fixed offsets, so the bytes depend only on the data (and
the isal version): not on how writes were chunked, nor on the thread count.

zstd: libzstd's multi-threaded mode (`zstandard`, threads >= 1) cuts jobs at
sizes fixed by the level, so its output is the same for 1 or N workers.
threads=0 (single-threaded mode) would differ, hence we never use it.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

from fastlayer.errors import FastlayerError
from fastlayer.model import LayerSource

KINDS = ("none", "gzip", "zstd")
GZIP_BLOCK = 1 << 20
DEFLATE_WINDOW = 1 << 15
GZIP_LEVEL = 2  # ISA-L 0..3 (2: its default); ratio of pigz -1, far faster (RESULTS-compress)
ZSTD_LEVEL = 3  # zstd's own default


def blob_kind(kind: str) -> str:
    """kind with what fixes its bytes (level, encoder version): a blob digest
    recorded under one blob kind is what compressing the same layer gives again."""
    if kind == "gzip":
        from isal import __version__ as isal_version

        return f"gzip/{GZIP_LEVEL}-isal-{isal_version}-{GZIP_BLOCK}"
    if kind == "zstd":
        import zstandard

        version = ".".join(map(str, zstandard.ZSTD_VERSION))
        return f"zstd/{ZSTD_LEVEL}-libzstd-{version}"
    return "none/1"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Writable(Protocol):
    def write(self, data: bytes | memoryview, /) -> object: ...


class Compressor(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...

    def close(self) -> None:
        """Flush and end the stream; the target stays open."""
        ...

    def abort(self) -> None:
        """Stop after a failure, writing nothing more."""
        ...


def compressor(kind: str, target: Writable, threads: int = 0) -> Compressor:
    """A compressing writer into target (bytes pass through for "none")."""
    threads = threads or cores()
    if kind == "gzip":
        return _Gzip(target, threads)
    if kind == "zstd":
        return _Zstd(target, threads)
    if kind == "none":
        return _Plain(target)
    raise FastlayerError(f"unknown compression {kind!r}; use one of {', '.join(KINDS)}")


class _Plain:
    def __init__(self, target: Writable):
        self.target = target

    def write(self, data: bytes | memoryview) -> None:
        self.target.write(data)

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class _Gzip:
    """pigz's scheme on ISA-L: fixed blocks deflated in parallel, each primed with
    the previous block's last 32 KiB and ended by a sync flush, joined in order
    into one gzip member. The zlib calls release the GIL."""

    def __init__(self, target: Writable, threads: int):
        from isal import isal_zlib

        self._z = isal_zlib
        self._target = target
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="fastlayer-gzip")
        self._pending: deque[Future] = deque()
        self._window = 2 * threads  # blocks in flight: bounds memory
        self._buf = bytearray()
        self._prev = b""
        self._crc = 0
        self._size = 0
        # gzip header: no name, mtime 0, OS "unknown": nothing varies between runs
        target.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        if self._buf:
            take = min(len(view), GZIP_BLOCK - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < GZIP_BLOCK:
                return
            self._block(bytes(self._buf))
            self._buf.clear()
        while len(view) >= GZIP_BLOCK:
            self._block(bytes(view[:GZIP_BLOCK]))
            view = view[GZIP_BLOCK:]
        self._buf += view

    def _block(self, block: bytes) -> None:
        zdict = self._prev[-DEFLATE_WINDOW:]
        self._pending.append(self._pool.submit(_deflate, self._z, block, zdict))
        self._prev = block
        while len(self._pending) > self._window:
            self._emit()

    def _emit(self) -> None:
        data, crc, n = self._pending.popleft().result()
        self._crc = self._z.crc32_combine(self._crc, crc, n)
        self._size += n
        self._target.write(data)

    def close(self) -> None:
        if self._buf:
            self._block(bytes(self._buf))
            self._buf.clear()
        while self._pending:
            self._emit()
        self._pool.shutdown()
        self._target.write(self._z.compress(b"", wbits=-15))  # the final, empty block
        self._target.write(struct.pack("<II", self._crc, self._size & 0xFFFFFFFF))

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)


def _deflate(z: Any, block: bytes, zdict: bytes) -> tuple[bytes, int, int]:
    c = z.compressobj(GZIP_LEVEL, z.DEFLATED, -15, zdict=zdict) if zdict else (
        z.compressobj(GZIP_LEVEL, z.DEFLATED, -15)
    )  # fmt: skip
    return c.compress(block) + c.flush(z.Z_SYNC_FLUSH), z.crc32(block), len(block)


class _Zstd:
    def __init__(self, target: Writable, threads: int):
        import zstandard

        cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=max(1, threads))
        self._out = cctx.stream_writer(_Unclosable(target), closefd=False)  # type: ignore[arg-type]

    def write(self, data: bytes | memoryview) -> None:
        self._out.write(data)

    def close(self) -> None:
        self._out.close()

    def abort(self) -> None:
        pass  # libzstd's workers belong to the context, freed with it


class _Unclosable:
    """Forwards writes; close() is the owner's business, not the compressor's."""

    def __init__(self, target: Writable):
        self._target = target

    def write(self, data: bytes | memoryview) -> int:
        self._target.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False

    def writable(self) -> bool:
        return True


class FdWriter:
    """Writes everything to fd, counting and hashing what it wrote."""

    def __init__(self, fd: int, hashing: bool = True):
        self.fd = fd
        self.size = 0
        self.sha256 = hashlib.sha256() if hashing else None

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        if self.sha256 is not None:
            self.sha256.update(view)
        self.size += len(view)
        while view:
            view = view[os.write(self.fd, view) :]
        return len(data)


class CompressingPipe:
    """A pipe whose bytes are compressed into out_fd by a thread.

    Writers that need a file descriptor (the tar writer) write to `fd`; the
    pipe makes them stream (spool) rather than seek, which compression needs."""

    def __init__(self, kind: str, out_fd: int, threads: int = 0):
        if kind not in KINDS:
            raise FastlayerError(f"unknown compression {kind!r}; use one of {', '.join(KINDS)}")
        self._r, self.fd = os.pipe()
        self._args = (kind, out_fd, threads)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fastlayer-compress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            # made on this thread: the compressor belongs to the thread that writes it
            kind, out_fd, threads = self._args
            comp = compressor(kind, FdWriter(out_fd, hashing=False), threads)
            while chunk := os.read(self._r, 1 << 20):
                comp.write(chunk)
            comp.close()
        except BaseException as e:  # re-raised by close()
            self._error = e
            # keep draining so the writer side never blocks on a full pipe
            while os.read(self._r, 1 << 20):
                pass
        finally:
            os.close(self._r)

    def close(self) -> None:
        """End of input: wait until everything is compressed and written."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._thread.join()
        if self._error is not None:
            raise self._error


def kind_for(path: str | None, compress: str | None) -> str:
    """The compression asked for: explicit, else by the output's extension."""
    if compress and compress != "auto":
        if compress not in KINDS:
            raise FastlayerError(f"unknown compression {compress!r}; use one of {', '.join(KINDS)}")
        return compress
    name = (path or "").lower()
    if name.endswith((".gz", ".tgz")):
        return "gzip"
    if name.endswith((".zst", ".tzst")):
        return "zstd"
    return "none"


def pump_compressed(source: LayerSource, kind: str, target: Writable) -> tuple[str, int]:
    """Produce source through a compressor into target; returns (sha256 hex, size) of
    the uncompressed bytes."""
    comp = compressor(kind, target)
    size = 0

    def write(view: memoryview) -> None:
        nonlocal size
        size += len(view)
        comp.write(view)

    try:
        digest = source.pump(write)
    except BaseException:
        comp.abort()
        raise
    comp.close()
    return digest, size
