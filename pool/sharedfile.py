"""A call's shared file: large buffers travel client <-> worker outside the socket path.

Through sockets a 1 MB argument is copied eight times per round trip, four
of them by the supervisor (in and out, each way), so a design that routes
payload bytes through a supervisor cannot get near the two-process floor.
Instead the client puts an argument's large out-of-band buffers (pickle
protocol 5: numpy arrays, pandas blocks) in a memfd, the *shared file*, and
passes its descriptor with the CALL frame (``SCM_RIGHTS``). The supervisor
forwards the descriptor, never the bytes. The worker copies the buffers out
with ``pread`` and writes the result's large buffers into the same file with
``pwrite``; the client reads them after the reply. Each side copies each
buffer once.

Rules that make it safe and cheap:

* nothing is ever mapped: both sides copy (``pread``/``pwrite``), so no
  object aliases the file and a file that shrinks cannot SIGBUS anyone;
* the client reuses a file only after the worker's own reply to the call
  (status OK or ERROR): the worker copied the arguments before running the
  call and wrote the result before replying, so it is done with the file.
  After any answer from the daemon instead (a timeout, a crash, a refusal)
  the client closes the file: a worker killed at its deadline may have been
  inside a ``pwrite`` at that moment;
* the client keeps a few files per connection and reuses them (``FilePool``):
  a fresh memfd's pages cost about 3x a copy into pages it already has
  (442 vs 156 µs per MB measured on the reference VM);
* the supervisor only checks that the descriptor is a regular file within
  ``daemon.max_message_bytes``; a worker that cannot write the result into it
  (a read-only descriptor, a full tmpfs) sends the result inline instead.

In a bundle's index (pool/bundle.py) a buffer in the shared file has
``IN_FILE`` set in its length; such buffers lie in the file back to back from
offset 0, in index order.
"""

from __future__ import annotations

import array
import os
import socket
import stat
import threading
from typing import Final

#: out-of-band buffers at least this large go through the shared file
SHARE_MIN: Final = 256 << 10
#: bit 63 of a bundle index length: the buffer is in the shared file
IN_FILE: Final = 1 << 63
#: descriptors one ``recvmsg`` can bring (the kernel's SCM_MAX_FD)
SCM_MAX_FD: Final = 253
ANCBUF: Final = socket.CMSG_SPACE(SCM_MAX_FD * 4)
#: idle files a client connection keeps for reuse, and the largest it keeps
POOL_IDLE: Final = 8
POOL_KEEP_BYTES: Final = 64 << 20


class SharedFileError(ValueError):
    """A shared file that cannot be used (wrong type, too large, shorter than announced)."""


def create() -> int:
    """A new, empty shared file (a memfd, closed on exec)."""
    return os.memfd_create("cruised-call", os.MFD_CLOEXEC)


def write_at(fd: int, view: memoryview, offset: int) -> None:
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def read_at(fd: int, offset: int, length: int) -> bytearray:
    """``length`` bytes at ``offset``, copied out (into a buffer nobody else sees)."""
    from . import rawbuf

    out = rawbuf.uninitialized(length)
    view = memoryview(out)
    got = 0
    while got < length:
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise SharedFileError(f"shared file ends at {offset + got} bytes; the call announced {offset + length}")
        got += n
    return out


def check(fd: int, limit: int) -> None:
    """Refuse a descriptor a client passed that is not a regular file within ``limit`` bytes."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SharedFileError("the file descriptor passed with the call is not a regular file (expected a memfd)")
    if st.st_size > limit:
        raise SharedFileError(f"the shared file holds {st.st_size} bytes, over the limit of {limit} (daemon.max_message_bytes)")


def fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors in a ``recvmsg``'s ancillary data."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds.extend(a)
    return fds


def rights(fds: list[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data passing ``fds`` with a ``sendmsg``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class Owned:
    """A descriptor with one owner: closed by ``close()`` or, at the latest, when dropped.

    A supervisor job keeps its call's shared file this way until the job is
    answered or forgotten: a held call requeued after its worker died is
    sent again, with the same file.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        """The descriptor, no longer owned here."""
        fd, self.fd = self.fd, -1
        return fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()


class FilePool:
    """A client connection's idle shared files, reused call after call (thread-safe)."""

    def __init__(self) -> None:
        self._idle: list[int] = []
        self._lock = threading.Lock()
        self.closed = False

    def take(self) -> int:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return create()

    def give(self, fd: int) -> None:
        """Back for reuse (the call it served has its reply), or closed if the pool is full or it grew large."""
        try:
            big = os.fstat(fd).st_size > POOL_KEEP_BYTES
        except OSError:
            return
        with self._lock:
            if not self.closed and not big and len(self._idle) < POOL_IDLE:
                self._idle.append(fd)
                return
        os.close(fd)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        close_all(idle)
