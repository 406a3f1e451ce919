"""docker-archive writer: the outer tar of `<diff_id>/layer.tar` entries.

A layer's entry name holds its sha256, known only after its bytes. On a
regular-file output the header's place is reserved (its length depends
only on the size, which the walk fixed) and written back once the hash is
known: no byte is produced twice. On a pipe each layer goes through a
spool (see spool.py) copied out by a writer thread in archive order.
"""

from __future__ import annotations

import fcntl
import os
import stat
import tarfile
from collections.abc import Callable
from typing import BinaryIO

from fastlayer._native.tarstream import LayerStream, pack_header
from fastlayer.emit import StreamSource
from fastlayer.errors import CacheMismatch, FastlayerError
from fastlayer.model import Known, LayerSource
from fastlayer.sinks.spool import OrderedWriter, Spool, SpoolPool

BLOCK = 512
RECORD = 10240
_PLACEHOLDER_NAME = b"0" * 64 + b"/layer.tar"


def _pad(n: int) -> bytes:
    return b"\0" * (-n % BLOCK)


class DockerArchiveWriter:
    """Appends entries to an uncompressed tar written to fd, tarfile-compatible."""

    def __init__(self, fd: int, spool_dir: str | None = None):
        self.fd = fd
        self.offset = 0  # bytes of this archive written so far
        # pwrite ignores the offset on O_APPEND descriptors (`>> file`): spool there
        appending = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        self.seekable = stat.S_ISREG(os.fstat(fd).st_mode) and not appending
        # where the archive starts in the file, for writing headers back
        self.base = os.lseek(fd, 0, os.SEEK_CUR) if self.seekable else 0
        self.spool_dir = spool_dir
        self.last_offset: int | None = None  # of the last layer's bytes, when on a file
        self._ordered = None if self.seekable else OrderedWriter(fd)
        # sendfile into a pipe passes page references, not copies: a spool's pages
        # may still sit in the pipe after it returns, so spools are never reused there
        mode = os.fstat(fd).st_mode
        reuse = not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode))
        self._spools = SpoolPool(spool_dir, keep=2 if reuse else 0)

    def write(self, data: bytes | memoryview) -> None:
        if self._ordered is not None:
            self._ordered.put(bytes(data))
            self.offset += len(data)
            return
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
            self.offset += n

    def add_bytes(self, name: str, data: bytes, mtime: int) -> None:
        """A regular file as tarfile.TarInfo(name) defaults make it (0644, root, no names)."""
        self.write(pack_header(name.encode(), b"0", 0o644, len(data), mtime, 0, 0, b"", b""))
        self.write(data)
        self.write(_pad(len(data)))

    def add_tarinfo(self, ti: tarfile.TarInfo, src: BinaryIO | None) -> None:
        """Copy an entry of another archive as tarfile would (header re-encoded)."""
        self.write(ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if ti.isreg() and ti.size:
            assert src is not None
            left = ti.size
            while left:
                chunk = src.read(min(left, 1 << 20))
                if not chunk:  # the source archive is truncated: a user error
                    raise FastlayerError(f"unexpected end of data copying {ti.name}")
                self.write(chunk)
                left -= len(chunk)
            self.write(_pad(ti.size))

    def add_file(self, name: str, path: str, mtime: int) -> None:
        """A file from disk as tarfile.gettarinfo sees it, renamed, mtime forced."""
        with tarfile.open(fileobj=_Null(), mode="w|") as helper:
            ti = helper.gettarinfo(path)
        ti.name = name
        ti.mtime = mtime
        with open(path, "rb") as f:
            self.add_tarinfo(ti, f)

    def add_layer(self, source: LayerStream | LayerSource, mtime: int) -> str:
        """Write a layer as `<sha256>/layer.tar`; returns the sha256 hex."""
        if isinstance(source, LayerStream):
            source = StreamSource(source)
        return self.add_layer_as(source, mtime, lambda digest: f"{digest}/layer.tar")[0]

    def add_layer_as(
        self, source: LayerSource, mtime: int, name_of: Callable[[str], str]
    ) -> tuple[str, int]:
        """A layer entry named name_of(its sha256 hex); returns (hex, size).

        With a known size on a seekable output the header's place is
        reserved and written back; otherwise the bytes wait in a spool."""
        size = source.size
        self.last_offset = None
        if self.seekable and size is not None:
            start = self.offset
            hdr_len = len(self._layer_header(_PLACEHOLDER_NAME, size, mtime))
            self.write(b"\0" * hdr_len)
            self.last_offset = self.base + self.offset  # where the layer's bytes begin
            if getattr(source, "region", None) is not None:
                # bytes that lie as they are in a file: the kernel copies them
                digest = source.copy_to(self.fd, self.base + self.offset)  # type: ignore[attr-defined]
                self.offset += size
                os.lseek(self.fd, self.base + self.offset, os.SEEK_SET)
            else:
                digest = source.pump(self.write)
            produced = self.offset - start - hdr_len
            if produced != size:  # a header must not lie about its entry's size
                raise OSError(f"layer produced {produced} bytes, not the {size} announced")
            self.write(_pad(size))
            header = self._layer_header(name_of(digest).encode(), size, mtime)
            if len(header) != hdr_len:  # the placeholder must cover the real name
                raise ValueError(
                    f"entry name {name_of(digest)!r} is not {len(_PLACEHOLDER_NAME)} bytes"
                )
            os.pwrite(self.fd, header, self.base + start)
            return digest, size
        known = getattr(source, "known", None)
        if known is not None and size == known.size:
            return self._add_known(source, known, mtime, name_of), size
        spool = self._spools.get(size)
        try:
            digest = source.pump(spool.write)
        except BaseException:
            spool.close()
            raise
        size = spool.size
        self.add_spool(name_of(digest), spool, mtime)
        return digest, size

    def _add_known(
        self, source: LayerSource, known: Known, mtime: int, name_of: Callable[[str], str]
    ) -> str:
        """A layer whose diff_id a cache gave: named before its bytes, so streamed
        without a spool, and hashed as it goes; other bytes abort the archive."""
        claimed = known.diff_id.removeprefix("sha256:")
        self.write(self._layer_header(name_of(claimed).encode(), known.size, mtime))
        start = self.offset
        got = source.pump(self.write)
        if self.offset - start != known.size:
            raise OSError(f"layer produced {self.offset - start} bytes, not {known.size}")
        if got != claimed:
            raise CacheMismatch(known.diff_id, f"sha256:{got}")
        self.write(_pad(known.size))
        return claimed

    def _emit_spool(self, spool: Spool) -> None:
        size = spool.size
        if self._ordered is not None:
            self._ordered.put(spool)
        else:
            try:
                spool.copy_to(self.fd)
            finally:
                spool.close()
        self.offset += size
        self.write(_pad(size))

    @staticmethod
    def _layer_header(name: bytes, size: int, mtime: int) -> bytes:
        return pack_header(name, b"0", 0o644, size, mtime, 0, 0, b"", b"")

    def close(self) -> None:
        """End-of-archive blocks and padding to tarfile's record size."""
        end = self.offset + 2 * BLOCK
        self.write(b"\0" * (2 * BLOCK + (-end % RECORD)))
        if self._ordered is not None:
            self._ordered.close()
        self._spools.clear()

    def abort(self) -> None:
        """Stop the writer thread after a failure; the archive stays incomplete."""
        if self._ordered is not None:
            self._ordered.abort()
        self._spools.clear()

    def add_spool(self, name: str, spool: Spool, mtime: int) -> None:
        """A regular file (0644, root) whose bytes wait in spool; the spool is consumed."""
        self.write(self._layer_header(name.encode(), spool.size, mtime))
        self._emit_spool(spool)

    def add_symlink(self, name: str, target: str, mtime: int) -> None:
        self.write(
            pack_header(name.encode(), b"2", 0o777, 0, mtime, 0, 0, b"", b"", target.encode())
        )

    def add_dir(self, name: str, mtime: int) -> None:
        self.write(
            pack_header(name.rstrip("/").encode() + b"/", b"5", 0o755, 0, mtime, 0, 0, b"", b"")
        )


class _Null:
    """A write-only sink so tarfile.gettarinfo can run without an archive."""

    def write(self, data: bytes) -> int:
        return len(data)

    def tell(self) -> int:
        return 0
