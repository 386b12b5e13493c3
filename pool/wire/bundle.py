"""Bundles: pickle protocol 5 with out-of-band buffers, laid out for one sendmsg.

``pack`` returns a list of buffers (a small index, the pickle stream, then each
out-of-band buffer as a zero-copy view) that the caller appends to a frame
header and writes with a single ``sendmsg``. ``unpack`` reads a bundle out of a
received frame without copying the buffers: numpy arrays in the result point
into the frame's memory.

With a call's shared file (pool/wire/sharedfile.py), buffers of ``SHARE_MIN``
bytes or more go into that file instead of the frame: the index flags their
lengths with ``IN_FILE``, and ``unpack`` copies them out of the file. So may
the pickle stream itself (``with_pickle``) when it is that large: ``bytes``,
``str``, lists and object columns pickle in-band, not as buffers. It is then
the first thing in the file.

What plain pickle refuses (lambdas, closures, local classes), and what it would
pickle as a reference to ``__main__`` (a class a script or notebook defined: the
process that loads it has another ``__main__``) or to a module registered by
value, is pickled by value instead (``byvalue``: cloudpickle). Its output loads
with plain ``pickle.loads`` where cloudpickle is importable. The test for a
reference is a search of the pickle stream for the module's name as pickle
writes it (``_marks``): ~150 ns for a call's few arguments, ~0.3 ms per MB of
stream beyond the large strings of ``_big_inband``; a false positive (a
string that is exactly ``__main__``) only takes the by-value way. A worker skips
the search (``check_refs``).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from cruised.pool.wire import sharedfile

_COUNT = struct.Struct("<H")
_LEN = struct.Struct("<Q")
#: the index of a bundle without out-of-band buffers (the common case: no arrays)
_PLAIN = struct.Struct("<HQ")
PROTOCOL = 5


def _mark(module: str) -> bytes:
    """How a pickle stream of protocol 4 or 5 first names ``module`` (SHORT_BINUNICODE): a global
    from it is written as its module's name, then its own, then STACK_GLOBAL."""
    raw = module.encode()
    return b"\x8c" + bytes([len(raw)]) + raw if len(raw) < 256 else b"\x8d" + struct.pack("<Q", len(raw)) + raw


_MAIN = _mark("__main__")
#: marks of the modules registered by value in this process besides ``__main__`` (``by_value``)
_marks: tuple[bytes, ...] = ()


def by_value(module: str) -> None:
    """Pickle everything module ``module`` defines by value from now on, in this process: it is
    importable here but not where the stream goes (the client's project files)."""
    global _marks
    from cruised.pool.wire import byvalue

    byvalue.register_module(module)
    if _mark(module) not in _marks:
        _marks = (*_marks, _mark(module))


#: the pickler's frame size (pickle._Framer._FRAME_SIZE_TARGET; FRAME_SIZE_TARGET in the C pickler)
_FRAME = 64 << 10


def _refers_by_value(data: bytes) -> bool:
    """True if a pickle stream refers to ``__main__`` or to a module registered by value."""
    # find(), not `in`: twice as fast on a short stream (CPython 3.11). A loop, not any() over a
    # generator: the generator cost 2.3k instructions per call's arguments (callgrind)
    if data.find(_MAIN) >= 0:
        return True
    for mark in _marks:
        if data.find(mark) >= 0:
            return True
    return False


def dumps(obj: Any) -> bytes:
    """One pickle stream of ``obj``, all in band, by value where ``pack`` would be (an exception)."""
    try:
        data = pickle.dumps(obj, protocol=PROTOCOL)
        if not _refers_by_value(data):
            return data
    except (pickle.PicklingError, TypeError, AttributeError):
        pass
    from cruised.pool.wire import byvalue

    return byvalue.dumps(obj, PROTOCOL)


class _Chunks(list[bytes | memoryview]):
    """A pickler's output, as the pieces it wrote: a large ``bytes`` comes by reference, uncopied."""

    write = list.append


