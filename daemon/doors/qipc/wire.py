"""kdb+ IPC framing for the q door: the handshake, the 8-byte header, a peek at a message's head.

The door routes a message without decoding its data (argument bytes go to
a worker untouched; pool/qcall.py deserializes them with pykx). Routing
needs only the message's shape: is it a string (a q expression, or one of
pykx.remote's probes) or a general list, how many items it has, and its
first items when they are a symbol or a string (the endpoint's name, a
pykx.remote lambda and its source). ``Peek`` reads exactly that, and the
offset where the arguments start, so the frame for the worker can be cut
from the received buffer without a copy. Nothing else of q's type system
is read here; every read is bounds-checked and a malformed message raises
``WireError``, which fails that message only.

Message layout (code.kx.com/q/basics/ipc)::

    header  [0] 1 little-endian / 0 big   [1] 0 async, 1 sync, 2 response
            [2] 1 = compressed            [3] high byte of the length (capability 6)
            [4:8] u32 total length, header included
    body    one q object: type byte (signed), then for vectors an attribute
            byte and an i32 count; a symbol atom is its NUL-terminated text
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER_SIZE = 8
#: credentials + capability + NUL; q itself allows far less
HANDSHAKE_MAX = 1024
MSG_ASYNC, MSG_SYNC, MSG_RESPONSE = 0, 1, 2
#: the highest capability this door speaks: 6 = kdb+ 3.4+, messages above 2 GB
CAPABILITY = 6

T_LIST = 0
T_CHAR_VECTOR = 10
T_CHAR_ATOM = -10
T_SYMBOL_ATOM = -11
T_LONG_ATOM = -7
LONG_ATOM_SIZE = 9  # type byte + i64


class WireError(ValueError):
    """A message whose contents cannot be routed (its framing was fine)."""


@dataclass(frozen=True)
class Handshake:
    user: str
    password: str
    capability: int | None  # None: a pre-2.6 client that sent no capability byte

    @property
    def agreed(self) -> int:
        """The one byte answered: the client's capability, up to ours (0 for none)."""
        return 0 if self.capability is None else min(self.capability, CAPABILITY)


def parse_handshake(raw: bytes) -> Handshake:
    """``raw`` = the bytes before the NUL: ``user[:password]`` and an optional capability byte."""
    cred, cap = raw, None
    if cred and cred[-1] < 32:  # credentials are printable; a control byte is the capability
        cred, cap = cred[:-1], cred[-1]
    user, _, password = cred.decode("utf-8", "replace").partition(":")
    return Handshake(user, password, cap)


@dataclass(frozen=True)
class Header:
    little: bool
    msgtype: int
    compressed: bool
    total: int


def parse_header(b: bytes | bytearray | memoryview) -> Header:
    """The 8-byte header; WireError if the stream cannot be trusted past it."""
    endian, msgtype, compressed, high = b[0], b[1], b[2], b[3]
    if endian > 1:
        raise WireError(f"bad endianness byte {endian}")
    if msgtype > MSG_RESPONSE:
        raise WireError(f"bad message type {msgtype}")
    if compressed > 1:
        raise WireError(f"bad compression flag {compressed}")
    total = int.from_bytes(bytes(b[4:8]), "little" if endian else "big") | (high << 32)
    if total < HEADER_SIZE + 1:
        raise WireError(f"message length {total} is shorter than a header and a type byte")
    return Header(bool(endian), msgtype, bool(compressed), total)


def ipc_header(little: bool, msgtype: int, total: int) -> bytes:
    return bytes([1 if little else 0, msgtype, 0, (total >> 32) & 0xFF]) + (total & 0xFFFFFFFF).to_bytes(4, "little" if little else "big")


def uncompressed_size(msg: bytes | bytearray | memoryview, little: bool) -> int:
    """The total length a compressed message declares for itself once decompressed."""
    if len(msg) < HEADER_SIZE + 4:
        raise WireError("compressed message too short")
    return int.from_bytes(bytes(msg[8:12]), "little" if little else "big")


def decompress(msg: bytes | bytearray | memoryview, little: bool) -> bytearray:
    """The plain message of a compressed one (kdb+'s IPC compression): header included, its
    compressed flag cleared and its length the plain length.

    In Python and without deserializing anything: pykx decompresses only by deserializing,
    which recurses once per nesting level in C, so a small compressed message holding a list
    nested 10^5 deep would overflow the supervisor's stack before its depth could be checked.
    Here the depth is checked afterwards on plain bytes (``nesting``), as for any message.
    The cost is about a microsecond per byte; q compresses only what it sends to another
    host, and only messages above 2000 bytes that shrink to under half.

    The stream: after the 8-byte header, the plain length (u32), then groups of one flag
    byte and eight items; a set bit is a back-reference (a byte indexing a table of earlier
    positions by the XOR of two bytes, and a run length), a clear bit a literal byte. A
    stream that reads or writes out of bounds is a WireError, never an IndexError.
    """
    size = uncompressed_size(msg, little)
    if size <= HEADER_SIZE:
        raise WireError(f"declared size {size} is too small")
    src = bytes(msg)
    dst = bytearray(size)
    dst[0:4] = src[0:4]
    dst[2] = 0  # not compressed any more
    dst[4:8] = size.to_bytes(4, "little" if little else "big")
    table = [0] * 256  # XOR of two bytes -> the last position they were seen at
    s = p = HEADER_SIZE
    d = HEADER_SIZE + 4
    bit = flags = run = 0
    try:
        while s < size:
            if bit == 0:
                flags, bit = src[d], 1
                d += 1
            ref = flags & bit
            if ref:
                r, run = table[src[d]], src[d + 1]
                d += 2
                n = 2 + run
                if r < HEADER_SIZE or s + n > size:
                    raise WireError(f"a back-reference at byte {d - 2} points outside the message")
                if r + n <= s:
                    dst[s : s + n] = dst[r : r + n]
                else:  # overlapping: byte by byte, each copy may repeat the one before
                    for m in range(n):
                        dst[s + m] = dst[r + m]
                s += 2
            else:
                dst[s] = src[d]
                d += 1
                s += 1
            while p < s - 1:
                table[dst[p] ^ dst[p + 1]] = p
                p += 1
            if ref:
                s += run
                p = s
            bit = (bit << 1) & 0xFF
    except IndexError:
        raise WireError("compressed message ends early") from None
    return dst


