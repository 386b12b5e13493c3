"""Bundles: pickle protocol 5 with out-of-band buffers, laid out for one sendmsg.

``pack`` returns a list of buffers (a small index, the pickle stream, then each
out-of-band buffer as a zero-copy view) that the caller appends to a frame
header and writes with a single ``sendmsg``. ``unpack`` reads a bundle out of a
received frame without copying the buffers: numpy arrays in the result point
into the frame's memory.

Objects plain pickle refuses (lambdas, closures, classes defined in
``__main__``) fall back to dill, whose output loads with plain ``pickle`` as
long as dill is importable on the loading side.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

_COUNT = struct.Struct("<H")
_LEN = struct.Struct("<Q")
#: the index of a bundle without out-of-band buffers (the common case: no arrays)
_PLAIN = struct.Struct("<HQ")
PROTOCOL = 5


def pack(obj: Any) -> list[bytes | memoryview]:
    buffers: list[pickle.PickleBuffer] = []
    try:
        data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
    except (pickle.PicklingError, TypeError, AttributeError):
        import dill

        buffers = []
        data = dill.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append, recurse=True)
    if not buffers:
        return [_PLAIN.pack(0, len(data)), data]
    views = [b.raw() for b in buffers]
    index = struct.pack(f"<H{len(views) + 1}Q", len(views), len(data), *[v.nbytes for v in views])
    return [index, data, *views]


def packed_size(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def unpack(buf: bytes | bytearray | memoryview, offset: int = 0) -> Any:
    mv = memoryview(buf)
    size = mv.nbytes
    if offset + _PLAIN.size > size:  # every bundle has at least a count and the pickle's length
        raise ValueError("truncated bundle")
    n, ln = _PLAIN.unpack_from(mv, offset)
    if n == 0:  # no out-of-band buffers: the pickle follows the index
        pos = offset + _PLAIN.size
        if pos + ln > size:
            raise ValueError("truncated bundle")
        return pickle.loads(mv[pos : pos + ln])
    pos = offset + 2
    if pos + 8 * (n + 1) > len(mv):
        raise ValueError("truncated bundle")
    lengths = struct.unpack_from(f"<{n + 1}Q", mv, pos)
    pos += 8 * (n + 1)
    if pos + sum(lengths) > len(mv):
        raise ValueError("truncated bundle")
    data = mv[pos : pos + lengths[0]]
    pos += lengths[0]
    oob = []
    for ln in lengths[1:]:
        oob.append(mv[pos : pos + ln])
        pos += ln
    return pickle.loads(data, buffers=oob)
