"""Where an archive's bytes land: stdout, or a file written whole or not at all."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

from fastlayer.errors import FastlayerError


@contextlib.contextmanager
def output_fd(path: str | None) -> Iterator[int]:
    """Yield a file descriptor for path ("-" or None: stdout).

    A file is written under a temporary name in the same directory and
    renamed into place only when the body succeeds; on any error it is
    removed, so no half-written image is ever left behind."""
    if path in (None, "-"):
        sys.stdout.flush()
        yield sys.stdout.fileno()
        return
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastlayer-", suffix=".part")
    except OSError as e:
        raise FastlayerError(f"cannot write {path}: {e.strerror}") from None
    try:
        yield fd
        os.fchmod(fd, 0o644 & ~_umask())
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