class Reader:
    """Bounds-checked reads of the few q shapes routing needs."""

    def __init__(self, msg: bytes | bytearray | memoryview, little: bool, start: int = HEADER_SIZE) -> None:
        self.msg = memoryview(msg)
        self.i32 = struct.Struct("<i" if little else ">i")
        self.i64 = struct.Struct("<q" if little else ">q")
        self.pos = start

    def need(self, n: int) -> None:
        if self.pos + n > len(self.msg):
            raise WireError("message ends early")

    def type(self) -> int:
        """The next object's type byte (signed), without consuming it."""
        self.need(1)
        t = self.msg[self.pos]
        return t - 256 if t > 127 else t

    def list_count(self) -> int:
        """Consume a general list's header; its item count."""
        self.need(6)
        n: int = self.i32.unpack_from(self.msg, self.pos + 2)[0]
        if n < 0:
            raise WireError(f"negative list count {n}")
        self.pos += 6
        return n

    def text(self) -> str | None:
        """Consume a symbol atom, char vector or char atom and return its text; None for anything else."""
        t = self.type()
        if t == T_SYMBOL_ATOM:
            end = bytes(self.msg[self.pos + 1 : self.pos + 1 + 4096]).find(b"\0")
            if end < 0:
                raise WireError("unterminated symbol")
            raw = bytes(self.msg[self.pos + 1 : self.pos + 1 + end])
            self.pos += end + 2
            return raw.decode("utf-8", "replace")
        if t == T_CHAR_VECTOR:
            return self.char_vector_bytes().decode("utf-8", "replace")
        if t == T_CHAR_ATOM:
            self.need(2)
            raw = bytes(self.msg[self.pos + 1 : self.pos + 2])
            self.pos += 2
            return raw.decode("utf-8", "replace")
        return None

    def char_vector_bytes(self) -> bytes:
        """Consume a char vector; its bytes (pykx.remote sends function source this way)."""
        if self.type() != T_CHAR_VECTOR:
            raise WireError("expected a string")
        self.need(6)
        (n,) = self.i32.unpack_from(self.msg, self.pos + 2)
        if n < 0:
            raise WireError(f"negative string length {n}")
        self.pos += 6
        self.need(n)
        raw = bytes(self.msg[self.pos : self.pos + n])
        self.pos += n
        return raw

    def symbol(self) -> str:
        if self.type() != T_SYMBOL_ATOM:
            raise WireError("expected a symbol")
        text = self.text()
        assert text is not None
        return text

    def long_atom_at_end(self) -> int:
        """The i64 of a long atom that ends the message (pykx.remote's argument count)."""
        at = len(self.msg) - LONG_ATOM_SIZE
        if at < self.pos or self.msg[at] != T_LONG_ATOM & 0xFF:
            raise WireError("expected a long atom at the end of the message")
        (value,) = self.i64.unpack_from(self.msg, at + 1)
        return int(value)


@dataclass(frozen=True)
class Peek:
    """The routing view of one message.

    ``text`` is set for a message that is one string (``h"expr"``); ``head``
    for a general list whose first item is a symbol or string, with
    ``nargs`` the items after it and ``args_at`` the offset of the first of
    them. ``head_type`` is the first item's q type (for the error message
    when it is neither).
    """

    text: str | None = None
    head: str | None = None
    head_type: int | None = None
    nargs: int = 0
    args_at: int = 0


def peek(msg: bytes | bytearray | memoryview, little: bool) -> Peek:
    r = Reader(msg, little)
    t = r.type()
    if t in (T_CHAR_VECTOR, T_CHAR_ATOM, T_SYMBOL_ATOM):
        return Peek(text=r.text(), head_type=t)
    if t != T_LIST:
        return Peek(head_type=t)
    n = r.list_count()
    if n == 0:
        return Peek(head_type=None)
    head_type = r.type()
    head = r.text()
    if head is None:
        return Peek(head_type=head_type, nargs=n - 1)
    return Peek(head=head, head_type=head_type, nargs=n - 1, args_at=r.pos)
