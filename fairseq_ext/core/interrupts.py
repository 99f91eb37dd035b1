"""Ctrl-C and SIGTERM as one exception, held back while a file is being written.

Inside ``handled()``, SIGINT and SIGTERM raise ``Interrupted`` (a KeyboardInterrupt,
so ``except Exception`` blocks let it through), whose ``exit_status`` is the shell's
128 + signal number: 130 for Ctrl-C, 143 for SIGTERM.  Inside ``deferred()`` (a
checkpoint being written) the signal waits until the block ends, so a stop never
leaves a file half written.  Once raised, repeated signals of the same stop (Ctrl-C
reaches every process of the terminal's group, and a driver forwards it too) are
ignored while the program winds down.
"""
import contextlib
import signal
import threading
from typing import Optional

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_status = 128 + signum


_deferring = 0
_pending: Optional[int] = None
_stopping = False


def _on_signal(signum, frame) -> None:
    global _pending, _stopping
    if _stopping:
        return
    if _deferring:
        _pending = signum
        return
    _stopping = True
    raise Interrupted(signum)


@contextlib.contextmanager
def handled():
    """SIGINT and SIGTERM raise Interrupted while the block runs (main thread only; elsewhere a no-op)."""
    global _stopping, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    _stopping, _pending = False, None
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred():
    """Hold SIGINT/SIGTERM back until the block ends, then raise Interrupted."""
    global _deferring, _pending, _stopping
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending is not None and not _stopping:
        signum, _pending, _stopping = _pending, None, True
        raise Interrupted(signum)


def stopping() -> bool:
    """Whether a stop signal has been raised (the program is winding down)."""
    return _stopping
