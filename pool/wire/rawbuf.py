"""Receive buffers for large frames, allocated without zeroing.

``bytearray(n)`` zero-fills its memory, and for a frame the kernel is about
to overwrite that is pure waste: perf on the supervisor showed
``__memset_avx2_unaligned_erms`` at 15% of its CPU during 1 MB round trips,
about 120 µs per megabyte per hop. ``PyByteArray_FromStringAndSize(NULL, n)``
is CPython's documented way to get a bytearray whose contents are left
uninitialised. Callers must fill every byte before anything reads it, which
is what a frame reader does (``recv_into`` until the frame is complete; an
incomplete frame is discarded, never parsed).

Used by the frame reader (``framebuf``) for frames that get a buffer of
their own, in the supervisor's channels, the worker and the client. Like
the rest of ``cruised.pool`` it runs under any code env's interpreter, so it
falls back to ``bytearray(n)`` where the C API is not reachable.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable


def _c_api() -> Callable[[None, int], bytearray] | None:
    try:
        fn = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except AttributeError:  # not CPython
        return None
    fn.restype = ctypes.py_object
    fn.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return fn


_from_string_and_size = _c_api()


def uninitialized(n: int) -> bytearray:
    """A bytearray of ``n`` bytes whose contents are undefined until written."""
    if _from_string_and_size is None or n <= 0:
        return bytearray(n)
    return _from_string_and_size(None, n)
