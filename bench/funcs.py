"""The workload functions, importable by every peer (pickled by reference).

cruised ships these by value (see daemon/client/shipping.py), the peers by module
reference; the bodies are identical, so every row runs the same code.
Time stamps use ``time.monotonic()``: CLOCK_MONOTONIC is system-wide on
Linux, so a worker's stamps compare directly with the caller's.
"""

from __future__ import annotations

import os
import time
from typing import Any


def add10(x: Any) -> Any:
    return x + 10


def echo(x: Any) -> Any:
    return x


def nap(ms: float) -> tuple[float, float, int]:
    """Sleep ``ms`` milliseconds; (start, end, pid) in monotonic seconds."""
    start = time.monotonic()
    time.sleep(ms / 1000.0)
    return start, time.monotonic(), os.getpid()


def getpid(_: Any = None) -> int:
    return os.getpid()


def warm_imports(_: Any = None) -> int:
    """Import what the memory rows preload, then collect fully, as every long-lived worker eventually does.

    Every peer's worker then holds the same modules, and a fork-shared page that
    the collector would dirty is already dirty when PSS is read.
    """
    import gc

    import numpy  # noqa: F401 - preloaded for its effect: every peer's worker holds the same modules
    import pandas  # noqa: F401 - preloaded for its effect: every peer's worker holds the same modules

    gc.collect()
    return os.getpid()
