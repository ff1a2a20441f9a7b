"""Give the heap's freed memory back to the operating system while a long stage runs.

glibc keeps memory that a process freed for reuse; under the trainer's pattern of large,
short-lived tensors that reserve grew without bound on centered data (a SmolLM2 cell at d=576
reached 22 GB in 20 minutes, then thrashed). ``malloc_trim`` returns it; a daemon thread calls it
every few seconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from typing import Callable

_STARTED: list[threading.Thread] = []


def _trim_forever(trim: Callable[[int], int], seconds: float) -> None:
    """Call trim(0) every ``seconds``, for the life of the process."""
    while True:
        time.sleep(seconds)
        trim(0)


def trim_heap_every(seconds: float = 2.0) -> bool:
    """Start (once per process) a daemon thread that calls glibc's malloc_trim(0) every
    ``seconds``; False where the C library has no malloc_trim (not glibc)."""
    if _STARTED:
        return True
    name = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    if trim is None:
        return False
    thread = threading.Thread(target=_trim_forever, args=(trim, seconds), name="trim-heap", daemon=True)
    thread.start()
    _STARTED.append(thread)
    return True
