"""Cancelling a call in a worker: the cancel board and the SIGINT handler.

A cancelled call (Kind.CANCEL from its client, or a client gone with
``on_disconnect: cancel``) must never start if it has not, and must see
KeyboardInterrupt if it runs. The supervisor owns that decision
(daemon/core/dispatch.py); this module is the worker's half.

The cancel board
    A page of shared memory per worker (a memfd the launcher creates and the
    template hands to the forked worker): ``u64 count`` at offset 0, then a
    ring of ``SLOTS`` u64 request ids. The supervisor writes the id of every
    job of this worker it cancels, then the new count (``Board.post``). The
    worker reads the ids posted since it last looked (``Board.pull``), with
    no system call.

Why a board, and not the signal alone: a signal cannot say which call it is
for, and the worker may have finished the call it was meant for and started
the next (a held one, or one just sent) by the time SIGINT lands. So:

* a SIGINT raises KeyboardInterrupt only if the call running now is on the
  board; any other SIGINT is ignored (Ctrl-C in a foreground ``cruised
  serve`` reaches the whole process group: workers stay up);
* KeyboardInterrupt is raised only while the user's function runs
  (``in_user``), never in the worker's own code between two calls (it
  would break the channel protocol). A SIGINT for this call that lands
  outside the function is remembered (``hit``) and the call is answered
  CANCELLED without starting, or without its result;
* before it starts a held call the worker pulls the board. The supervisor
  posts first, then reads every reply the worker already sent: if the call
  is still held after that, the worker cannot have started it, and will find
  it on the board when it gets to it (it answers NOT_RUN). So a held call
  the supervisor answers CANCELLED never runs.

A call that finished before its interrupt arrived is answered with its
result (the client has stopped waiting and drops it). A call interrupted by
its cancel is answered CANCELLED, whatever the function did with the
KeyboardInterrupt (re-raised it, returned, raised something else): its
caller has gone. A KeyboardInterrupt the function raises by itself, with no
cancel, still ends the worker (a WorkerCrashed answer), as before.

Standard library only: this runs in workers, under any pool's interpreter.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
from collections.abc import Callable
from types import FrameType
from typing import Any, Final

#: the board's size: one page
SIZE: Final = 4096
_U64 = struct.Struct("<Q")
#: ids the ring holds; a worker is only ever cancelled its running call and the few it holds
SLOTS: Final = SIZE // _U64.size - 1
#: ids the worker remembers (the board's ids it has pulled, for calls that may still come)
REMEMBER: Final = 4 * SLOTS


class Board:
    """One worker's cancel board over a shared mapping (either side; see the module docstring)."""

    __slots__ = ("mem", "seen")

    def __init__(self, mem: mmap.mmap) -> None:
        self.mem = mem
        self.seen = 0  # the reader's count of ids already pulled

    @classmethod
    def create(cls, name: str) -> tuple[Board, int]:
        """A new board and its memfd (to hand to the worker; the caller closes it)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        return cls(mmap.mmap(fd, SIZE)), fd

    @classmethod
    def open(cls, fd: int) -> Board:
        """The worker's view of the board the supervisor created (closes ``fd``)."""
        try:
            return cls(mmap.mmap(fd, SIZE))
        finally:
            os.close(fd)

    def post(self, reqid: int) -> None:
        """Supervisor: cancel ``reqid``. The id is written before the count that shows it."""
        mem = self.mem
        (count,) = _U64.unpack_from(mem, 0)
        _U64.pack_into(mem, _U64.size * (1 + count % SLOTS), reqid)
        _U64.pack_into(mem, 0, count + 1)

    def pull(self) -> list[int]:
        """Worker: the ids posted since the last pull (the newest SLOTS at most)."""
        mem = self.mem
        (count,) = _U64.unpack_from(mem, 0)
        seen = self.seen
        if count == seen:
            return []
        self.seen = count
        return [_U64.unpack_from(mem, _U64.size * (1 + i % SLOTS))[0] for i in range(max(seen, count - SLOTS), count)]

    def close(self) -> None:
        self.mem.close()


class Interrupts:
    """The worker's interrupt state: which call runs, whether user code runs, what was cancelled.

    The worker loop sets ``current`` and ``in_user`` around each call (pool/worker.py); the
    SIGINT handler reads the board and raises KeyboardInterrupt only into the user's function.
    """

    __slots__ = ("board", "current", "hit", "ids", "in_user")

    def __init__(self, board: Board | None = None) -> None:
        self.board = board
        #: the request id of the call the worker is on (0 between calls)
        self.current = 0
        #: user code runs now: a KeyboardInterrupt may be raised into it
        self.in_user = False
        #: the current call was cancelled (its id came up on the board)
        self.hit = False
        #: cancelled ids pulled from the board, oldest first (a dict: an ordered set)
        self.ids: dict[int, None] = {}

    def install(self) -> None:
        """Handle SIGINT (main thread only: the worker's, at start)."""
        signal.signal(signal.SIGINT, self._on_sigint)

    def pull(self) -> None:
        """Read the board; True-ish ``ids`` afterwards means some call was cancelled."""
        if self.board is None:
            return
        new = self.board.pull()
        if not new:
            return
        ids = self.ids
        for reqid in new:
            ids[reqid] = None
        while len(ids) > REMEMBER:
            del ids[next(iter(ids))]

    def cancelled(self, reqid: int) -> bool:
        """Whether ``reqid`` is on the board (pulled now): a held call about to start checks this."""
        self.pull()
        return reqid in self.ids

    def begin(self, reqid: int) -> None:
        """The worker is on call ``reqid`` now (not yet in user code)."""
        self.current = reqid
        self.hit = bool(self.ids) and reqid in self.ids

    def end(self) -> bool:
        """The call is over; whether it was cancelled (its answer is then CANCELLED)."""
        hit = self.hit
        self.current = 0
        self.hit = self.in_user = False
        return hit

    def run_user(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as user code: a cancel of the current call interrupts it."""
        self.in_user = True
        try:
            if self.hit:  # cancelled before it could start
                raise KeyboardInterrupt("cancelled by its client")
            return fn(*args, **kwargs)
        finally:
            self.in_user = False

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.pull()
        if self.current and self.current in self.ids:
            self.hit = True
            if self.in_user:
                raise KeyboardInterrupt("cancelled by its client")


#: this process's interrupt state (pool/worker.py sets the board and installs the handler)
STATE: Final = Interrupts()

#: the CANCELLED reply's payload for a call the worker interrupted or never started
INTERRUPTED: Final = b'{"message": "cancelled: the call was interrupted (KeyboardInterrupt) in its worker"}'
NOT_STARTED: Final = b'{"message": "cancelled before it started; it never ran"}'
