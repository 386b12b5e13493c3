"""The receive side of the frame protocol: bytes in, whole frames out, one implementation.

The client (``cruised.client.session``), the supervisor's channels
(``cruised.core.channel``) and a worker (``cruised.pool.worker``) each read
frames off a stream socket. They differ in how they read (blocking or not,
``recv_into`` or ``recvmsg_into``, one frame at a time or every whole frame
a read brought) and in what they do with a frame; what they share is here,
and only that: this module does no I/O. A reader asks where the next bytes
go (``space``), receives into that view with its own call, and hands the
count to ``next``, which returns the frames they complete, one per call::

    fb = FrameBuffer(256 << 10, limit)
    n = 0
    while True:
        frame = fb.next(n)                # counts the n bytes just received, cuts the next frame
        if frame is None:
            n = sock.recv_into(fb.space())  # or recvmsg_into, non-blocking, ...
            if not n: ...                 # EOF (space() is never an empty view)
            continue
        n = 0
        handle(frame, fb.header)          # (size, version, kind, status, reqid)

Layout and invariants
    ``buf[start:end]`` holds received bytes that are not yet cut into frames,
    ``buf[end:]`` is free, and whenever nothing is held ``start == end == 0``
    (the whole buffer is free for the next read).

    A frame that fits behind ``start`` is completed in the buffer and copied
    out once whole: each frame is a ``bytearray`` of its own, since what a
    frame carries may keep views into it (numpy arrays unpickled out of band)
    while the buffer is reused. A frame that does not fit behind ``start``
    gets a buffer of its own as soon as its header is in, which takes the
    bytes held so far; ``space`` then offers exactly the rest of it, so the
    kernel fills it directly (a 64 MB argument is copied once, by the kernel)
    and no byte of the frames after it lands there. That buffer comes from
    ``rawbuf`` (not zeroed): it is returned only once every byte is written.
    Whether a frame gets its own buffer depends on where it starts, not only
    on its size: a few hundred bytes that begin near the end of the buffer
    get one too (cheaper than moving them, and they are rare: one per
    buffer's worth of stream).

    So once ``next`` has returned None the buffer is full only while it holds
    less than a header (every frame whose header is in is either whole and cut
    out, or moved to its own buffer): making room moves those few bytes to the
    front, not a frame.

    Every header is checked (version, length, the reader's limit) as soon as
    it is in, before any buffer is made for its frame; a bad one raises
    ``frames.FrameError`` with the frame's request id, and the stream cannot
    be read further (there is no resynchronising a length-prefixed stream).

Standard library only: a worker runs under a code env's interpreter.
"""

from __future__ import annotations

from typing import Final

from . import frames, rawbuf

_unpack_header = frames.HEADER.unpack_from
_HEADER_SIZE: Final = frames.HEADER_SIZE
_SIZE_FIELD: Final = frames.SIZE_FIELD
_VERSION: Final = frames.VERSION


class FrameBuffer:
    """Cuts a byte stream into frames; see the module docstring for the protocol of use."""

    __slots__ = ("big", "big_got", "buf", "end", "header", "limit", "start", "view")

    def __init__(self, size: int, limit: int) -> None:
        if size < _HEADER_SIZE:
            raise ValueError(f"a frame buffer holds at least a header ({_HEADER_SIZE} bytes), not {size}")
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        #: frames longer than this (bytes, header included) are refused with a FrameError
        self.limit = limit
        self.start = 0
        self.end = 0
        #: the frame being read into a buffer of its own, and how many of its bytes are in
        self.big: bytearray | None = None
        self.big_got = 0
        #: the header of the frame ``next`` returned last, as ``frames.HEADER`` unpacks it:
        #: (size, version, kind, status, reqid). One tuple, the one the unpacking made, rather
        #: than an attribute per field: the supervisor reads it for every frame.
        self.header: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    def space(self) -> memoryview:
        """Where the next received bytes go: the missing part of a big frame, else the free end of
        the buffer, made room for if it is full. Never empty.

        Called after ``next`` returned None, the room is made by moving less than a header. A
        reader re-entered from a frame's handler (the supervisor drains a worker's channel when
        it kills it, and may do so while handling that channel's frame) can call it with whole
        frames still held: they move too, and its ``next`` calls cut them, in order.
        """
        big = self.big
        if big is not None:
            return memoryview(big)[self.big_got :]
        end = self.end
        if end == len(self.buf):
            start = self.start
            if start == 0:  # the buffer is full of frames nobody took: an empty view would read as EOF
                raise RuntimeError("FrameBuffer.space() called while the buffer is full of frames next() was not asked to cut")
            self.buf[: end - start] = self.view[start:end]
            self.start, self.end = 0, end - start
            end = self.end
        return self.view[end:]

    def next(self, received: int = 0) -> bytearray | None:
        """The next whole frame, its header in ``header``; None when more bytes are needed first.

        ``received``: how many bytes the reader just wrote at the start of ``space()``; it passes
        its recv's count to the first call after the recv, and nothing to the calls after that
        (one call, not a separate ``received()`` and ``next()``: this runs for every read in
        three processes). Raises ``frames.FrameError`` for a header that cannot be accepted.
        """
        big = self.big
        if big is not None:
            self.big_got += received
            if self.big_got < len(big):
                return None
            self.big = None  # its header was kept when it began
            return big
        start = self.start
        self.end = end = self.end + received
        if end - start < _HEADER_SIZE:
            return None
        view = self.view
        header = _unpack_header(view, start)
        # frames.parse_header, inline (it runs for every frame in three processes); it still words the errors
        total = header[0] + _SIZE_FIELD
        if header[1] != _VERSION or not _HEADER_SIZE <= total <= self.limit:
            frames.parse_header(view[start : start + _HEADER_SIZE], self.limit)
        if end - start >= total:
            self.header = header
            frame = bytearray(view[start : start + total])
            start += total
            if start == end:
                self.start = self.end = 0
            else:
                self.start = start
            return frame
        if total <= len(self.buf) - start:
            return None  # it fits: it is completed here (its header is read again then)
        # It does not fit behind what is held: a buffer of its own, which the kernel fills.
        self.header = header
        have = end - start
        big = rawbuf.uninitialized(total)  # returned only once next() counted every byte received into it
        big[:have] = view[start:end]
        self.big, self.big_got = big, have
        self.start = self.end = 0
        return None

    def held(self) -> int:
        """Bytes received and not yet returned in a frame (a big frame's included)."""
        if self.big is not None:
            return self.big_got
        return self.end - self.start

    def release(self) -> None:
        """Drop the buffer and anything held (the reader is closed; a closed supervisor channel may
        live on until a full gc collection, its 256 KiB should not)."""
        self.buf = bytearray(_HEADER_SIZE)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.big = None
        self.big_got = 0
