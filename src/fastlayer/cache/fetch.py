"""A layer taken from the shared cache by `build`: its blob downloaded and checked.

An entry (cache/remote.py) is a hint. Its blob is downloaded ahead of the
sink (a few at once) into a spool; its bytes are hashed and counted as they
arrive (the entry's blob digest and size) and, on another thread,
decompressed, hashed and counted (its diff_id and size). Any difference, a
short body or a failed request is HintFailed, raised before the sink gets a
byte, so the builder builds the layer from the store instead, as if the
entry had never been seen.

When to download rather than read the store is measured, not guessed
(bench/bench_registry_cache.py --part build, bench/RESULTS.md): an output
that stores the layer compressed in the very blob kind the entry holds gets
the blob as it is (no compression: 0.82x the store's time for zstd, 0.93x
for gzip, whose ISA-L deflate is nearly as fast as a checked download); an
output that stores layers uncompressed (a docker-archive, even one
compressed whole, or an uncompressed OCI layout) reads the store, which
took a third of the time of downloading and decompressing. FASTLAYER_CACHE_FETCH=always|never
overrides the rule (measurements, tests).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

from fastlayer.errors import FastlayerError
from fastlayer.model import Known
from fastlayer.sinks.spool import Spool

POLICIES = ("auto", "always", "never")
_END = None
QUEUED = 8  # chunks between the download and the decompressing thread: bounds memory


class HintFailed(FastlayerError):
    """The blob a shared cache entry named could not be had, or was not what it said."""

    quiet = False  # the cache warned of the cause already, for every layer


def policy() -> str:
    value = os.environ.get("FASTLAYER_CACHE_FETCH", "auto") or "auto"
    if value not in POLICIES:
        raise FastlayerError(f"FASTLAYER_CACHE_FETCH={value!r}: use one of {', '.join(POLICIES)}")
    return value


def may_fetch(stores: str | None) -> bool:
    """Whether an output storing blobs of kind `stores` (None: uncompressed layers)
    could take any layer from the shared cache: if not, the cache is not asked."""
    chosen = policy()
    return chosen == "always" or (chosen == "auto" and stores is not None)


def fetch_kind(stores: str | None, blobs: dict[str, tuple[str, int]]) -> str | None:
    """The blob kind to download for a layer whose entry holds blobs, for an output
    storing blobs of kind `stores`; None: build it from the store (see the module)."""
    chosen = policy()
    if chosen == "never":
        return None
    if stores is not None and stores in blobs:
        return stores
    if chosen == "always" and blobs:
        return min(blobs, key=lambda k: ("none", "zstd", "gzip").index(k.split("/")[0]))
    return None


class FetchedLayer:
    """A LayerSource whose bytes come from a shared cache entry's blob, checked.

    The download runs ahead on a Prefetch pool into a spool (an unlinked
    temporary file), checked whole there; pump_blob() then passes the blob as
    downloaded (as_blob: for an output storing that blob kind), pump() the
    uncompressed layer (else). Both return the diff_id's hex, or raise
    HintFailed. fallback makes the layer's source from the store, for then."""

    size: int | None = None  # unknown to writers: they spool it, never write it in place

    def __init__(
        self, chunks: Callable[[str], Iterator[bytes]], known: Known, kind: str, key: str,
        fallback: Callable[[], Any], as_blob: bool = True,
    ):  # fmt: skip
        self.chunks = chunks  # digest -> the blob's bytes as they come
        self.expected = known
        self.blob_kind = kind
        self.digest, self.blob_size = known.blobs[kind]
        self.key = key  # the entry's key, for messages
        self.fallback = fallback
        self.as_blob = as_blob
        self.future: Future[tuple[Spool, str]] | None = None
        self.stop = threading.Event()  # set by Prefetch.close

    def _download(self) -> tuple[Spool, str]:
        spool = Spool(None)
        try:
            if self.as_blob:
                return spool, self._run(spool.write, None)
            return spool, self._run(None, spool.write)
        except BaseException:
            spool.close()
            raise

    def pump_blob(self, write: Callable[[memoryview], object]) -> str:
        assert self.as_blob
        return self._copy_out(write)

    def pump(self, write: Callable[[memoryview], object]) -> str:
        assert not self.as_blob
        return self._copy_out(write)

    def copy_blob_to(self, fd: int) -> str:
        """pump_blob into a file descriptor, copied by the kernel."""
        assert self.as_blob
        spool, diff_id = self._take()
        try:
            spool.copy_to(fd)
        finally:
            spool.close()
        return diff_id

    def _take(self) -> tuple[Spool, str]:
        """The checked download (HintFailed if it was not what the entry says)."""
        future, self.future = self.future, None
        if future is None:
            return self._download()
        try:
            return future.result()
        except BaseException:  # HintFailed, or Ctrl-C while waiting: its spool is closed
            future.add_done_callback(_close_spool)
            raise

    def _copy_out(self, write: Callable[[memoryview], object]) -> str:
        spool, diff_id = self._take()
        try:
            offset = 0
            while offset < spool.size:
                chunk = os.pread(spool.fd, min(spool.size - offset, 1 << 20), offset)
                if not chunk:
                    raise OSError("spool file ended early")
                write(memoryview(chunk))
                offset += len(chunk)
        finally:
            spool.close()
        return diff_id

    def discard(self) -> None:
        """Not to be used: its download stopped, its spool closed when it ends (never
        waited for: a download the registry trickles would hold up Ctrl-C)."""
        future, self.future = self.future, None
        if future is not None and not future.cancel():
            future.add_done_callback(_close_spool)

    def _run(self, blob_out: Callable | None, layer_out: Callable | None) -> str:
        """Download; blob_out gets the blob's bytes, layer_out the decompressed ones."""
        compression = self.blob_kind.split("/")[0]
        plain = compression == "none"  # the blob is the layer: one hash does for both
        todo: queue.Queue[bytes | None] = queue.Queue(QUEUED)
        box: list[Any] = []
        worker = threading.Thread(
            target=_unpack, args=(compression, todo, layer_out, self.expected.size, box),
            name="fastlayer-unpack", daemon=True,
        )  # fmt: skip
        if not plain:
            worker.start()
        blob = hashlib.sha256()
        got = 0
        try:
            try:
                for chunk in self.chunks(self.digest):
                    if self.stop.is_set():  # the build ended: no one will take it
                        raise self._failed("its download was stopped")
                    got += len(chunk)
                    if got > self.blob_size:
                        raise self._failed(f"its blob is larger than the {self.blob_size} bytes "
                                           "the entry says")  # fmt: skip
                    blob.update(chunk)
                    if blob_out is not None:
                        blob_out(memoryview(chunk))
                    if plain:
                        if layer_out is not None:
                            layer_out(memoryview(chunk))
                        continue
                    if box:  # the decompressing thread failed: stop downloading
                        break
                    todo.put(chunk)
            except HintFailed:
                raise
            except FastlayerError as e:
                failed = self._failed(f"its blob could not be read ({e})")
                failed.quiet = getattr(e, "quiet", False)
                raise failed from None
        finally:
            if not plain:
                _put_end(todo, worker)
                worker.join()
        if plain:
            box.append((blob.hexdigest(), got))
        if box and isinstance(box[0], _Longer):
            raise self._failed(f"its blob holds another layer (more than the {box[0]} bytes "
                               "the entry says)")  # fmt: skip
        if box and isinstance(box[0], BaseException):
            raise self._failed(f"its blob does not decompress as {compression} ({box[0]})")
        if got != self.blob_size or f"sha256:{blob.hexdigest()}" != self.digest:
            raise self._failed(f"its blob is not {self.digest[:19]} of {self.blob_size} bytes")
        diff_id, size = box[0]
        if (f"sha256:{diff_id}", size) != (self.expected.diff_id, self.expected.size):
            raise self._failed(f"its blob holds another layer (sha256:{diff_id[:12]}, "
                               f"{size} bytes) than the entry says")  # fmt: skip
        return diff_id

    def _failed(self, why: str) -> HintFailed:
        return HintFailed(f"entry {self.key[:12]}: {why}")


