"""A call's shared file: large buffers travel client <-> worker outside the socket path.

Through sockets a 1 MB argument is copied eight times per round trip, four of
them by the supervisor (in and out, each way), so a design that routes
payload bytes through a supervisor cannot get near the two-process floor.
Instead the client puts an argument's large out-of-band buffers (pickle
protocol 5: numpy arrays, pandas blocks) in a memfd, the *shared file*, and
passes its descriptor with the CALL frame (``SCM_RIGHTS``; once per
connection it first asks, PASS_FDS, so connections that never pass files are
read without ``recvmsg``). The supervisor forwards the descriptor on the
worker's descriptor socket (daemon/core/launcher.py), never the bytes. The worker copies the buffers out
and writes the result's large buffers into the same file; the client copies
them out after the reply. Each side copies each buffer once.

What else takes a file:

* a large pickle stream (``bytes``, ``str``, lists, object columns pickle
  in-band, not as buffers), once the daemon announced ``FILE_PICKLE``; a
  worker puts its result's stream there only for a CALL flagged
  ``PICKLE_IN_FILE``, so an older client never gets one it cannot read. A
  stream is read in place (``Mapped.view``): ``pickle.loads`` copies what it
  keeps;
* a call with small arguments whose function returned a large result last
  time (the client learns it per function, daemon/client/session.py ``_Shipped``):
  a query that returns a table. Its file starts empty and the worker grows it.

Both sides copy through a ``MAP_SHARED`` mapping of the file (``Mapped``):
measured between two processes on the reference VM, four 1 MB copies took
220-350 µs as ``memcpy`` against 800-980 µs as ``pwrite``/``pread``, whose
per-page cache lookups dominate. The client keeps its files mapped
(``FilePool``); a worker keeps the mappings of the last few files it was sent
(``MappingCache``), so a reused file costs no ``mmap`` and no page faults.

Rules that make it safe:

* every object gets a private copy: no array a function receives, and none the
  client gets back, views a mapping, so reusing a file never changes them;
* the client reuses a file only after an answer that means no worker will
  touch it again: the worker's own reply (it copied the arguments before
  running the call and wrote the result before replying), or the refusal of
  a call that never started (QueueFull, QueueTimeout). After an
  ExecutionTimeout or a crash it closes the file instead: a worker killed at
  its deadline may have been copying into it at that moment;
* files only grow (``ftruncate`` up, by whichever side needs more room), and
  each side takes the file's size (``fstat``) right before it copies, so a
  mapping is never used past the end of its file: a file that shrank gives a
  clear error. Only a process shrinking the file in the microseconds between
  that check and the copy could make the worker fault (SIGBUS); that call is
  answered as crashed and the pool replaces the worker, as for any function
  that kills its worker;
* the supervisor only checks that the descriptor is a memfd (``F_GET_SEALS``,
  which never reaches a filesystem: a file on FUSE or NFS could block the
  event loop in ``fstat`` or ``close``) within ``daemon.max_message_bytes``;
  a worker that cannot map or write the file (a read-only descriptor, a full
  tmpfs) sends the result inline instead;
* descriptors are received close-on-exec, a connection holding passed
  descriptors that no frame claims counts as stalled (``daemon.read_timeout``),
  and the daemon holds at most a few thousand unclaimed ones in all;
* a function that forks cannot write the result: its child leaves before the
  result is packed, as it would before replying.

In a bundle's index (pool/wire/bundle.py) a buffer in the shared file has
``IN_FILE`` set in its length; such buffers lie in the file back to back from
offset 0, in index order.
"""

from __future__ import annotations

import array
import fcntl
import mmap
import os
import socket
import threading
from collections import OrderedDict
from typing import Final

from cruised.pool.wire import rawbuf

