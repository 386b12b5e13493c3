"""How deeply a request nests, measured before anything parses it: one request must not kill its worker.

A JSON body ``{"a": [[[[...]]]]}`` 100,000 levels deep, or a q general list
nested as deep, costs its sender a few hundred kilobytes. Parsed as it is, it
takes the worker down: json's decoder raises ``RecursionError`` (which used to
escape the worker's loop), pykx's deserializer (q's ``d9``, in C) overflows the
C stack and the process dies of SIGSEGV, and pykx's ``.np()`` of a general list
does the same already at a few hundred levels. So the worker measures the
nesting of the raw text or message first, without recursing, and refuses one
deeper than ``MAX_DEPTH`` as the caller's mistake: HTTP 400 ``BadRequest``, or
q's ``'cruised: arguments nested deeper than 256 levels``.

Why 256
    Everything that handles the value after parsing recurses once or more per
    level, within Python's recursion limit (1000 frames by default): json's C
    decoder counts against it on Python 3.10 and 3.11 (so it fails near 1000
    levels less the worker's own ~25 frames), the q conversions of
    pool/qcall.py take two to three frames a level, the result walk of
    pool/jsonify.py one, and the endpoint's own code, walking what it was
    given, needs room too. 256 keeps each of those inside the limit with a
    wide margin, on every Python a pool may run. It is also far beyond what
    real requests nest (a handful of levels; a q table is three) and in the
    range other servers choose: Rust's serde_json stops at 128, .NET's
    System.Text.Json at 64, Jackson at 1000.

Costs
    A body with at most ``MAX_DEPTH`` opening brackets cannot nest deeper, so
    the usual request is settled by two ``str.count`` calls; a q message of at
    most ``MAX_DEPTH`` bytes by its length. Others are measured in linear time:
    JSON with C-level string operations, no Python loop per character (100,000
    records: under half of what ``json.loads`` of them takes); a q message
    object by object, vectors skipped whole (symbol vectors by counting NULs a
    block at a time: a 100,000-row table takes a third of a millisecond), so
    only a general list of many items costs a Python step each, a few percent
    of converting those items to Python.

Standard library only: this runs under each pool's own interpreter.
"""

from __future__ import annotations

import itertools
import struct
from array import array

#: the deepest nesting accepted in a request: JSON arrays and objects, or q lists,
#: dictionaries, tables and function objects (see "Why 256" above)
MAX_DEPTH = 256
#: the deepest q message deserialized whole with pykx merely to look at it (the q door's check
#: for a deferred-sync callback, in the supervisor): q's deserializer takes 80-160 bytes of C
#: stack a level (it overflowed an 8 MiB stack between 50,000 and 100,000 levels), so 4096
#: levels stay under 1 MiB; far above MAX_DEPTH, so a refused call still hears why through
#: its callback
PEEK_MAX_DEPTH = 4096


# -- JSON --------------------------------------------------------------------------------

#: outside strings, valid JSON is ASCII: keep its brackets (as [ and ]), drop everything else
_BRACKETS_ONLY = {c: None for c in range(128)} | {ord("["): "[", ord("{"): "[", ord("]"): "]", ord("}"): "]"}
#: "[" -> +1, "]" -> -1, as signed bytes
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")
#: innermost pairs removed pass by pass before counting: enough for the usual wide, shallow body
_PASSES = 8


