"""The asyncio client: ``await s.acall(f, ...)``, ``await f.aio(...)``, ``async for r in s.amap(f, xs)``.

For code that runs in an event loop: FastAPI handlers, notebooks' top-level
``await``, asyncio services. ``Session`` (daemon/client/session.py) holds one
``AsyncConnection`` per event loop it is used from, opened on first use, and
imports this module only then (a synchronous user never pays for asyncio).

Data flow::

    acall ──ship (once per session)──> send: REGISTER (once per connection) + CALL
          <── reader task: replies matched to their calls by request id ──┘

The same frames as the synchronous client, on asyncio streams over the same
Unix socket, pipelined: any number of calls from any number of tasks share the
connection, and one reader task hands each reply to its call. Arguments and
results travel in the frames (no shared files: those are the synchronous
client's large-array path).

Cancellation: cancelling the task that awaits a call (``task.cancel()``, a
timeout around it, a FastAPI client that disconnects) withdraws the call with
Kind.CANCEL, exactly as Ctrl-C does in the synchronous client: queued, it never
runs; running, its worker is interrupted (KeyboardInterrupt in the function).
Its reply, which still comes, is dropped. ``amap`` withdraws the calls it has
in flight when its consumer stops (``break``, an exception, a cancelled task).

Flow control: ``amap`` sends only calls it has credit for, as ``Session.map``
does (daemon/client/credit.py, daemon/core/fairness.py "Credit"): it opens
the connection's credit on its pool (one ``CreditGate`` per connection and
pool, shared by the ``amap`` tasks on it, wrapped in ``_Credit`` for asyncio),
sends each call flagged CREDITED (never refused QueueFull), awaits the
daemon's next grant when it has neither credit nor calls in flight, and the
last ``amap`` to finish gives the unspent credit back. Everything runs on the
connection's loop (grants are read by its reader task), so the gate's lock is
never contended. Against a daemon without flow control (the CREDIT request is
refused) ``amap`` keeps its window and a refusal is raised as QueueFull, as
by ``Session.map``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from cruised.client import errors
from cruised.client.credit import CreditGate
from cruised.client.session import DEFAULT_WINDOW, _error_for, _Pending, _start_hint, _Value
from cruised.pool.wire import bundle, frames
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.client.session import Session, _Shipped

T = TypeVar("T")

#: replies are read with this limit only as a guard against a corrupt stream (the daemon's are trusted)
_NO_LIMIT = 1 << 62


class _Credit:
    """A connection's ``CreditGate`` on one pool, and what awaiting it needs.

    Opening and closing are requests whose answers come later, and a close
    (sent, never awaited: it may run in a cancelled task's cleanup) can be
    followed by a new open before either is answered. The daemon answers a
    connection's requests in order, so only the answer to the newest CREDIT
    request (``latest``, its request id) sets the gate's state: an older
    answer (an open overtaken by a close, a close overtaken by a new open) is
    stale. Grants count only while the gate is open (``CreditGate.granted``).
    """

    __slots__ = ("gate", "latest", "ready", "waiters")

    def __init__(self, pool: str) -> None:
        self.gate = CreditGate(pool)
        #: request id of the newest CREDIT request on this pool
        self.latest = 0
        #: set once the newest open is answered (a fresh Event per open: waiters of an old one keep theirs)
        self.ready = asyncio.Event()
        #: amap tasks awaiting a grant (the gate calls back one waker; it wakes them all)
        self.waiters: list[asyncio.Future[None]] = []

    def wake(self) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            if not w.done():  # a cancelled waiter's future is done already
                w.set_result(None)


class AsyncConnection:
    """One asyncio connection to the daemon, bound to the event loop that opened it."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.pending: dict[int, _Pending] = {}
        #: REGISTER slots by (pool, key), as on the synchronous connection (Session._send_calls)
        self.registered: dict[tuple[str, bytes], _Pending] = {}
        self.ids = itertools.count(1)
        self.broken: BaseException | None = None
        #: flow control per pool, for the amaps running on this connection
        self.credits: dict[str, _Credit] = {}
        self.reading = self.loop.create_task(self._read_replies(), name="cruised-aio-reader")

    @classmethod
    async def open(cls, path: str) -> AsyncConnection:
        try:
            reader, writer = await asyncio.open_unix_connection(path)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise errors.DaemonUnavailable(f"no cruised daemon answers at {path} ({reason}); {_start_hint(path)}") from None
        return cls(path, reader, writer)

    def send(
        self, requests: list[tuple[int, list[Any]]], callback: Callable[[_Pending], None] | None = None, result_file: bool = False, credited: bool = False
    ) -> list[_Pending]:
        """Frame and queue the requests (``Session._send_calls`` calls this as it calls
        ``_Connection.send``); never a file (``result_file`` is ignored). The transport buffers
        whole frames, so a cancelled sender never leaves half a frame behind. ``credited``: each
        CALL spends a credit (see _Connection.send)."""
        if self.broken is not None:
            raise self.broken
        slots: list[_Pending] = []
        out: list[Any] = []
        for kind, parts in requests:
            rid = next(self.ids)
            slot = _Pending(rid)
            self.pending[rid] = slot
            slots.append(slot)
            out.append(frames.header(kind, rid, bundle.packed_size(parts), frames.CREDITED if credited and kind == Kind.CALL else 0))
            out.extend(parts)
        slots[-1].callback = callback
        self.writer.writelines(out)
        return slots

    def release(self, slot: _Pending) -> None:
        """Nothing to give back: calls on this connection have no shared file."""

    async def wait(self, slot: _Pending, withdraw: bool = True) -> _Pending:
        """``slot`` once answered; if the awaiting task is cancelled meanwhile, the call is
        withdrawn (unless ``withdraw`` is False: the caller withdraws it, with others)."""
        try:
            await self.writer.drain()  # the daemon reads us: no unbounded buffer behind a burst of calls
            if not slot.done:
                answered: asyncio.Future[None] = self.loop.create_future()

                def wake(_slot: _Pending) -> None:
                    if not answered.done():
                        answered.set_result(None)

                slot.callback = wake
                await answered
        except BaseException:
            if withdraw:
                self.abandon(slot)
            raise
        return slot

    def abandon(self, *slots: _Pending) -> None:
        """The caller stopped waiting: CANCEL the calls not answered yet, in one write, in the
        order given (``_Connection.abandon`` says why)."""
        out = [frames.frame(Kind.CANCEL, slot.rid) for slot in slots if self.pending.pop(slot.rid, None) is not None]
        if out and self.broken is None:
            self.writer.write(b"".join(out))

    async def _read_replies(self) -> None:
        reader = self.reader
        try:
            while True:
                head = await reader.readexactly(frames.HEADER_SIZE)
                total, _, status, reqid = frames.parse_header(head, _NO_LIMIT)
                buf = bytearray(head)
                if total > frames.HEADER_SIZE:
                    buf += await reader.readexactly(total - frames.HEADER_SIZE)
                if reqid == 0:
                    if status != Status.OK:
                        self._fail(_error_for(status, buf))  # a connection-level refusal
                        return
                    if buf[frames.KIND_OFFSET] == Kind.CREDIT:
                        pool, n = frames.parse_credit(buf)
                        credit = self.credits.get(pool)
                        if credit is not None:
                            credit.gate.granted(n)  # wakes the amaps awaiting it
                    continue
                slot = self.pending.pop(reqid, None)
                if slot is not None:  # None: a call its caller withdrew; its reply is dropped
                    slot.resolve(status, buf)
        except (asyncio.IncompleteReadError, OSError, frames.FrameError) as exc:
            self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} lost ({exc or 'closed by the daemon'})"))
        except asyncio.CancelledError:
            self._fail(errors.DaemonUnavailable("session closed"))
            raise

    def _fail(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = exc
        pending, self.pending = self.pending, {}
        for slot in pending.values():
            if not slot.done:
                slot.resolve(Status.INTERNAL, None, self.broken)
        for credit in self.credits.values():
            credit.wake()  # an amap awaiting a grant finds the connection broken
        self.writer.close()

    # -- flow control (daemon/client/credit.py) ------------------------------------

    async def open_credit(self, pool: str) -> _Credit | None:
        """This connection's credit on ``pool``, open (credit granted); None if the daemon grants
        no credit. Each open is matched by one ``close_credit``; a task cancelled while the open is
        on its way closes it itself."""
        self._check()  # (the one reason ``send`` raises: no gate is left "opening" for good)
        credit = self.credits.get(pool)
        if credit is None:
            credit = self.credits[pool] = _Credit(pool)
        gate = credit.gate
        while True:
            if gate.state == "unsupported":
                return None
            gate.users += 1
            if gate.state == "open":
                return credit
            if gate.state != "opening":  # closed, or closing: a new open, answered after the close
                gate.state = "opening"
                credit.ready = asyncio.Event()
                self._credit_request(credit, 1)
            ready = credit.ready
            try:
                await ready.wait()
            except BaseException:
                self.close_credit(credit)
                raise
            if self.broken is not None:
                gate.users -= 1
                self._check()
            if gate.state == "open":
                return credit
            gate.users -= 1  # refused (unsupported), or closed meanwhile by a stale answer: look again

    def close_credit(self, credit: _Credit) -> None:
        """An amap is done with ``credit``; the last one gives the unspent credit back (CREDIT 0,
        not awaited: the daemon frees it when it reads the request, and drops the account anyway
        when the connection closes)."""
        gate = credit.gate
        gate.users -= 1
        if gate.users or gate.state not in ("open", "opening"):
            return
        gate.closing()  # grants from now on are void; an open on its way is stale (see _Credit)
        if self.broken is None:
            self._credit_request(credit, 0)
        else:
            gate.state = "closed"

    def _credit_request(self, credit: _Credit, want: int) -> None:
        gate, ready = credit.gate, credit.ready

        def answered(slot: _Pending) -> None:
            # on the reader task, before the frames after it: a grant sent right after the open finds the gate open
            if slot.rid == credit.latest:  # else a newer CREDIT request decides the state (see _Credit)
                if slot.error is not None:
                    gate.state = "closed"
                elif not want:
                    gate.state = "closed"
                elif slot.status == Status.OK and slot.frame is not None:
                    gate.opened(frames.CREDIT_COUNT.unpack_from(slot.frame, frames.HEADER_SIZE)[0])
                else:  # a daemon without flow control (or no such pool: the calls will say so)
                    gate.state = "unsupported"
            if want:
                ready.set()

        (slot,) = self.send([(Kind.CREDIT, [frames.pack_name(gate.pool), frames.CREDIT_COUNT.pack(want)])], answered)
        credit.latest = slot.rid

    async def granted(self, credit: _Credit) -> None:
        """Return once ``credit`` has credit again (at once if it has): the daemon's next grant."""
        if not credit.gate.on_grant(credit.wake):
            return
        woken: asyncio.Future[None] = self.loop.create_future()
        credit.waiters.append(woken)
        await woken
        self._check()

    def _check(self) -> None:
        """Raise why the connection is broken, if it is."""
        if self.broken is not None:
            raise self.broken

    def close(self) -> None:
        """Close from any thread; calls still waiting fail with DaemonUnavailable."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.reading.cancel)
        except RuntimeError:
            pass  # the loop closed meanwhile


async def connection(session: Session) -> AsyncConnection:
    """The session's connection for the running event loop, opened on first use."""
    loop = asyncio.get_running_loop()
    conn = session._aconns.get(loop)
    if conn is None or conn.broken is not None:
        conn = await AsyncConnection.open(session.path)
        session._aconns[loop] = conn
    return conn


async def _oldest(session: Session, conn: AsyncConnection, shipped: _Shipped, inflight: deque[tuple[tuple[Any, ...], _Pending]]) -> Any:
    """The value of ``amap``'s oldest call (or its exception raised): registers again after
    UNKNOWN_FUNCTION, as the synchronous ``map`` does (the retry spends no credit, as there). The
    call stays at ``inflight[0]`` meanwhile (a resubmission replaces its slot), so a consumer that
    stops withdraws it with the others."""
    args, slot = inflight[0]
    retried = False
    while True:
        await conn.wait(slot, withdraw=False)
        final, value = session._outcome(conn, shipped, slot, retried)
        if final:
            if isinstance(value, _Value):
                return value.value
            raise value
        retried = True
        (slot,) = session._send_calls(conn, shipped, [(args, {})], retried)
        inflight[0] = (args, slot)


async def call(session: Session, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Session.acall``: one call; a QueueFull is raised, as by ``Session.call``."""
    shipped = session._ship(fn)
    conn = await connection(session)
    retried = False
    while True:
        (slot,) = session._send_calls(conn, shipped, [(args, kwargs)], retried)
        await conn.wait(slot)
        final, value = session._outcome(conn, shipped, slot, retried)
        if final:
            if isinstance(value, _Value):
                return value.value
            raise value
        retried = True


async def amap(session: Session, fn: Callable[..., T], iterables: tuple[Iterable[Any], ...], window: int = DEFAULT_WINDOW) -> AsyncIterator[T]:
    """``Session.amap``: ``Session.map`` for ``async for``: up to ``window`` calls in flight, as
    many as the daemon's credit allows (see "Flow control" above), results in order."""
    shipped = session._ship(fn)
    conn = await connection(session)
    credit = await conn.open_credit(session.pool)  # None: a daemon without flow control
    gate = None if credit is None else credit.gate
    inflight: deque[tuple[tuple[Any, ...], _Pending]] = deque()
    window = max(1, window)
    low = window // 2
    items = zip(*iterables, strict=False)  # as map() does: stop at the shortest
    exhausted = False
    ahead: list[tuple[Any, ...]] = []  # an item looked at before waiting for credit (see below)

    def refill() -> None:
        # a batch of what the window (and the credit) has room for, in one write
        nonlocal exhausted
        room = window - len(inflight)
        if gate is not None and room > 0:
            room = gate.take(room)
        if room <= 0:
            return
        if ahead:
            batch = ahead + list(itertools.islice(items, room - 1))
            ahead.clear()
        else:
            batch = list(itertools.islice(items, room))
        if len(batch) < room:
            exhausted = True
            if gate is not None:
                gate.give_back(room - len(batch))  # the items ran out first
        if batch:
            inflight.extend(zip(batch, session._send_calls(conn, shipped, [(args, {}) for args in batch], credited=gate is not None), strict=True))

    try:
        refill()
        while inflight or not exhausted:
            if not inflight:
                # nothing in flight, no credit (the queue is full of other callers' calls): await the
                # daemon's next grant, if items are left (the last refill may have taken exactly the
                # last ones: no grant need come, as the pool may be idle with our share held by our
                # other connections). Without credit a refill always sends or exhausts.
                assert credit is not None
                if not ahead:
                    ahead.extend(itertools.islice(items, 1))
                    if not ahead:
                        break
                await conn.granted(credit)
                refill()
                continue
            value = await _oldest(session, conn, shipped, inflight)
            inflight.popleft()
            yield value
            if len(inflight) <= low:
                refill()
    finally:
        # the consumer stopped early (break, an exception, a cancelled task): withdraw the rest,
        # newest first (see _Connection.abandon), then give the credit back
        conn.abandon(*(slot for _, slot in reversed(inflight)))
        if credit is not None:
            conn.close_credit(credit)