class Prefetch:
    """Downloads of FetchedLayers run AHEAD at once, in image order, while the sink
    writes earlier layers: one after another, each would wait on its request.
    Done ones wait in their spools (temporary files, not memory) until taken.

    The downloading threads are daemons, never joined: a build that ends (an
    error, Ctrl-C, SIGTERM) stops them at their next chunk and leaves at once,
    where a registry trickling a blob would otherwise keep it until the deadline."""

    AHEAD = 4

    def __init__(self, layers: list[FetchedLayer]):
        self.layers = layers
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        # the workers' own list: a layer's future attribute is emptied when it is taken
        self.futures: list[Future[tuple[Spool, str]]] = [Future() for _ in layers]
        for layer, future in zip(layers, self.futures, strict=True):
            layer.stop, layer.future = self.stop, future
        for _ in range(min(self.AHEAD, len(layers))):
            threading.Thread(target=self._work, name="fastlayer-fetch", daemon=True).start()

    def _work(self) -> None:
        while not self.stop.is_set():
            with self._lock:
                if self._next >= len(self.layers):
                    return
                k, self._next = self._next, self._next + 1
            layer, future = self.layers[k], self.futures[k]
            if not future.set_running_or_notify_cancel():
                continue  # taken or discarded before its turn
            try:
                future.set_result(layer._download())
            except BaseException as e:
                future.set_exception(e)

    def close(self) -> None:
        """Stop what is left (a build that failed): nothing keeps a spool."""
        self.stop.set()
        for layer in self.layers:
            layer.discard()

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_spool(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[0].close()


class _Longer(Exception):
    """The layer decompresses to more bytes than its entry says (so many)."""


def _put_end(todo: queue.Queue, worker: threading.Thread) -> None:
    """The end marker, without blocking on a full queue if the worker stopped."""
    while worker.is_alive():
        try:
            todo.put(_END, timeout=0.1)
            return
        except queue.Full:
            continue


def _unpack(
    compression: str, todo: queue.Queue, write: Callable[[memoryview], object] | None,
    limit: int, box: list,
) -> None:  # fmt: skip
    """Decompress, hash and count the chunks of todo (write gets the bytes); box gets
    (hex, size), or the exception that stopped it (then the rest is drained). More
    than limit bytes stop it: the entry said how many there are."""
    digest = hashlib.sha256()
    size = 0
    source = _QueueReader(todo)
    try:
        reader = _decompressed(compression, source)
        while out := reader.read(OUT):  # bounded: a blob that inflates hugely costs no memory
            digest.update(out)
            size += len(out)
            if size > limit:
                raise _Longer(limit)
            if write is not None:
                write(memoryview(out))
        if not source.ended and source.read(1):
            raise ValueError("bytes after the end of the compressed stream")
        box.append((digest.hexdigest(), size))
    except BaseException as e:  # handed to the downloading thread
        box.append(e)
        while not source.ended:
            source.read(1 << 20)


OUT = 1 << 20


class _QueueReader:
    """A file-like reader of the chunks put in a queue (None: the end)."""

    def __init__(self, todo: queue.Queue):
        self.todo = todo
        self.buf = b""
        self.ended = False

    def read(self, n: int = -1) -> bytes:
        while not self.buf and not self.ended:
            chunk = self.todo.get()
            if chunk is _END:
                self.ended = True
            else:
                self.buf = chunk
        if n < 0:
            n = len(self.buf)
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


def _decompressed(compression: str, source: _QueueReader) -> Any:
    """A reader of source's bytes decompressed; several concatenated gzip members or
    zstd frames are one stream."""
    if compression == "none":
        return source
    if compression == "gzip":
        from isal import igzip

        return igzip.IGzipFile(fileobj=source, mode="rb")  # type: ignore[arg-type]
    if compression == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True)
    raise ValueError(f"unknown compression {compression!r}")
