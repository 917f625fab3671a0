"""A wall-clock limit on one arena cell, so a pathologically slow architecture cannot eat the whole budget.

The limit is an interval timer whose signal raises `CellTimeout` in the main thread. Python acts on the
signal between bytecodes, so a single long kernel finishes first; models built from many operations
stop promptly. Where timers are unavailable (no SIGALRM, or not the main thread) there is no limit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class CellTimeout(Exception):
    """A cell ran past its wall-clock limit."""


@contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    usable = (
        seconds is not None
        and seconds > 0
        and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise CellTimeout(f"stopped after {seconds:.1f} s, the cell's time limit")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
