"""Bundles: pickle protocol 5 with out-of-band buffers, laid out for one sendmsg.

``pack`` returns a list of buffers (a small index, the pickle stream, then each
out-of-band buffer as a zero-copy view) that the caller appends to a frame
header and writes with a single ``sendmsg``. ``unpack`` reads a bundle out of a
received frame without copying the buffers: numpy arrays in the result point
into the frame's memory.

With a call's shared file (pool/sharedfile.py), buffers of ``SHARE_MIN``
bytes or more go into that file instead of the frame: the index flags their
lengths with ``IN_FILE``, and ``unpack`` copies them out of the file.

Objects plain pickle refuses (lambdas, closures, classes defined in
``__main__``) fall back to dill, whose output loads with plain ``pickle`` as
long as dill is importable on the loading side.
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from . import sharedfile

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


def shareable(parts: list[bytes | memoryview]) -> bool:
    """True if a packed bundle has buffers large enough for a shared file."""
    return len(parts) > 2 and any(isinstance(p, memoryview) and p.nbytes >= sharedfile.SHARE_MIN for p in parts[2:])


def share(parts: list[bytes | memoryview], shared: sharedfile.Mapped, limit: int = 1 << 62, grow: int = 1) -> list[bytes | memoryview]:
    """The bundle with its buffers of ``SHARE_MIN`` bytes or more copied into the shared file
    (back to back from offset 0, lengths flagged ``IN_FILE``), the rest still inline. The file
    grows in steps of ``grow`` if it is too small. Unchanged if they would exceed ``limit``
    bytes or the file cannot take them (a read-only descriptor, a full tmpfs): the socket path
    always works."""
    views = parts[2:]
    lengths = [len(v) if isinstance(v, bytes) else v.nbytes for v in views]
    total = sum(n for n in lengths if n >= sharedfile.SHARE_MIN)
    if not total or total > limit:
        return parts
    try:
        shared.reserve(total, grow)
        offset = 0
        for v, n in zip(views, lengths):
            if n >= sharedfile.SHARE_MIN:
                shared.write(offset, memoryview(v))
                offset += n
    except (OSError, ValueError):  # ValueError: SharedFileError, or mmap refusing the file
        return parts
    flagged = [n | sharedfile.IN_FILE if n >= sharedfile.SHARE_MIN else n for n in lengths]
    index = struct.pack(f"<H{len(views) + 1}Q", len(views), len(parts[1]), *flagged)
    return [index, parts[1], *(v for v, n in zip(views, lengths) if n < sharedfile.SHARE_MIN)]


def packed_size(parts: list[bytes | memoryview]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)


def unpack(buf: bytes | bytearray | memoryview, offset: int = 0, shared: sharedfile.Mapped | None = None) -> Any:
    """The object in a bundle; buffers flagged as in the shared file are copied out of ``shared``."""
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
    if pos + sum(ln for ln in lengths if not ln & sharedfile.IN_FILE) > len(mv):
        raise ValueError("truncated bundle")
    data = mv[pos : pos + lengths[0]]
    pos += lengths[0]
    oob: list[memoryview | bytearray] = []
    file_pos = 0
    for ln in lengths[1:]:
        if ln & sharedfile.IN_FILE:
            if shared is None:
                raise ValueError("the bundle has buffers in a shared file, but none came with it")
            ln &= ~sharedfile.IN_FILE
            oob.append(shared.read(file_pos, ln))
            file_pos += ln
            continue
        oob.append(mv[pos : pos + ln])
        pos += ln
    return pickle.loads(data, buffers=oob)
