"""SIGTERM and SIGHUP as an exception, so they clean up exactly as Ctrl-C does.

`handled()` (entered by cli.main) makes SIGTERM and SIGHUP raise Terminated
in the main thread, which unwinds through every `finally` and context
manager as KeyboardInterrupt does. `deferred()` holds a signal (SIGINT too)
back over a few lines that must not be cut in two, such as starting a child
process whose group is killed on the way out: the signal is raised when the
block ends.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

TERMINATING = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; the exit code is 128 + signo."""

    def __init__(self, signo: int):
        super().__init__(signo)
        self.signo = signo


_depth = 0  # deferred() blocks entered
_pending: int | None = None  # a signal that came inside one


def _exception(signo: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signo == signal.SIGINT else Terminated(signo)


def _on_signal(signo: int, frame: object) -> None:
    global _pending
    if signo != signal.SIGINT:  # a repeat must not cut the cleanup short (Ctrl-C still can)
        for s in TERMINATING:
            signal.signal(s, signal.SIG_IGN)
    if _depth:
        _pending = _pending or signo
        return
    raise _exception(signo)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """SIGTERM, SIGHUP (and SIGINT, for deferred()) raise while inside; signals
    that were ignored (nohup, a background job) stay ignored. Main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {}
    for s in (*TERMINATING, signal.SIGINT):
        if signal.getsignal(s) not in (signal.SIG_IGN, None):
            old[s] = signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A signal arriving inside is raised only when the block ends."""
    global _depth, _pending
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if not _depth and _pending is not None:
            signo, _pending = _pending, None
            raise _exception(signo)