_INBAND = frozenset({bytes, bytearray, str})
_SCANNED = _INBAND | {tuple, list, dict}
#: containers longer than this are not scanned (their items pickle right, through pickle.dumps)
_SCAN_ITEMS = 16


def _big_inband(obj: Any) -> bool:
    """True if ``obj`` is, or holds near its top, a ``bytes``, ``bytearray`` or ``str`` of ``SHARE_MIN`` or more.

    Those pickle in-band, and ``pickle.dumps`` grows its output by reallocating: 460 µs
    for 1 MB of ``bytes`` on the reference VM, against 45 µs through a ``Pickler`` that
    writes pieces (``_Chunks``) and one join. The pieces cost 3 µs more for a small
    object, so only values found here, two levels down (an argument, or an item of a
    returned tuple), take that way; a deeper one still pickles right, just slower.
    """
    # One call and two loops, not recursion: this runs for every call's (args, kwargs) and every
    # result that is a container (~0.9 µs for a few scalar arguments).
    t = type(obj)
    if t in _INBAND:
        return len(obj) >= sharedfile.SHARE_MIN
    if t not in _SCANNED:
        return False
    items = obj.values() if t is dict else obj
    if len(items) > _SCAN_ITEMS:
        return False
    for x in items:
        tx = type(x)
        if tx in _INBAND:
            if len(x) >= sharedfile.SHARE_MIN:
                return True
        elif tx in _SCANNED and x and len(x) <= _SCAN_ITEMS:
            for y in x.values() if tx is dict else x:
                if type(y) in _INBAND and len(y) >= sharedfile.SHARE_MIN:
                    return True
    return False


