"""narHash and narSize of filesystem paths, without materialising the NAR.

One pass per file: the native walker (fastlayer._native.nar) streams the
NAR into reused buffers that go straight into a sha256 object. Several
paths hash in parallel threads, since the walker holds the GIL only to hand
a full buffer to the hash (which releases it again). With CPUs to spare, one
path hashes on a second thread while the walker reads ahead (`pipelined`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import SimpleQueue

from fastlayer._native import nar as _nar
from fastlayer.errors import FastlayerError
from fastlayer.nix import base32

StrPath = str | os.PathLike[str] | bytes

# 1 MiB keeps syscalls and sink calls rare while the buffer stays in L2/L3.
BUFFER_SIZE = 1 << 20


@dataclass(frozen=True)
class NarInfo:
    """A path's NAR hash (Nix's `sha256:<nix-base32>` and SRI forms) and size."""

    nar_hash: str
    sri: str
    nar_size: int

    @classmethod
    def from_digest(cls, digest: bytes, nar_size: int) -> NarInfo:
        return cls(
            nar_hash="sha256:" + base32.encode(digest),
            sri="sha256-" + base64.b64encode(digest).decode("ascii"),
            nar_size=nar_size,
        )


def walk(
    path: StrPath,
    sink: Callable[[memoryview], object],
    table: int = 0,
    found: bytearray | None = None,
    nbuf: int = 1,
) -> int:
    """Stream path's NAR into sink (see _native.nar.nar_walk); FastlayerError on bad input."""
    raw = os.fsencode(path)
    try:
        return _nar.nar_walk(raw, sink, table, found, BUFFER_SIZE, nbuf)
    except OSError as e:
        where = e.filename if e.filename is not None else os.fsdecode(raw)
        raise FastlayerError(f"{where}: {e.strerror}") from None
    except _nar.NarError as e:
        raise FastlayerError(str(e)) from None


class _HashThread:
    """sha256 on a thread of its own; the walker fills the next buffer meanwhile.

    Called with a view, it queues it and returns an Event the walker waits on
    before reusing that buffer (the ticket protocol of nar_walk).
    """

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.error: BaseException | None = None
        self._queue: SimpleQueue[tuple[memoryview, threading.Event] | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="nar-sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Every ticket gets set, whatever happens: the walker waits on them.
        while (item := self._queue.get()) is not None:
            view, done = item
            try:
                if self.error is None:
                    self.hash.update(view)
            except BaseException as e:  # re-raised by nar_hash on the caller's thread
                self.error = e
            finally:
                done.set()

    def __call__(self, view: memoryview) -> threading.Event:
        done = threading.Event()
        self._queue.put((view, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


def nar_hash(path: StrPath, pipelined: bool | None = None) -> NarInfo:
    """NAR sha256 and size of one path (file, directory or symlink).

    pipelined: hash on a second thread while reading ahead; default when
    this process may use more than one CPU.
    """
    if pipelined is None:
        pipelined = default_jobs() > 1
    if not pipelined:
        h = hashlib.sha256()
        size = walk(path, h.update)
        return NarInfo.from_digest(h.digest(), size)
    hasher = _HashThread()
    try:
        size = walk(path, hasher, nbuf=3)
    finally:
        hasher.close()
    if hasher.error is not None:
        raise hasher.error
    return NarInfo.from_digest(hasher.hash.digest(), size)


def default_jobs() -> int:
    """Threads to use: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def nar_hash_many(paths: Iterable[StrPath], jobs: int | None = None) -> list[NarInfo]:
    """nar_hash of each path, in the order given, several at a time."""
    paths = list(paths)
    jobs = jobs or default_jobs()
    # Fewer paths than CPUs: give each its own hashing thread too.
    pipelined = len(paths) < jobs

    def one(path: StrPath) -> NarInfo:
        return nar_hash(path, pipelined)

    return parallel_map(one, paths, jobs)


def parallel_map(fn: Callable, items: Sequence, jobs: int | None = None) -> list:
    """[fn(x) for x in items] on up to `jobs` threads; the first error is raised."""
    jobs = min(jobs or default_jobs(), len(items))
    if jobs <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(fn, items))
