"""A framed, non-blocking socket on the event loop: the supervisor's only I/O path.

Both the client connections and the private worker channels use it. It is
callback-based (``loop.add_reader``), not coroutine-based, because the hot
path is one readable event -> parse -> hand a buffer to the dispatcher, and a
task per message would cost more than the work.

Reads
    One ``recv`` per readable event into the channel's ``FrameBuffer``
    (pool/wire/framebuf.py, shared with the worker and the client): small
    frames are cut out of its reusable buffer, many per ``recv``; a frame that
    does not fit there gets a buffer of its own that the kernel fills directly,
    so a 64 MB argument is copied once, by the kernel, and never again in this
    process.

Writes
    ``write`` only queues buffers. Queued channels are flushed when the read
    callback that caused the writes returns (or, for writes from timers, on
    the next loop iteration), one ``sendmsg`` per channel: everything a batch
    of pipelined requests produced leaves in one syscall, and a lone request
    costs no extra loop iteration. Whatever the
    kernel does not take waits for writability. A peer that stops reading
    while its replies pile up above ``HIGH_WATER`` is not read from until
    they drain below ``LOW_WATER``: its requests stay in its socket, not in
    our memory.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import weakref
from collections import deque
from collections.abc import Callable
from typing import Protocol

from cruised.pool.wire import frames, sharedfile, sockopt
from cruised.pool.wire.framebuf import FrameBuffer

log = logging.getLogger("cruised.channel")

RECV_SIZE = 256 << 10
HIGH_WATER = 32 << 20
LOW_WATER = 4 << 20
#: descriptors one connection may have passed ahead of the frames that claim them (an honest
#: client: at most two batches of SCM_MAX_FD), and all connections together: a client that
#: passes descriptors no frame claims must not use up the daemon's. A connection holding
#: unclaimed ones with no frame in progress also counts as stalled (daemon.read_timeout).
MAX_FDS_WAITING = 2 * 253
MAX_FDS_WAITING_ALL = 4096
_fds_waiting_all = 0
try:
    IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)
except (ValueError, OSError):
    IOV_MAX = 512


class WriteBatch:
    """Channels with queued output, flushed once the current read callback is done.

    Except while the last whole frame a read brought is being handled (``eager``):
    what that frame makes us write is sent at once. Nothing could join it any more
    (no frame after it in this read), and a lone call's reply then reaches its
    client before the dispatcher's bookkeeping for it, not after. Same sends, sooner.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[Channel] = []
        self.depth = 0  # >0 while a read callback runs: it flushes on the way out
        self.scheduled = False
        #: set by Channel._parse for the last whole frame of a read; cleared when the read is done
        self.eager = False

    def mark(self, channel: Channel) -> None:
        self.dirty.append(channel)
        if self.depth == 0 and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def run(self, handle: Callable[[], None], eager: bool) -> None:
        """Run ``handle`` as a read callback: writes made meanwhile are flushed when the outermost
        one returns, or sent at once while ``eager``. The HTTP door's connections pass True: they
        handle one request at a time, as a Channel handles the last frame of a read. The state
        it replaces is restored after, so a nested run (a drain) leaves its caller's as it was."""
        self.depth += 1
        outer, self.eager = self.eager, eager
        try:
            handle()
        finally:
            self.eager = outer
            self.depth -= 1
            if self.depth == 0 and self.dirty:
                self.flush()

    def flush(self) -> None:
        self.scheduled = False
        while self.dirty:
            dirty, self.dirty = self.dirty, []
            for ch in dirty:
                ch._flush()


_batches: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteBatch] = weakref.WeakKeyDictionary()


def batch_for(loop: asyncio.AbstractEventLoop) -> WriteBatch:
    b = _batches.get(loop)
    if b is None:
        b = _batches[loop] = WriteBatch(loop)
    return b


class FrameSink(Protocol):
    def on_frame(self, channel: Channel, buf: bytearray, kind: int, status: int, reqid: int) -> None: ...

    def on_close(self, channel: Channel, error: BaseException | None) -> None: ...

    # optional: ``on_peer_gone(channel)``, called when a write fails, before what the peer
    # already sent is delivered and the channel closes