#: out-of-band buffers at least this large go through the shared file
SHARE_MIN: Final = 256 << 10
#: bit 63 of a bundle index length: the buffer is in the shared file
IN_FILE: Final = 1 << 63
#: descriptors one ``recvmsg`` can bring (the kernel's SCM_MAX_FD)
SCM_MAX_FD: Final = 253
ANCBUF: Final = socket.CMSG_SPACE(SCM_MAX_FD * 4)
#: recvmsg flags as plain ints: socket's are IntFlag members, and ``flags & socket.MSG_CTRUNC``
#: runs enum.Flag.__and__ in Python (~2 us), once per call with a shared file
MSG_CTRUNC: Final = int(socket.MSG_CTRUNC)
MSG_CMSG_CLOEXEC: Final = int(socket.MSG_CMSG_CLOEXEC)
#: a kept file holds its memory, so what stays idle is bounded. A client connection keeps at
#: most POOL_IDLE files for reuse, none over KEEP_FILE_BYTES and KEEP_TOTAL_BYTES in all; a
#: worker keeps the mappings of at most MappingCache.KEEP files within the same bounds. The
#: counts cover a pipelined map's window (32): with 8 files and 4 mappings, a map of calls
#: returning 1 MB made a new memfd and mapping per call and ran 25-35% slower.
POOL_IDLE: Final = 32
KEEP_FILE_BYTES: Final = 16 << 20
KEEP_TOTAL_BYTES: Final = 64 << 20
#: map the whole file at once (page tables filled in one call, not a fault per 4 KiB)
_MAP_FLAGS: Final = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class SharedFileError(ValueError):
    """A shared file that cannot be used (wrong type, too large, shorter than announced)."""


def create() -> int:
    """A new, empty shared file (a memfd, closed on exec)."""
    return os.memfd_create("cruised-call", os.MFD_CLOEXEC)


class Owned:
    """A descriptor with one owner: closed by ``close()`` or, at the latest, when dropped.

    A supervisor job keeps its call's shared file this way until the job is
    answered or forgotten: a held call requeued after its worker died is
    sent again, with the same file.
    """

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()


