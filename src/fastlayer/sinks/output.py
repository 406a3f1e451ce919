"""Where an archive's bytes land: stdout, a stream, or a file written whole or not at all.

What `-o PATH` does, by what PATH is (README "Command line"):
- missing, or a regular file: written under a temporary name beside it and
  renamed into place only when the image is complete;
- a symlink: followed; the file it names is what the rules above and below
  apply to (the link itself stays a link), a dangling link creates its target;
- a fifo or a character device (/dev/null, /dev/stdout on a pipe): the
  archive streams into it, nothing is replaced (a terminal is refused);
- a directory, a socket or a block device: refused, nothing is touched.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from fastlayer.errors import FastlayerError
from fastlayer.untrusted import file_kind


@dataclass(frozen=True)
class Target:
    """How an output path is written: `path` renamed into place, or streamed into."""

    path: str
    stream: bool


def is_stdout(path: str | None) -> bool:
    """Whether output to path lands on this process's stdout ("-", /dev/stdout, ...)."""
    if path in (None, "-"):
        return True
    try:
        st, out = os.stat(path), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def output_target(path: str) -> Target:
    """What writing an archive to path means; refuses what must not be replaced."""
    try:
        st = os.stat(path)  # follows symlinks: the file they name is the output
    except FileNotFoundError:
        # missing, or a dangling symlink: its target is created, the link kept
        return Target(os.path.realpath(path) if os.path.islink(path) else path, False)
    except OSError as e:
        raise FastlayerError(f"cannot write {path}: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return Target(_real_file(path, st), False)
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return Target(path, True)
    hint = " (--format oci-dir writes a directory)" if stat.S_ISDIR(st.st_mode) else ""
    raise FastlayerError(
        f"cannot write {path}: it is {file_kind(st.st_mode)}; "
        f"-o takes a file, a fifo or a character device{hint}"
    )


def _real_file(path: str, st: os.stat_result) -> str:
    """The path to replace for a regular file reached through path (and its links)."""
    if not os.path.islink(path):
        return path
    real = os.path.realpath(path)
    try:
        again = os.stat(real)
    except OSError:
        again = None
    if again is None or (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
        # e.g. /proc/self/fd/N of a deleted file: nothing to rename over
        raise FastlayerError(f"cannot write {path}: it names a file that has no path to replace")
    return real


@contextlib.contextmanager
def output_fd(path: str | None) -> Iterator[int]:
    """Yield a file descriptor for path ("-" or None: stdout), per the module's rules.

    A file is written under a temporary name in the same directory and
    renamed into place only when the body succeeds; on any error it is
    removed, so no half-written image is ever left behind."""
    if path in (None, "-"):
        if os.isatty(sys.stdout.fileno()):
            raise FastlayerError("refusing to write an image to a terminal; use -o FILE or a pipe")
        sys.stdout.flush()
        yield sys.stdout.fileno()
        return
    target = output_target(path)
    if target.stream:
        fd = _open_stream(path)
        try:
            yield fd
        finally:
            os.close(fd)
        return
    with _atomic_fd(target.path, path) as fd:
        yield fd


def write_output(path: str, data: bytes) -> None:
    """data written to path by the same rules as an image (--metadata and the like)."""
    with output_fd(path) as fd:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]


def _open_stream(path: str) -> int:
    """A fifo or character device opened for writing (a fifo waits for its reader)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise FastlayerError(f"cannot write {path}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    problem = ""
    if not (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):  # swapped since it was looked at
        problem = f"it is {file_kind(mode)} now"
    elif os.isatty(fd):
        problem = "refusing to write an image to a terminal"
    if problem:
        os.close(fd)
        raise FastlayerError(f"cannot write {path}: {problem}")
    return fd


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # errors only a write gives


@contextlib.contextmanager
def _atomic_fd(real: str, given: str) -> Iterator[int]:
    """A new file renamed over real when the body succeeds; given names it in messages."""
    directory = os.path.dirname(os.path.abspath(real))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".fastlayer-", suffix=".part")
    except OSError as e:
        via = f" (it links to {real})" if real != given else ""
        raise FastlayerError(f"cannot write {given}{via}: {e.strerror}") from None
    try:
        try:
            yield fd
        except OSError as e:
            # A write to fd carries no file name: say which output filled up.
            if e.filename is None and e.errno in _FULL:
                raise FastlayerError(f"cannot write {given}: {e.strerror}") from None
            raise
        os.fchmod(fd, 0o644 & ~_umask())
        os.close(fd)
        fd = -1
        try:
            os.replace(tmp, real)
        except OSError as e:  # e.g. real became a directory meanwhile
            raise FastlayerError(f"cannot write {given}: {e.strerror}") from None
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
