"""Spools: where a layer waits for its digest before a non-seekable output.

A layer's archive name holds its sha256, so on a pipe its bytes must be kept
until the hash is known (a layer whose digest the layer cache gives is not
spooled at all). They go to an unlinked temporary file, or, when
FASTLAYER_SPOOL_MEMORY allows it, to an in-memory file (memfd: page cache,
not process RSS); either way they are copied out with sendfile by a writer
thread, while the next layer is already being produced. The temporary file
is the default because it measured faster for 1 GiB into `| cat` (issue 10's
1.84 s against 2.46 s; here 5.74 against 7.67 s and 9.41 against 9.74 s
under load, bench/RESULTS.md), and a memfd holds shared memory that RSS does
not show.
"""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import tempfile
import threading

# A layer spools in memory only under FASTLAYER_SPOOL_MEMORY bytes (unset or 0:
# always on disk) and under a quarter of the available memory.
MEMORY_SHARE = 4


def _memory_cap() -> int:
    cap = os.environ.get("FASTLAYER_SPOOL_MEMORY")
    if not cap or not cap.isdigit() or int(cap) == 0:
        return 0
    return min(_available_memory() // MEMORY_SHARE, int(cap))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Spool:
    """A write-once, copy-out-once anonymous file of known final size."""

    def __init__(self, size: int | None, spool_dir: str | None = None):
        """size: the bytes to come; None when unknown, which spools to disk."""
        self.written = 0
        self.pool: SpoolPool | None = None
        small = size is not None and size < _memory_cap()
        self.in_memory = hasattr(os, "memfd_create") and small
        if self.in_memory:
            self.fd = os.memfd_create("fastlayer-spool", os.MFD_CLOEXEC)
        else:
            self.fd, name = tempfile.mkstemp(dir=spool_dir, prefix="fastlayer-spool-")
            os.unlink(name)

    def write(self, view: memoryview) -> None:
        # size grows as bytes come: it need not be known in advance
        self.written += len(view)
        while view:
            view = view[os.write(self.fd, view) :]

    @property
    def size(self) -> int:
        return self.written

    def copy_to(self, out_fd: int) -> None:
        sent = 0
        while sent < self.size:
            try:
                n = os.sendfile(out_fd, self.fd, sent, min(self.size - sent, 1 << 30))
            except OSError as e:
                # sendfile refuses some outputs (O_APPEND files): copy by hand
                if e.errno not in (errno.EINVAL, errno.ENOSYS) or sent:
                    raise
                self._copy_slowly(out_fd)
                return
            if n == 0:
                raise OSError("spool file ended early")
            sent += n

    def _copy_slowly(self, out_fd: int) -> None:
        offset = 0
        while offset < self.size:
            chunk = os.pread(self.fd, min(self.size - offset, 1 << 20), offset)
            if not chunk:
                raise OSError("spool file ended early")
            view = memoryview(chunk)
            while view:
                view = view[os.write(out_fd, view) :]
            offset += len(chunk)

    def close(self) -> None:
        """Done with the bytes: back to the pool it came from, else closed."""
        if self.pool is not None:
            self.pool.give(self)
        elif self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SpoolPool:
    """In-memory spools kept for the next layers of one archive.

    Writing over pages a memfd already holds costs a copy; fresh pages also
    cost allocating and zeroing them, two to three times as much here. At
    most `keep` spools wait in the pool (one being filled, one copied out)."""

    def __init__(self, spool_dir: str | None = None, keep: int = 2):
        self.spool_dir = spool_dir
        self.keep = keep
        self._free: list[Spool] = []
        self._lock = threading.Lock()

    def get(self, size: int | None) -> Spool:
        if size is not None and size < _memory_cap():
            with self._lock:
                if self._free:
                    spool = self._free.pop()
                    os.lseek(spool.fd, 0, os.SEEK_SET)
                    spool.written = 0
                    return spool
        spool = Spool(size, self.spool_dir)
        if spool.in_memory:
            spool.pool = self
        return spool

    def give(self, spool: Spool) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(spool)
                return
        spool.pool = None
        spool.close()

    def clear(self) -> None:
        with self._lock:
            spools, self._free = self._free, []
        for spool in spools:
            spool.pool = None
            spool.close()


class OrderedWriter:
    """Writes bytes and spools to fd in the order given, on its own thread.

    At most `depth` spools wait at once, which bounds the memory held when
    the reader of the pipe is slower than we are."""

    def __init__(self, fd: int, depth: int = 1):
        self.fd = fd
        self._q: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fastlayer-out", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            try:
                if self._error is None:
                    if isinstance(item, Spool):
                        item.copy_to(self.fd)
                    else:
                        view = memoryview(item)
                        while view:
                            view = view[os.write(self.fd, view) :]
            except BaseException as e:  # re-raised on the producing thread
                self._error = e
            finally:
                if isinstance(item, Spool):
                    item.close()
                    self._slots.release()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, item: bytes | Spool) -> None:
        self._check()
        if isinstance(item, Spool):
            self._slots.acquire()
        self._q.put(item)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join()
        self._check()

    def abort(self) -> None:
        self._error = self._error or RuntimeError("aborted")
        self._q.put(None)
        self._thread.join()


class HashingSpool:
    """A compressor's target: bytes into a spool, hashed as they go (blob digests)."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.spool.write(view)
        return len(view)

    def digest(self) -> str:
        return "sha256:" + self.sha256.hexdigest()