class Mapped(Owned):
    """A shared file and a ``MAP_SHARED`` mapping of all of it, remapped when the file grows.

    ``fd`` is the file's descriptor; a client's ``Mapped`` owns it (``close``
    closes both), a worker's borrows the descriptor of the call at hand.
    """

    __slots__ = ("mm", "owns_fd", "size", "writable")

    def __init__(self, fd: int, owns_fd: bool = True) -> None:
        super().__init__(fd)
        self.mm: mmap.mmap | None = None
        self.size = 0
        self.writable = True
        self.owns_fd = owns_fd

    def _map(self, size: int) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        self.size = 0
        if size:
            try:
                self.mm = mmap.mmap(self.fd, size, _MAP_FLAGS, mmap.PROT_READ | mmap.PROT_WRITE)
            except PermissionError:  # a read-only descriptor: it can be read, not written
                self.mm = mmap.mmap(self.fd, size, _MAP_FLAGS, mmap.PROT_READ)
                self.writable = False
        self.size = size

    def refresh(self) -> None:
        """Map the file as it is now (another process may have grown it)."""
        size = os.fstat(self.fd).st_size
        if size != self.size or self.mm is None:
            self._map(size)

    def reserve(self, n: int, round_to: int = 1) -> None:
        """Make the file at least ``n`` bytes (rounded up to ``round_to``) and map all of it."""
        self.refresh()
        if n > self.size:
            if not self.writable:
                raise PermissionError("the shared file was passed read-only")
            os.ftruncate(self.fd, -(-n // round_to) * round_to)
            self._map(os.fstat(self.fd).st_size)

    def write(self, offset: int, view: memoryview) -> None:
        """Copy ``view`` into the file at ``offset`` (``reserve`` the room first)."""
        if self.mm is None or offset + view.nbytes > self.size or not self.writable:
            raise SharedFileError("write past the reserved end of the shared file")
        with memoryview(self.mm) as mv:
            mv[offset : offset + view.nbytes] = view

    def read(self, offset: int, length: int) -> bytearray:
        """``length`` bytes at ``offset``, copied out into a buffer nobody else sees."""
        self.refresh()  # its size now: a mapping read past the end of its file faults
        if offset + length > self.size:
            raise SharedFileError(f"shared file ends at {self.size} bytes; the call announced {offset + length}")
        out = rawbuf.uninitialized(length)
        if length:
            assert self.mm is not None  # refresh() maps a file that has bytes; this one has at least offset + length
            with memoryview(self.mm) as mv:
                memoryview(out)[:] = mv[offset : offset + length]
        return out

    def view(self, offset: int, length: int) -> memoryview:
        """A view of ``length`` bytes at ``offset``, for a reader that copies what it keeps
        (``pickle.loads`` of a stream); release it before the file is used again."""
        self.refresh()  # its size now: a mapping read past the end of its file faults
        if offset + length > self.size:
            raise SharedFileError(f"shared file ends at {self.size} bytes; the call announced {offset + length}")
        if not length:
            return memoryview(b"")
        assert self.mm is not None  # refresh() maps a file that has bytes; this one has at least offset + length
        with memoryview(self.mm) as mv:
            return mv[offset : offset + length]

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
            self.mm = None
        if self.owns_fd:
            super().close()
        else:
            self.fd = -1  # borrowed: its owner closes it


def check(fd: int, limit: int) -> None:
    """Refuse a descriptor a client passed that is not a memory file within ``limit`` bytes.

    Only memfds (and other tmpfs files) pass: ``F_GET_SEALS`` answers for
    them alone and never reaches a filesystem. A file on FUSE or a hard NFS
    mount could block ``fstat`` or ``close`` in the supervisor's event loop,
    or the worker, for as long as its server likes.
    """
    try:
        fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise SharedFileError("the file descriptor passed with the call is not a memfd") from None
    st = os.fstat(fd)  # a memory file: never blocks
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


class FilePool:
    """A client connection's idle shared files, mapped, reused call after call (thread-safe)."""

    #: files grow in steps of this much, so a stream of similar calls maps each file once
    GROW = 1 << 20

    def __init__(self) -> None:
        self._idle: list[Mapped] = []
        self._lock = threading.Lock()
        self.closed = False

    def take(self) -> Mapped:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        return Mapped(create())

    def give(self, m: Mapped) -> None:
        """Back for reuse (the call it served has its reply), or closed if keeping it would pass the
        pool's bounds."""
        try:
            size = os.fstat(m.fd).st_size  # the worker may have grown it for a large result
        except OSError:
            size = KEEP_FILE_BYTES + 1
        with self._lock:
            idle_bytes = sum(f.size for f in self._idle)
            if not self.closed and size <= KEEP_FILE_BYTES and idle_bytes + size <= KEEP_TOTAL_BYTES and len(self._idle) < POOL_IDLE:
                self._idle.append(m)
                return
        m.close()

    def close(self) -> None:
        with self._lock:
            self.closed = True
            idle, self._idle = self._idle, []
        for m in idle:
            m.close()


class MappingCache:
    """A worker's mappings of the shared files it was sent lately, by inode.

    A client reuses its files, so the same few inodes come back call after
    call with a new descriptor each time; mapping each once saves an ``mmap``
    per call. A kept mapping holds its file's memory even after the client
    closed it, so only files up to ``KEEP_FILE_BYTES`` are kept, at most
    ``KEEP`` of them and ``KEEP_TOTAL_BYTES`` in all, oldest dropped first;
    larger ones are mapped for their call only.
    """

    KEEP = 16

    def __init__(self) -> None:
        self._maps: OrderedDict[tuple[int, int], Mapped] = OrderedDict()

    def open(self, fd: int) -> Mapped:
        """The mapping of the file behind ``fd`` (borrowed: the caller closes ``fd``, then calls ``done``)."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        m = self._maps.pop(key, None)
        if m is None:
            m = Mapped(fd, owns_fd=False)
        m.fd = fd
        m.refresh()
        self._maps[key] = m
        return m

    def done(self, m: Mapped) -> None:
        """The call is over: forget its descriptor, and keep the mappings within bounds."""
        m.fd = -1
        if m.size > KEEP_FILE_BYTES:
            if self._maps and next(reversed(self._maps.values())) is m:  # open() made it the newest
                self._maps.popitem(last=True)
            m.close()
        while self._maps and (len(self._maps) > self.KEEP or sum(k.size for k in self._maps.values()) > KEEP_TOTAL_BYTES):
            self._maps.popitem(last=False)[1].close()