def pack(obj: Any, check_refs: bool = True) -> list[bytes | memoryview]:
    """``obj`` as a bundle's parts. ``check_refs=False`` where a plain pickle cannot refer to
    ``__main__`` by mistake: in a worker, a class shipped from the client is not an attribute
    of the worker's ``__main__``, so plain pickle raises for it and the by-value way is taken
    anyway; the search of the stream is saved (~150 ns a call)."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        if type(obj) in _SCANNED and _big_inband(obj):  # the type test first: most results are scalars
            chunks = _Chunks()
            pickle.Pickler(chunks, PROTOCOL, buffer_callback=buffers.append).dump(obj)
            # A payload of _FRAME or more (the large string this path is for) is a chunk of its
            # own, and every other chunk is a frame of under 2 * _FRAME: a module's name is in a
            # frame, so the payloads, most of the bytes, need no search.
            by_value = check_refs and any(type(c) is bytes and len(c) < 2 * _FRAME and _refers_by_value(c) for c in chunks)
            data = b"".join(chunks)
        else:
            data = pickle.dumps(obj, protocol=PROTOCOL, buffer_callback=buffers.append)
            # _refers_by_value, inline: this runs for every call's arguments (a function call, the
            # generator any() took and a second search for __main__ cost 3.4k instructions a call)
            by_value = False
            if check_refs:
                if data.find(_MAIN) >= 0:
                    by_value = True
                else:
                    for mark in _marks:
                        if data.find(mark) >= 0:
                            by_value = True
                            break
    except (pickle.PicklingError, TypeError, AttributeError):
        by_value = True
    if by_value:
        from cruised.pool.wire import byvalue

        buffers = []
        data = byvalue.dumps(obj, PROTOCOL, buffers.append)
    if not buffers:
        return [_PLAIN.pack(0, len(data)), data]
    views = [b.raw() for b in buffers]
    index = struct.pack(f"<H{len(views) + 1}Q", len(views), len(data), *[v.nbytes for v in views])
    return [index, data, *views]


def shareable(parts: list[bytes | memoryview], with_pickle: bool = False) -> bool:
    """True if a packed bundle has buffers (or, ``with_pickle``, a pickle stream) large enough for a
    shared file."""
    if with_pickle and len(parts[1]) >= sharedfile.SHARE_MIN:
        return True
    return len(parts) > 2 and any(isinstance(p, memoryview) and p.nbytes >= sharedfile.SHARE_MIN for p in parts[2:])


def share(
    parts: list[bytes | memoryview], shared: sharedfile.Mapped, limit: int = 1 << 62, grow: int = 1, with_pickle: bool = False
) -> list[bytes | memoryview]:
    """The bundle with its buffers of ``SHARE_MIN`` bytes or more copied into the shared file
    (back to back from offset 0, lengths flagged ``IN_FILE``), the rest still inline; with
    ``with_pickle`` a pickle stream that large goes first. The file grows in steps of ``grow``
    if it is too small. Unchanged if they would exceed ``limit`` bytes or the file cannot take
    them (a read-only descriptor, a full tmpfs): the socket path always works."""
    lengths = [len(v) if isinstance(v, bytes) else v.nbytes for v in parts[1:]]
    moved = [n >= sharedfile.SHARE_MIN and (i or with_pickle) for i, n in enumerate(lengths)]
    # lengths and moved: one entry per part after the index, so every zip here is strict
    total = sum(n for n, m in zip(lengths, moved, strict=True) if m)
    if not total or total > limit:
        return parts
    try:
        shared.reserve(total, grow)
        offset = 0
        for v, n, m in zip(parts[1:], lengths, moved, strict=True):
            if m:
                shared.write(offset, memoryview(v))
                offset += n
    except (OSError, ValueError):  # ValueError: SharedFileError, or mmap refusing the file
        return parts
    flagged = [n | sharedfile.IN_FILE if m else n for n, m in zip(lengths, moved, strict=True)]
    index = struct.pack(f"<H{len(lengths)}Q", len(lengths) - 1, *flagged)
    return [index, *(v for v, m in zip(parts[1:], moved, strict=True) if not m)]


def in_file(buf: bytes | bytearray | memoryview, offset: int = 0) -> bool:
    """True if the bundle at ``offset`` keeps anything in a shared file (False for a truncated one:
    ``unpack`` reports that)."""
    if len(buf) < offset + _COUNT.size:
        return False
    n = _COUNT.unpack_from(buf, offset)[0]
    if len(buf) < offset + 2 + 8 * (n + 1):
        return False
    return any(ln & sharedfile.IN_FILE for ln in struct.unpack_from(f"<{n + 1}Q", buf, offset + 2))


def packed_size(parts: list[bytes | memoryview]) -> int:
    n = 0
    for p in parts:  # a loop, not sum() over a generator: this runs for every frame sent
        n += p.nbytes if type(p) is memoryview else len(p)
    return n


def unpack(buf: bytes | bytearray | memoryview, offset: int = 0, shared: sharedfile.Mapped | None = None) -> Any:
    """The object in a bundle; what is flagged as in the shared file is copied out of ``shared``."""
    mv = memoryview(buf)
    size = mv.nbytes
    if offset + _PLAIN.size > size:  # every bundle has at least a count and the pickle's length
        raise ValueError("truncated bundle")
    n, ln = _PLAIN.unpack_from(mv, offset)
    if n == 0 and not ln & sharedfile.IN_FILE:  # no out-of-band buffers: the pickle follows the index
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
    pieces: list[memoryview | bytearray] = []  # the pickle, then each buffer
    file_pos = 0
    for i, ln in enumerate(lengths):
        if ln & sharedfile.IN_FILE:
            if shared is None:
                raise ValueError("the bundle has buffers in a shared file, but none came with it")
            ln &= ~sharedfile.IN_FILE
            # a buffer becomes an object's memory: a copy. The pickle stream is only read by
            # loads, which copies what it keeps, so it is read in place.
            pieces.append(shared.read(file_pos, ln) if i else shared.view(file_pos, ln))
            file_pos += ln
            continue
        pieces.append(mv[pos : pos + ln])
        pos += ln
    try:
        return pickle.loads(pieces[0], buffers=pieces[1:])
    finally:
        if lengths[0] & sharedfile.IN_FILE:
            pieces[0].release()  # type: ignore[union-attr]  # the mapping may be remapped or closed next
