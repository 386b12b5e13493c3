"""glibc heap tuning shared by the supervisor and the workers: large buffers stay warm, idle heap goes back.

Each large payload (a frame, a buffer copied out of a shared file, a ``bytes``
unpickled from it) is a buffer of its own. glibc serves blocks over 128 KiB
from a fresh ``mmap`` and unmaps them on ``free``, so every copy into one pays
a page fault per 4 KiB: on the reference VM that made a 1 MB copy cost 3-5x a
copy into warm memory (perf stat: 544 faults and ~1 ms of supervisor CPU per
1 MB round trip). ``keep_large_buffers_warm`` serves them from the heap
instead, whose freed pages are reused; ``trim`` hands freed pages back to the
kernel, which the owner does when idle (the supervisor every 30 s, a worker
after a second without calls), so memory stays bounded. Workers in a pool
with ``max_rss`` keep glibc's defaults: that limit is checked right after
each call, when warm pages would still count. Blocks above 32 MiB
are mmapped as before.

Without glibc (musl, or no ``libc.so.6``) both are no-ops.
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any, Final

#: glibc mallopt parameters
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
#: below this size blocks come from the heap, not a fresh mmap (glibc's largest allowed on 64-bit)
HEAP_UP_TO: Final = 32 << 20
#: free heap at the top above this is returned at once; below it, by ``trim``
TRIM_ABOVE: Final = 256 << 20


def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC: Final = _libc()


def keep_large_buffers_warm() -> bool:
    """Serve blocks up to ``HEAP_UP_TO`` from the heap; True if glibc took the settings."""
    if _LIBC is None:
        return False
    return bool(_LIBC.mallopt(M_MMAP_THRESHOLD, HEAP_UP_TO)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE))


def trim() -> None:
    """Return freed heap pages to the kernel (well under a millisecond)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def private_rss(pid: int | str = "self") -> int:
    """Bytes of a process's private resident memory (``RssAnon``): statm's resident pages less its
    shared ones (mapped files and shmem, such as a call's shared file)."""
    with open(f"/proc/{pid}/statm", "rb") as fh:
        fields = fh.read().split()
    return (int(fields[1]) - int(fields[2])) * mmap.PAGESIZE