class Channel:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        sink: FrameSink,
        limit: int,
        name: str = "",
        on_frame_error: Callable[[Channel, frames.FrameError], None] | None = None,
        accept_fds: bool = False,
    ) -> None:
        sock.setblocking(False)
        sockopt.size_buffers(sock)
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.sink = sink
        self.name = name
        self.on_frame_error = on_frame_error
        self.closed = False
        #: received bytes not yet cut into frames (a large frame's own buffer included)
        self.incoming = FrameBuffer(RECV_SIZE, limit)
        self._out: list[bytes | bytearray | memoryview] = []  # flat byte buffers (len() == size)
        self.out_bytes = 0
        #: read with recvmsg, keeping passed descriptors: a client connection that asked to pass
        #: shared files (PASS_FDS). Off otherwise: recvmsg costs ~10 µs a call more than recv_into
        self.accept_fds = accept_fds
        self._fds_in: deque[int] = deque()
        #: the descriptor that came with the frame being delivered; the sink may ``take_fd`` it
        self.frame_fd: int | None = None
        self._flush_scheduled = False
        self._writing = False
        self._reading = True
        self._closing = False
        self._broken = False  # a frame error: stop delivering, answer, close
        #: loop time at which the current partial frame began, else None (stall detection)
        self.partial_since: float | None = None
        self._batch = batch_for(loop)
        loop.add_reader(self.fd, self._on_readable)

    # -- reading ---------------------------------------------------------------

    def _on_readable(self) -> None:
        # WriteBatch.run(self._read, False), inline: this runs for every read
        batch = self._batch
        batch.depth += 1
        try:
            self._read()
        finally:
            batch.eager = False
            batch.depth -= 1
            if batch.depth == 0 and batch.dirty:
                batch.flush()

    def drain(self) -> None:
        """Read and deliver everything the peer has sent so far, now (not from the loop).

        The dispatcher's exactness rests on this: once it returns, any frame the
        peer's ``send`` completed before the call has reached the sink (a Unix
        socket's send puts the bytes in our receive queue before it returns).
        """
        # a drain runs inside another channel's read: it keeps that read's eager state
        self._batch.run(self._read_all, self._batch.eager)

    def _read_all(self) -> None:
        while self._reading and not self.closed and self._read():
            pass

    def _read(self) -> bool:
        """One ``recv`` and the frames it completes; False when nothing was there, or the channel
        closed (at its end, on an error, or on a descriptor that breaks the framing).

        One method, not a recv, a parse and a delivery helper: it runs for every read, and a
        Python call costs about as much as cutting a frame out of the buffer."""
        fb = self.incoming
        try:
            n = self._recvmsg(fb.space()) if self.accept_fds else self.sock.recv_into(fb.space())
        except (BlockingIOError, InterruptedError):
            return False
        except frames.FrameError as exc:
            self._frame_error(exc)
            return False
        except OSError as exc:
            self.close(exc)
            return False
        if n == 0:
            self.close(None)
            return False
        try:
            buf = fb.next(n)
        except frames.FrameError as exc:
            self._frame_error(exc)
            return True
        sink = self.sink
        batch = self._batch
        while buf is not None:
            # the read's last whole frame: less than a header is left (a big frame is always the
            # last: the buffer was emptied when it began), so another next() would return None
            last = fb.end - fb.start < frames.HEADER_SIZE
            batch.eager = last
            _, _, kind, status, reqid = fb.header
            if status & frames.CARRIES_FD and self.accept_fds:
                self._deliver_with_fd(buf, kind, status, reqid)
            else:  # the hot path: straight to the sink
                sink.on_frame(self, buf, kind, status, reqid)
            # after a frame error (_deliver_with_fd's too) nothing that follows the bad frame is delivered
            if last or self.closed or self._broken:
                break
            try:
                buf = fb.next()
            except frames.FrameError as exc:
                self._frame_error(exc)
                return True
        # daemon.read_timeout: since when a frame has been incomplete
        if fb.start == fb.end and fb.big is None:  # nothing of a next frame received (FrameBuffer.held(), inline)
            if not self._fds_in:
                self.partial_since = None
            elif self.partial_since is None:  # descriptors no frame has claimed yet: stalled until one does
                self.partial_since = self.loop.time()
        elif self.partial_since is None:
            self.partial_since = self.loop.time()
        return True

    def _recvmsg(self, view: memoryview) -> int:
        """recv_into that also keeps descriptors the peer passed (SCM_RIGHTS), in arrival order."""
        global _fds_waiting_all
        n, anc, flags, _ = self.sock.recvmsg_into([view], sharedfile.ANCBUF, sharedfile.MSG_CMSG_CLOEXEC)
        if anc:
            fds = sharedfile.fds_from(anc)
            self._fds_in.extend(fds)
            _fds_waiting_all += len(fds)
            if len(self._fds_in) > MAX_FDS_WAITING:
                raise frames.FrameError(f"over {MAX_FDS_WAITING} file descriptors passed without frames that claim them")
            if _fds_waiting_all > MAX_FDS_WAITING_ALL:
                raise frames.FrameError("too many file descriptors passed to the daemon and not yet claimed; closing this connection")
        if flags & sharedfile.MSG_CTRUNC:
            raise frames.FrameError("file descriptors passed with a frame were lost (more than one recvmsg can hold)")
        return n

    def _deliver_with_fd(self, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        """Hand the sink a frame that announces a descriptor, with the next one received."""
        global _fds_waiting_all
        if not self._fds_in:
            self._frame_error(frames.FrameError("the frame announces a file descriptor, but none came with it", reqid))
            return
        self.frame_fd = self._fds_in.popleft()
        _fds_waiting_all -= 1
        try:
            self.sink.on_frame(self, buf, kind, status, reqid)
        finally:
            if self.frame_fd is not None:  # not taken: nobody will use it
                os.close(self.frame_fd)
                self.frame_fd = None

    def take_fd(self) -> int | None:
        """The descriptor that came with the frame being delivered; the caller now owns it."""
        fd, self.frame_fd = self.frame_fd, None
        return fd

    def _frame_error(self, exc: frames.FrameError) -> None:
        # The stream cannot be resynchronised after a bad header: answer, then close.
        self._broken = True
        self.pause_reading()
        if self.on_frame_error is not None:
            self.on_frame_error(self, exc)
        self.close_after_flush()

    def pause_reading(self) -> None:
        if self._reading and not self.closed:
            self._reading = False
            self.loop.remove_reader(self.fd)

    def resume_reading(self) -> None:
        if not self._reading and not self.closed and not self._closing:
            self._reading = True
            self.loop.add_reader(self.fd, self._on_readable)

    # -- writing ---------------------------------------------------------------

    def write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if self.closed:
            return
        out = self._out
        added = 0
        for p in parts:
            # every queued buffer is flat bytes, so len() is its size (no memoryview per part)
            if type(p) is memoryview and (p.format != "B" or p.ndim != 1):
                p = p.cast("B")
            n = len(p)
            if n:
                out.append(p)
                added += n
        self.out_bytes += added
        if not self._writing:  # else the writer callback sends it, after what is already waiting
            if self._batch.eager and not self._closing:
                self._send_queued()  # see WriteBatch; what it could not send, or its error, is the flush's
            if out and not self._flush_scheduled:
                self._flush_scheduled = True
                self._batch.mark(self)
        if self.out_bytes > HIGH_WATER and self._reading:
            self.pause_reading()

    def _send_queued(self) -> OSError | None:
        """Send what the kernel takes of the queue now; the error that stopped it (a full socket
        is none). Failures are handled by ``_flush`` only, so an eager send inside a sink's
        callback never closes a channel under it: the batch's flush meets the error again."""
        out = self._out
        while out:
            try:
                # one buffer (the usual forwarded frame): send() skips building an iovec list
                sent = self.sock.send(out[0]) if len(out) == 1 else self.sock.sendmsg(out[:IOV_MAX])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                return exc
            self.out_bytes -= sent
            i = 0
            while i < len(out) and sent >= len(out[i]):
                sent -= len(out[i])
                i += 1
            del out[:i]
            if sent:
                out[0] = memoryview(out[0])[sent:]  # a view: the rest is not copied
                return None  # the kernel is full
        return None

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.closed:
            return
        exc = self._send_queued()
        if exc is not None:
            self._write_failed(exc)
            return
        out = self._out
        if out:
            if not self._writing:
                self._writing = True
                self.loop.add_writer(self.fd, self._on_writable)
        else:
            if self._writing:
                self._writing = False
                self.loop.remove_writer(self.fd)
            if self._closing:
                self.close(None)
                return
        if not self._reading and not self._closing and self.out_bytes < LOW_WATER:
            self.resume_reading()

    def _on_writable(self) -> None:
        self._flush()

    def _write_failed(self, exc: OSError) -> None:
        """The peer is gone (EPIPE, ECONNRESET). What it sent before it went is still in our
        receive queue: deliver that first (a worker's last replies), then close."""
        self._out.clear()
        self.out_bytes = 0
        # received descriptors stay until close(): the frames the drain delivers may claim them
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.fd)
        gone = getattr(self.sink, "on_peer_gone", None)
        if gone is not None:
            gone(self)
        self.drain()
        self.close(exc)

    # -- closing ---------------------------------------------------------------

    def _drop_fds(self) -> None:
        global _fds_waiting_all
        fds_in = list(self._fds_in)
        self._fds_in.clear()
        _fds_waiting_all -= len(fds_in)
        sharedfile.close_all(fds_in)

    def close_after_flush(self) -> None:
        self._closing = True
        self.pause_reading()
        if not self._out and not self._flush_scheduled:
            self.close(None)

    def close(self, error: BaseException | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._reading:
            self.loop.remove_reader(self.fd)
        if self._writing:
            self.loop.remove_writer(self.fd)
        self._out.clear()
        self.out_bytes = 0
        self._drop_fds()
        try:
            self.sock.close()
        except OSError:
            pass
        # A channel and its sink reference each other (a worker's channel also through its Worker),
        # so a closed one lives until a full gc collection. Drop the 256 KiB receive buffer now:
        # a soak killing ~100 workers a minute held 20-40 MB of them (tracemalloc: the channel's
        # bytearray(RECV_SIZE)), which read as steady RSS growth.
        self.incoming.release()
        self.sink.on_close(self, error)