def json_depth_exceeds(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether JSON ``text`` nests arrays and objects more than ``limit`` deep.

    Exact for valid JSON; for invalid JSON the answer does not matter (the
    decoder refuses it). Brackets inside strings do not count: string contents
    are dropped first. Escapes are pairs read left to right, so removing every
    ``\\\\`` and then every ``\\"`` leaves exactly the quotes that open and
    close strings, and splitting on them puts the strings at the odd indices.
    Each pass that removes every innermost ``[]`` pair lowers the depth by
    exactly one; whatever is left after a few passes is counted bracket by
    bracket (in C: ``accumulate`` over signed bytes).
    """
    if text.count("[") + text.count("{") <= limit:
        return False  # fewer openers than the limit: the usual request stops here
    outside = "".join(text.replace("\\\\", "").replace('\\"', "").split('"')[::2])
    brackets = outside.translate(_BRACKETS_ONLY)
    for passes in range(_PASSES):
        if not brackets:
            return passes > limit
        shorter = brackets.replace("[]", "")
        if len(shorter) == len(brackets):
            return False  # unbalanced (or not ASCII): not JSON, the decoder says so
        brackets = shorter
    steps = brackets.encode("ascii", "ignore").translate(_STEPS)
    return _PASSES + max(itertools.accumulate(array("b", steps)), default=0) > limit


# -- kdb+ IPC ----------------------------------------------------------------------------

#: bytes per item of the atom (-t) and vector (t) types q's IPC carries
_ITEM_SIZE = {1: 1, 2: 16, 4: 1, 5: 2, 6: 4, 7: 8, 8: 4, 9: 8, 10: 1, 12: 8, 13: 4, 14: 4, 15: 8, 16: 8, 17: 4, 18: 4, 19: 4}
_SYMBOL = 11
_ERROR = -128
_LIST = 0
_TABLE, _DICT, _SORTED_DICT = 98, 99, 127
_LAMBDA = 100
_PRIMITIVES = (101, 102, 103)  # unary, binary, ternary primitive: one byte follows
_PROJECTION, _COMPOSITION = 104, 105
_ITERATORS = range(106, 112)  # each, over, scan, each-prior, each-right, each-left: one object follows
_I32 = {True: struct.Struct("<i"), False: struct.Struct(">i")}
_SYMBOL_ATOM_BYTE = 256 - _SYMBOL
#: by type byte: the bytes after it of a fixed-size atom, else 0 (the walk's fast path)
_ATOM = [0] * 256
for _t, _size in _ITEM_SIZE.items():
    _ATOM[256 - _t] = _size


def q_depth_exceeds(buf: bytes | bytearray, start: int = 0, limit: int = MAX_DEPTH) -> bool:
    """Whether the kdb+ IPC message at ``buf[start:]`` (header included) nests more than ``limit`` deep.

    General lists, dictionaries, tables, lambdas, projections, compositions
    and iterators each open a level.
    """
    if len(buf) - start - 8 <= limit:
        return False  # every level takes at least a type byte: the usual small call stops here
    return _walk(buf, start, limit, None)


def q_item_offsets(buf: bytes | bytearray, start: int = 0) -> list[int] | None:
    """Where each item of the general list that the IPC message at ``buf[start:]`` holds
    starts, then where that list ends; None if the message holds something else or cannot
    be read. However deep the items nest: the walk keeps its own stack, so a caller can
    take the last items of a message it must not deserialize whole."""
    if len(buf) - start < 14 or buf[start + 8] != _LIST:
        return None
    starts: list[int] = []
    ends: list[int] = []
    _walk(buf, start, 1 << 62, ends, starts)
    return [*starts, ends[0]] if ends else None


def _walk(buf: bytes | bytearray, start: int, limit: int, end_at: list[int] | None, starts: list[int] | None = None) -> bool:
    """Read the objects of the IPC message at ``buf[start:]`` in the order q's deserializer
    reads them, with an explicit stack (never recursing); True as soon as more than
    ``limit`` levels are open at once. ``end_at`` receives where the message's object
    ends, ``starts`` where each item of a top-level general list starts.

    A message this walk cannot follow (a type q's IPC does not carry, a truncated
    item) is not measured further: the deserializer, reading in the same order,
    refuses it at the same place before it goes any deeper.
    """
    end = len(buf)
    if end - start < 9:
        return False
    i32 = _I32[buf[start] == 1]
    pos = start + 8
    left = [1]  # objects still to read at each open level; the message holds one object
    atom = _ATOM
    while left:
        n = left[-1]
        if starts is not None and len(left) == 2:
            if n:
                starts.append(pos)  # an item of the top-level list
        else:
            # a run of atoms and simple vectors (a mixed list's usual items), skipped in this
            # tight loop; anything else goes through the dispatch below
            while n and pos < end:
                b = buf[pos]
                if atom[b]:
                    pos += atom[b] + 1
                elif b == _SYMBOL_ATOM_BYTE:
                    pos = buf.find(b"\0", pos + 1, end) + 1
                    if not pos:
                        return False
                elif b in _ITEM_SIZE and pos + 6 <= end:
                    count = i32.unpack_from(buf, pos + 2)[0]
                    if count < 0:
                        return False
                    pos += 6 + count * _ITEM_SIZE[b]
                else:
                    break
                n -= 1
        if not n:
            left.pop()
            continue
        left[-1] = n - 1
        if pos >= end:
            return False
        t = buf[pos]
        t = t - 256 if t > 127 else t
        pos += 1
        opens = -1  # objects the new level holds; -1: no new level
        if t < 0:
            if t == -_SYMBOL or t == _ERROR:
                pos = buf.find(b"\0", pos, end) + 1
                if not pos:
                    return False
            elif -t in _ITEM_SIZE:
                pos += _ITEM_SIZE[-t]
            else:
                return False
        elif t == _LIST or t == _PROJECTION or t == _COMPOSITION:
            pos += t == _LIST  # a general list has an attribute byte
            if pos + 4 > end:
                return False
            opens = i32.unpack_from(buf, pos)[0]
            pos += 4
            if opens < 0:
                return False
        elif t in _ITEM_SIZE or t == _SYMBOL:
            if pos + 5 > end:
                return False
            n = i32.unpack_from(buf, pos + 1)[0]
            pos += 5
            if n < 0:
                return False
            if t == _SYMBOL:
                pos = _after_strings(buf, pos, n, end)
                if pos < 0:
                    return False
            else:
                pos += n * _ITEM_SIZE[t]
        elif t == _TABLE:
            pos += 1  # its attribute byte, then a dictionary
            opens = 1
        elif t == _DICT or t == _SORTED_DICT:
            opens = 2  # keys, then values
        elif t == _LAMBDA:
            pos = buf.find(b"\0", pos, end) + 1  # its context's name, then its text
            if not pos:
                return False
            opens = 1
        elif t in _PRIMITIVES:
            pos += 1
        elif t in _ITERATORS:
            opens = 1
        else:
            return False
        if opens >= 0:
            left.append(opens)
            if len(left) - 1 > limit:  # len(left) - 1: the levels open now
                return True
    if pos > end:
        return False
    if end_at is not None:
        end_at.append(pos)
    return False


def _after_strings(buf: bytes | bytearray, pos: int, n: int, end: int) -> int:
    """The offset just past the ``n``-th NUL at or after ``pos``; -1 if the message ends first.

    Whole blocks are counted in C and skipped while the count falls short;
    the block halves when the count would overshoot, so the Python loop runs
    a few dozen times however many strings there are.
    """
    step = 1 << 16
    while n > 16 and step >= 64:
        stop = min(pos + step, end)
        c = buf.count(b"\0", pos, stop)
        if c < n:
            if stop == end:
                return -1
            n -= c
            pos = stop
        else:
            step >>= 1
    for _ in range(n):
        pos = buf.find(b"\0", pos, end) + 1
        if not pos:
            return -1
    return pos
