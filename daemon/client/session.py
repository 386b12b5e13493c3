"""The Python client: ``session``, ``function``, ``call``/``submit``/``map``.

In the style of PyKX's ``kx.remote``::

    s = cruised.session()                # or session(socket=..., pool=..., libraries=..., timeout=...)
    s.add_library('numpy')               # checked in a worker at once
    @cruised.function(s)
    def f(x, y=1): return numpy.add(x, y)
    f(10, y=20)                          # 30, computed in a warm worker

Threading model
    One socket per session, shared by every thread. Senders serialise on a
    lock; replies are matched to requests by id, so calls from many threads
    (and ``map``) pipeline on the one connection. There is no reader thread
    on the synchronous path: a thread waiting for its reply reads the socket
    itself and hands other threads' replies to their futures (leader /
    follower), which saves two thread switches per call. A background reader
    runs only while futures from ``submit`` are outstanding, since nobody else
    is guaranteed to read for them.

Flow control
    ``map`` (and the asyncio ``amap``, daemon/client/aio.py) sends only calls
    it has credit for (daemon/client/credit.py): the daemon reserves a place
    in the queue for each, so no call of a ``map`` is refused QueueFull or
    sent twice, and a ``map`` holds at most its caller's share of the queue. ``call`` and ``submit`` use no credit: a call that
    finds the pool (or its caller's share) full is refused at once.

Remote daemons
    ``session(host=, port=, tls=cruised.TLS(...))`` (or ``CRUISED_ADDRESS=tls://h:p``)
    speaks the same frames over mutual TLS 1.3 (daemon/client/tls.py) to a daemon's
    ``remote.listen``; large arguments go inline (no shared files across hosts).
    ``connections=N`` opens N connections: ``call`` and ``submit`` take them in
    turn, and ``map`` gives each call to the one with the fewest outstanding, so
    behind a load balancer that puts each connection on another daemon (HAProxy
    ``balance leastconn``, deploy/haproxy/cruised.cfg) one session uses every host.
    A call refused as draining (``cruised drain``: it never ran) is resent by
    ``call`` and ``map`` on a new connection for up to ``DRAIN_REROUTE`` seconds;
    the old one closes once the calls it holds are answered.

Cancelling
    A caller that stops waiting (KeyboardInterrupt in ``call``, ``CallFuture.cancel``,
    a ``map`` closed early) withdraws its call: ``_Connection.abandon`` drops its slot
    and sends Kind.CANCEL, and the daemon interrupts or dequeues it. The call's reply
    still comes and, finding no slot, is dropped, so the connection stays in step.
    Readers wait in ``poll`` so that Ctrl-C there consumes nothing; an interrupt that
    lands mid-read or mid-send fails the connection instead (``_interrupted``).
    The asyncio client (daemon/client/aio.py) does the same for cancelled tasks.

Registration
    A function is pickled (shipping.py) once per session and sent once per connection
    (REGISTER, pipelined in front of its first CALL). Later calls carry only
    the 16-byte content key and the arguments. If the daemon no longer knows
    the key (it restarted), the call is answered UNKNOWN_FUNCTION without
    running, and the client registers again and retries once.
"""

from __future__ import annotations

import functools
import itertools
import json
import pickle
import select
import socket
import ssl
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from cruised.client import errors, paths, shipping, tls
from cruised.client.credit import CreditGate
from cruised.client.tls import TLS
from cruised.pool.wire import bundle, frames, sharedfile, sockopt
from cruised.pool.wire.framebuf import FrameBuffer
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    import asyncio

    from cruised.client.aio import AsyncConnection

T = TypeVar("T")

RECV_SIZE = 256 << 10
#: a connection idle this long is checked for a daemon hang-up before reuse
IDLE_CHECK_AFTER = 0.25
#: requests up to this size are joined into one buffer before sending; larger ones go out as a scatter list
SMALL_SEND = 64 << 10
CONNECT_TIMEOUT = 5.0
#: longest wait for the send lock to send a CANCEL (see _Connection.abandon)
CANCEL_SEND_WAIT = 1.0
#: taking a slot's shared file is one step for whichever thread gets there first: a cancelled
#: future's slot may be released by the reader and by the canceller at once (taken only for
#: calls that have a file)
_FILE_LOCK = threading.Lock()
#: calls ``map`` keeps in flight at most (its credit may allow fewer)
DEFAULT_WINDOW = 16
#: a remote session resends a call its daemon refused as draining (it never ran) on a new
#: connection, which a load balancer puts on another daemon, for up to this long
DRAIN_REROUTE = 15.0


def _start_hint(path: str) -> str:
    return f"start one with `cruised serve --config config.yaml`, or point the client at a running one with socket=... or CRUISED_SOCKET (tried {path})"


class _Pending:
    """One outstanding request: filled by whichever thread reads its reply."""

    __slots__ = ("callback", "done", "error", "frame", "rid", "shared", "status")

    def __init__(self, rid: int = 0) -> None:
        #: its request id on its connection (what a CANCEL names)
        self.rid = rid
        self.status = 0
        self.frame: bytearray | None = None
        self.error: BaseException | None = None
        self.done = False
        self.callback: Callable[[_Pending], None] | None = None
        #: the call's shared file (pool/wire/sharedfile.py): its large arguments, then its result's
        self.shared: sharedfile.Mapped | None = None

    def take_shared(self) -> sharedfile.Mapped | None:
        """Its shared file, once: the slot no longer has it (under _FILE_LOCK)."""
        shared, self.shared = self.shared, None
        return shared

    def resolve(self, status: int, frame: bytearray | None, error: BaseException | None = None) -> None:
        self.status, self.frame, self.error = status, frame, error
        self.done = True
        if self.callback is not None:
            self.callback(self)


class _CallConnection(Protocol):
    """What ``Session._send_calls`` and ``Session._outcome`` need of a connection: the
    synchronous ``_Connection``, or the asyncio one (daemon/client/aio.py)."""

    registered: dict[tuple[str, bytes], _Pending]

    def send(
        self, requests: list[tuple[int, list[Any]]], callback: Callable[[_Pending], None] | None = None, result_file: bool = False, credited: bool = False
    ) -> list[_Pending]: ...

    def release(self, slot: _Pending) -> None: ...


class _Connection:
    def __init__(self, path: str, remote: paths.RemoteAddress | None = None) -> None:
        """A connection to the daemon's Unix socket at ``path``, or over mutual TLS to ``remote``
        (``path`` is then its ``tls://host:port`` text, for messages)."""
        self.path = path
        self.sock: Any
        if remote is not None:
            self.sock = _connect_tls(remote)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(CONNECT_TIMEOUT)
            try:
                sock.connect(path)
            except OSError as exc:
                sock.close()
                reason = exc.strerror or str(exc)
                raise errors.DaemonUnavailable(f"no cruised daemon answers at {path} ({reason}); {_start_hint(path)}") from None
            sock.settimeout(None)
            sockopt.size_buffers(sock)
            self.sock = sock
        self.send_lock = threading.Lock()
        #: held by the thread currently reading the socket (leader/follower)
        self.read_lock = threading.Lock()
        self.cond = threading.Condition()
        self.waiters = 0
        self.pending: dict[int, _Pending] = {}
        self.broken: BaseException | None = None
        self.ids = itertools.count(1)
        self.registered: dict[tuple[str, bytes], _Pending] = {}
        #: its daemon is draining: the session sends new calls elsewhere, and this one closes
        #: once the calls it still holds are answered (Session._reroute)
        self.retiring = False
        self.async_outstanding = 0
        self.bg: threading.Thread | None = None
        #: replies received and not yet delivered (no size limit: the daemon's are trusted)
        self.incoming = FrameBuffer(RECV_SIZE, 1 << 62)
        #: the reader waits for replies here, then reads (see _read_batch)
        self.readable = select.poll()
        self.readable.register(self.sock, select.POLLIN)
        #: a TLS socket may hold decrypted bytes that poll() cannot see: read those first
        self.tls = remote is not None
        self.last_used = time.monotonic()
        self.files = sharedfile.FilePool()
        #: whether this connection passes shared files: None until the first call with large
        #: buffers asks the daemon (PASS_FDS), "asking" until it answers, then True or False.
        #: Never over TCP: a descriptor cannot cross hosts, large arguments go inline
        self.pass_fds: bool | str | None = False if remote is not None else None
        #: the daemon announced FILE_PICKLE: large pickle streams may travel in shared files
        self.file_pickle = False
        self._pass_fds_lock = threading.Lock()
        #: flow control (credit) per pool, for the maps running on this connection
        self.gates: dict[str, CreditGate] = {}
        #: held while a gate is opened or closed (a round trip each), so maps open and close one at a time
        self._credit_lock = threading.Lock()

    def stale(self) -> bool:
        """True if the daemon hung up while we were idle (e.g. it restarted).

        Only checked on a connection idle for a while with nothing in flight,
        so a reconnect there can never lose or repeat a request.
        """
        if self.broken is not None:
            return True
        if self.pending or time.monotonic() - self.last_used < IDLE_CHECK_AFTER:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            if self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} was closed by the daemon"))
                return True
        except BlockingIOError:
            return False
        except OSError:
            self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} lost"))
            return True
        return False

    # -- sending -----------------------------------------------------------------

    def send(
        self,
        requests: list[tuple[int, list[Any]]],
        callback: Callable[[_Pending], None] | None = None,
        result_file: bool = False,
        credited: bool = False,
    ) -> list[_Pending]:
        """Register a pending slot per (kind, payload parts) request and send them all in one sendmsg.

        A CALL whose arguments are large (out-of-band buffers, or a pickle
        stream) puts them in a shared file (pool/wire/sharedfile.py) passed with the
        frame; with ``result_file`` every CALL gets a file, for a result
        expected to be large. ``callback`` is attached to the last slot before
        anything is sent, so it can never miss a reply that another thread
        reads first. ``credited``: each CALL spends a credit (the caller took them from its gate).
        """
        if self.broken is not None:
            raise self.broken
        slots: list[_Pending] = []
        out: list[Any] = []
        fds: list[int] = []
        #: (out, fds) per sendmsg: one can pass at most SCM_MAX_FD descriptors
        batches: list[tuple[list[Any], list[int]]] = [(out, fds)]
        pending = self.pending
        for kind, parts in requests:
            rid = next(self.ids)
            slot = _Pending(rid)
            status = frames.CREDITED if credited and kind == Kind.CALL else 0
            # parts: the call head, then the args bundle (index, pickle, then out-of-band buffers);
            # the cheap tests first: a small call passes them all in a few nanoseconds
            if (
                kind == Kind.CALL
                and (result_file or len(parts) > 3 or len(parts[2]) >= sharedfile.SHARE_MIN)
                and (result_file or bundle.shareable(parts[1:], with_pickle=True))
                and self._may_pass_fds()
            ):
                shared = self.files.take()
                bundled = parts[1:]
                shared_parts = bundle.share(bundled, shared, grow=sharedfile.FilePool.GROW, with_pickle=self.file_pickle)
                if shared_parts is not bundled or result_file:
                    parts = [parts[0], *shared_parts]
                    slot.shared = shared
                    status |= frames.CARRIES_FD | (frames.PICKLE_IN_FILE if self.file_pickle else 0)
                    if len(fds) == sharedfile.SCM_MAX_FD:
                        out, fds = [], []
                        batches.append((out, fds))
                    fds.append(shared.fd)
                else:
                    self.files.give(shared)
            pending[rid] = slot
            slots.append(slot)
            out.append(frames.header(kind, rid, bundle.packed_size(parts), status))
            out.extend(parts)
        slot.callback = callback
        self.last_used = time.monotonic()
        try:
            with self.send_lock:
                for batch_out, batch_fds in batches:
                    _sendall(self.sock, batch_out, batch_fds)
        except OSError as exc:
            raise self._lost_while_sending(exc) from None
        except BaseException:  # noqa: BLE001 - re-raised: KeyboardInterrupt mid-send leaves the stream unusable
            raise self._interrupted("sending") from None
        return slots

    def send_small(self, head: bytes, index: bytes, data: bytes, callback: Callable[[_Pending], None] | None = None) -> _Pending:
        """``send`` for the commonest request: one CALL whose bundle (``index``, ``data``) is
        small and has no out-of-band buffers, with no file for its result. The frame is one
        joined buffer and one ``send``: what ``send`` would write, for fewer steps."""
        if self.broken is not None:
            raise self.broken
        rid = next(self.ids)
        slot = _Pending(rid)
        slot.callback = callback
        self.pending[rid] = slot
        frame = b"".join((frames.header(Kind.CALL, rid, len(head) + len(index) + len(data)), head, index, data))
        self.last_used = time.monotonic()
        try:
            with self.send_lock:
                self.sock.sendall(frame)
        except OSError as exc:
            raise self._lost_while_sending(exc) from None
        except BaseException:  # noqa: BLE001 - re-raised: KeyboardInterrupt mid-send leaves the stream unusable
            raise self._interrupted("sending") from None
        return slot

    def _interrupted(self, doing: str) -> BaseException:
        """A KeyboardInterrupt (or another BaseException) came while ``doing`` I/O on the socket:
        part of a frame may be sent, or read and not yet accounted for, so the stream cannot be
        trusted. The connection is failed (the session opens a new one for its next call; the
        daemon sees it leave: its calls are cancelled, ``on_disconnect``); the exception to
        re-raise is the one being handled."""
        self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} was interrupted while {doing}"))
        exc = sys.exc_info()[1]
        assert exc is not None
        return exc

    def abandon(self, *slots: _Pending) -> None:
        """The caller stopped waiting for these calls (Ctrl-C, a cancelled future, a closed
        ``map``): withdraw them (Kind.CANCEL) unless they are answered already. Their replies,
        which still come, find no slot and are dropped, so the next call on this connection
        never sees them.

        The CANCELs go in one send, in the order given: the daemon reads them together, so a
        ``map`` that withdraws its newest calls first (queued, held) and its running one last
        has them all out of the way before the interrupted worker could start one of them.
        """
        out: list[bytes] = []
        for slot in slots:
            if self.pending.pop(slot.rid, None) is None:
                # answered already (its reply was read), or the connection failed: nothing to withdraw
                if slot.done:
                    self.release(slot)
                continue
            with _FILE_LOCK:
                shared = slot.take_shared()
            if shared is not None:
                shared.close()  # a worker may still be reading or writing it: never reused
            out.append(frames.frame(Kind.CANCEL, slot.rid))
        if not out or self.broken is not None:
            return
        # Bounded: a map generator dropped in a reference cycle is finalized by the collector,
        # which may run on a thread that holds the send lock (mid-send). That thread cannot be
        # waited for; the calls then run on, and their replies are dropped all the same.
        if not self.send_lock.acquire(timeout=CANCEL_SEND_WAIT):
            return
        try:
            self.sock.sendall(b"".join(out))
        except OSError:
            pass  # the connection is gone: the daemon cancels its calls (on_disconnect)
        finally:
            self.send_lock.release()

    def _lost_while_sending(self, exc: OSError) -> BaseException:
        """Fail the connection (every waiting call gets the error); the error to raise."""
        self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} lost while sending: {exc}"))
        return self.broken or exc

    def _may_pass_fds(self) -> bool:
        """Whether CALLs may carry shared files now.

        A descriptor sent before the daemon reads this connection with recvmsg is lost,
        so the first call with large buffers asks (PASS_FDS) and goes inline; calls
        after the answer carry files. Never waits: this may run on the thread that
        reads replies (a future's callback submitting again), which would deadlock.
        """
        if self.pass_fds is None:
            with self._pass_fds_lock:
                if self.pass_fds is not None:
                    return self.pass_fds is True  # type: ignore[unreachable]  # mypy keeps the narrowing above; another thread may have set it
                self.pass_fds = "asking"

            def answered(slot: _Pending) -> None:
                # a daemon that does not know PASS_FDS refuses it: this connection stays inline
                ok = slot.error is None and slot.status == Status.OK
                if ok and slot.frame is not None and len(slot.frame) >= frames.HEADER_SIZE + frames.FEATURES.size:
                    self.file_pickle = bool(frames.FEATURES.unpack_from(slot.frame, frames.HEADER_SIZE)[0] & frames.FILE_PICKLE)
                self.pass_fds = ok

            self.send([(Kind.PASS_FDS, [])], answered)
        return self.pass_fds is True

    # -- receiving ---------------------------------------------------------------

    def wait(self, slot: _Pending) -> _Pending:
        """Block until ``slot`` is resolved, reading the socket ourselves when nobody else is."""
        while not slot.done:
            if self.read_lock.acquire(blocking=False):
                try:
                    if not slot.done:
                        self._read_batch()
                finally:
                    self._hand_over_reading()
            else:
                with self.cond:
                    self.waiters += 1
                    try:
                        while not slot.done and self.read_lock.locked():
                            self.cond.wait(0.5)
                    finally:
                        self.waiters -= 1
        return slot

    def _background(self) -> None:
        while True:
            with self.cond:
                if not self.async_outstanding or self.broken is not None:
                    self.bg = None
                    return
            if self.read_lock.acquire(timeout=0.05):
                try:
                    if self.async_outstanding and self.broken is None:
                        self._read_batch()
                finally:
                    self._hand_over_reading()

    def _hand_over_reading(self) -> None:
        """Release the reader's lock and wake the threads waiting for it: one of them reads next."""
        self.read_lock.release()
        if self.waiters:
            with self.cond:
                self.cond.notify_all()

    def track_async(self) -> Callable[[], None]:
        """Count one future handed to the user; returns the callback that uncounts it."""
        with self.cond:
            self.async_outstanding += 1
            if self.bg is None:
                self.bg = threading.Thread(target=self._background, name="cruised-reader", daemon=True)
                self.bg.start()

        def done() -> None:
            with self.cond:
                self.async_outstanding -= 1

        return done

    def _read_batch(self) -> None:
        """One ``recv`` and every reply it completes; a large reply is read to its end here.

        The reader waits in ``poll``, not in ``recv``: a KeyboardInterrupt there (Ctrl-C while
        a call runs, the usual case) has consumed nothing, so the connection stays usable. One
        anywhere after it may have taken bytes off the socket that were not yet delivered: the
        connection is failed then (``_interrupted``) rather than left out of step.
        """
        if self.broken is not None:
            raise self.broken
        if not (self.tls and self.sock.pending()):
            self.readable.poll()
        fb = self.incoming
        try:
            err: OSError | None = None
            try:
                n = self.sock.recv_into(fb.space())
            except OSError as exc:
                n, err = 0, exc
            if n == 0:
                why = tls.describe_tls_error(err) if isinstance(err, ssl.SSLError) else (err or "closed by the daemon")
                self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} lost ({why})"))
                return
            while True:
                frame = fb.next(n)
                n = 0
                if frame is None:
                    if fb.big is None:
                        return
                    # a reply with a buffer of its own (FrameBuffer): the rest of it is on its way, so it
                    # is read now, with this thread's read lock held, straight into that buffer
                    try:
                        n = self.sock.recv_into(fb.space())
                    except OSError as exc:
                        n, err = 0, exc
                    if n == 0:  # the daemon went away mid-reply: the stream is lost, as at any EOF
                        why = tls.describe_tls_error(err) if isinstance(err, ssl.SSLError) else (err or "closed by the daemon")
                        self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} lost in the middle of a reply ({why})"))
                        return
                    continue
                header = fb.header
                self._deliver(frame, header[3], header[4])
        except Exception:
            raise
        except BaseException:  # noqa: BLE001 - re-raised: KeyboardInterrupt mid-read leaves the stream unusable
            raise self._interrupted("reading a reply") from None

    def _deliver(self, frame: bytearray, status: int, reqid: int) -> None:
        if reqid == 0:
            self._unsolicited(frame, status)
            return
        slot = self.pending.pop(reqid, None)
        if slot is not None:
            slot.resolve(status, frame)
            if self.retiring and not self.pending:
                self._fail(errors.DaemonUnavailable(f"connection to cruised at {self.path} closed: its daemon is draining"))

    def _unsolicited(self, frame: bytearray, status: int) -> None:
        """A frame that answers no request: a credit grant, or a connection-level refusal."""
        if status != Status.OK:
            # a connection-level refusal (access, limits, a frame the daemon could not parse)
            self._fail(_error_for(status, frame))
        elif frame[frames.KIND_OFFSET] == Kind.CREDIT:
            pool, n = frames.parse_credit(frame)
            gate = self.gates.get(pool)
            if gate is not None:
                gate.granted(n)

    # -- flow control (daemon/client/credit.py) ------------------------------------

    def open_credit(self, pool: str) -> CreditGate | None:
        """This connection's gate on ``pool``, open (credit granted); None if the daemon grants no credit."""
        with self._credit_lock:
            gate = self.gates.setdefault(pool, CreditGate(pool))
            if gate.state == "unsupported":
                return None
            gate.users += 1
            if gate.state == "open":
                return gate

            def answered(slot: _Pending) -> None:
                # on the thread that delivers the answer, before the frames after it: a grant
                # the daemon sends right after opening finds the gate open
                if slot.error is None and slot.status == Status.OK and slot.frame is not None:
                    gate.opened(frames.CREDIT_COUNT.unpack_from(slot.frame, frames.HEADER_SIZE)[0])

            try:
                status, _ = self._credit_request(pool, 1, answered)
            except BaseException:
                gate.users -= 1
                raise
            if status != Status.OK:  # a daemon without flow control (or no such pool: the calls will say so)
                gate.users -= 1
                gate.state = "unsupported"
                return None
            return gate

    def close_credit(self, gate: CreditGate) -> None:
        """A map is done with ``gate``; the last one gives its unspent credit back to the pool."""
        with self._credit_lock:
            gate.users -= 1
            if gate.users or gate.state != "open":
                return
            gate.closing()
            try:
                if self.broken is None:
                    self._credit_request(gate.pool, 0)
            except (errors.CruisedError, OSError):
                pass  # the connection is gone: so is its credit, daemon-side
            finally:
                gate.state = "closed"

    def _credit_request(self, pool: str, want: int, callback: Callable[[_Pending], None] | None = None) -> tuple[int, bytearray]:
        (slot,) = self.send([(Kind.CREDIT, [frames.pack_name(pool), frames.CREDIT_COUNT.pack(want)])], callback)
        self.wait(slot)
        if slot.error is not None:
            raise slot.error
        assert slot.frame is not None
        return slot.status, slot.frame

    def _fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.broken is None:
                self.broken = exc
            pending, self.pending = self.pending, {}
        for slot in pending.values():
            if not slot.done:
                slot.resolve(Status.INTERNAL, None, self.broken)
        try:
            # close() alone neither wakes a thread blocked in recv() on this socket nor
            # tells the daemon we left (the blocked call keeps the file open); shutdown does both
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def close(self) -> None:
        self._fail(errors.DaemonUnavailable("session closed"))
        self.files.close()

    def release(self, slot: _Pending) -> None:
        """The call is over: its shared file goes back to the pool if no worker can touch it any
        more, else it is closed (pool/wire/sharedfile.py says why)."""
        if slot.shared is None:
            return
        with _FILE_LOCK:  # a cancelled future's slot may be released by two threads at once
            shared = slot.take_shared()
        if shared is None:
            return
        if slot.error is None and slot.status in _FILE_DONE:
            self.files.give(shared)
        else:
            shared.close()


#: answers after which no worker touches the call's shared file again: the worker's own replies
#: (it wrote the result before replying), and refusals of calls that never started (QueueFull,
#: QueueTimeout: a held call's worker answers NOT_RUN without reading it). Not ExecutionTimeout:
#: the killed worker may have been copying at that moment.
_FILE_DONE = frozenset(
    {
        Status.OK,
        Status.ERROR,
        Status.Q_UNAVAILABLE,
        Status.UNKNOWN_FUNCTION,
        Status.QUEUE_FULL,
        Status.QUEUE_TIMEOUT,
        Status.SHUTTING_DOWN,
        Status.DRAINING,
        Status.NO_SUCH_POOL,
        Status.BAD_REQUEST,
        Status.VERSION_MISMATCH,
    }
)


def _connect_tls(remote: paths.RemoteAddress) -> tls.TlsSocket:
    where = f"tls://{remote.host}:{remote.port}"
    if remote.tls is None:
        raise ValueError(
            f"{where}: the remote door is mutual TLS only: pass tls=cruised.TLS(cert_file=..., key_file=..., ca_file=...) (or CRUISED_TLS_CERT/KEY/CA)"
        )
    try:
        return tls.connect(remote.host, remote.port, remote.tls, CONNECT_TIMEOUT)
    except ssl.SSLError as exc:
        raise errors.DaemonUnavailable(f"TLS handshake with cruised at {where} failed: {tls.describe_tls_error(exc)}") from None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError) and str(exc).startswith("cruised.TLS"):
            raise
        raise errors.DaemonUnavailable(f"no cruised daemon answers at {where} ({exc.strerror or exc})") from None


def _sendall(sock: socket.socket, parts: list[Any], fds: list[int] | None = None) -> None:
    sent = 0
    if fds:
        # the descriptors (at most SCM_MAX_FD) go with the first bytes, so each arrives before the
        # frame that claims it; once sendmsg returns they are in flight, and the rest goes as usual
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        _send_rest(sock, views, sock.sendmsg(views[:512], sharedfile.rights(fds)))
        return
    if len(parts) <= 512:
        total = 0
        for p in parts:
            total += p.nbytes if isinstance(p, memoryview) else len(p)
        if total <= SMALL_SEND:
            sock.sendall(b"".join(parts))  # small: one copy is cheaper than a scatter list
            return
        sent = sock.sendmsg(parts)  # the common case: everything in one call
        if sent == total:
            return
    _send_rest(sock, [memoryview(p).cast("B") for p in parts if len(p)], sent)


def _send_rest(sock: socket.socket, views: list[memoryview], sent: int) -> None:
    """Send ``views`` after the first ``sent`` bytes of them."""
    while True:
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if not views:
            return
        if sent:
            views[0] = views[0][sent:]
        sent = sock.sendmsg(views[:512])


def _message(frame: bytearray) -> str:
    raw = bytes(frame[frames.HEADER_SIZE :])
    try:
        return str(json.loads(raw).get("message", raw.decode(errors="replace")))
    except (ValueError, AttributeError):
        return raw.decode(errors="replace")


def _error_for(status: int, frame: bytearray) -> BaseException:
    if status == Status.ERROR:
        return _remote_exception(frame)
    cls = errors.BY_STATUS.get(status, errors.CruisedError)
    return cls(_message(frame))


def _remote_exception(frame: bytearray) -> BaseException:
    info_raw, pickled = frames.parse_error(frame)
    info = json.loads(info_raw)
    exc: BaseException | None = None
    if pickled.nbytes:
        try:
            exc = pickle.loads(pickled)
        except Exception:  # noqa: BLE001 - a class this process lacks, an odd __init__...: RemoteError below
            exc = None
    if not isinstance(exc, BaseException):
        exc = errors.RemoteError(f"{info['type']}: {info['message']}", info["type"], info["traceback"])
    exc.__cause__ = errors.RemoteTraceback(info["traceback"])
    return exc


def decode_result(status: int, frame: bytearray) -> Any:
    if status == Status.OK:
        return bundle.unpack(frame, frames.HEADER_SIZE)
    raise _error_for(status, frame)


class _Shipped:
    __slots__ = ("big_results", "blob", "captured", "heads", "key", "name")

    def __init__(self, key: bytes, blob: bytes, name: str, captured: list[shipping.Capture]) -> None:
        self.key, self.blob, self.name, self.captured = key, blob, name, captured
        #: CALL heads already built, by (pool, timeout_ms): the same bytes every call
        self.heads: dict[tuple[str, int], bytes] = {}
        #: its last result was large: its calls take a shared file for the next one (a query
        #: returning a table), so that result does not pass through the daemon
        self.big_results = False

    def saw_result(self, frame: bytearray, shared: sharedfile.Mapped | None) -> None:
        """Learn from an OK reply whether this function's results are large (``big_results``)."""
        self.big_results = len(frame) >= sharedfile.SHARE_MIN or (shared is not None and bundle.in_file(frame, frames.HEADER_SIZE))

    def call_head(self, pool: str, timeout_ms: int) -> bytes:
        head = self.heads.get((pool, timeout_ms))
        if head is None:
            if len(self.heads) > 64:  # a caller cycling through timeouts: keep it bounded
                self.heads.clear()
            head = self.heads[(pool, timeout_ms)] = frames.call_head(pool, timeout_ms, self.key)
        return head


class Session:
    """A connection to a cruised pool, in the style of ``pykx.remote.session``.

    ``Session(...)`` and ``session()`` connect lazily; ``session(socket=...)``,
    and ``session(...).create(socket=...)`` (the PyKX 2.x two-step form),
    connect at once and report a missing daemon immediately.
    """

    def __init__(
        self,
        socket: str | None = None,
        pool: str = "default",
        libraries: dict[str, str] | None = None,
        timeout: float | None = None,
        host: str | None = None,
        port: int | None = None,
        tls: TLS | None = None,
        connections: int = 1,
    ) -> None:
        if libraries is not None and not isinstance(libraries, dict):
            raise TypeError("libraries must be a dict of alias -> module name, e.g. {'np': 'numpy'}")
        if not isinstance(connections, int) or connections < 1:
            raise ValueError(f"connections must be a positive integer, got {connections!r}")
        self.socket_path = socket
        #: a remote daemon (its mutual-TLS door), or None for a Unix socket
        self.remote: paths.RemoteAddress | None = None
        if host is not None or port is not None:
            if socket is not None:
                raise ValueError("give socket= (a local daemon) or host=/port= (a remote one), not both")
            if host is None or port is None:
                raise ValueError("a remote daemon needs both host= and port= (its remote.listen)")
            if tls is None:
                raise ValueError("the remote door is mutual TLS only: pass tls=cruised.TLS(cert_file=..., key_file=..., ca_file=...)")
            self.remote = paths.RemoteAddress(host, int(port), tls)
        elif tls is not None:
            raise ValueError("tls= goes with host= and port= (a remote daemon)")
        self.pool = pool
        self.timeout = timeout
        self._libraries: dict[str, str] = dict(libraries or {})
        self._lock = threading.Lock()
        self._conn: _Connection | None = None
        #: ``connections`` > 1: the further connections (opened when first used) that ``map``, ``call``
        #: and ``submit`` spread over; through a load balancer each may land on another daemon
        self.connections = connections
        self._extra: list[_Connection | None] = [None] * (connections - 1)
        self._turn = itertools.count()
        #: connections left because their daemon is draining, until their last reply (Session._reroute)
        self._retired: list[_Connection] = []
        #: the asyncio connection per event loop (daemon/client/aio.py), opened by the first ``acall``/``amap`` there
        self._aconns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnection] = weakref.WeakKeyDictionary()
        self._shipped: weakref.WeakKeyDictionary[Any, _Shipped] = weakref.WeakKeyDictionary()
        self._libs_checked = not self._libraries

    # -- setup -----------------------------------------------------------------------

    def create(self, socket: str | None = None, pool: str | None = None, libraries: dict[str, str] | None = None, timeout: float | None = None) -> Session:
        with self._lock:
            if socket is not None:
                self.socket_path = socket
                self.remote = None
            if pool is not None:
                self.pool = pool
            if timeout is not None:
                self.timeout = timeout
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            for i, conn in enumerate(self._extra):
                if conn is not None:
                    conn.close()
                    self._extra[i] = None
        if libraries:
            self.libraries(libraries)
        self.ping()
        return self

    @property
    def path(self) -> str:
        """Where this session connects: a Unix socket path, or ``tls://host:port``."""
        target = self._target()
        return str(target) if isinstance(target, paths.RemoteAddress) else target

    def _target(self) -> paths.RemoteAddress | str:
        if self.remote is not None:
            return self.remote
        if self.socket_path:
            return self.socket_path
        return paths.client_address() or paths.client_socket()

    def _open(self) -> _Connection:
        target = self._target()
        if isinstance(target, paths.RemoteAddress):
            return _Connection(str(target), target)
        return _Connection(target)

    def add_library(self, *names: str) -> None:
        """Import these modules (under their own names) for this session's functions; checked now."""
        self.libraries({n.split(".")[0]: n.split(".")[0] for n in names})

    def libraries(self, libraries: dict[str, str]) -> None:
        """Add ``{alias: module}`` imports for this session's functions; checked in a worker now."""
        if not isinstance(libraries, dict):
            raise TypeError("libraries must be a dict of alias -> module name, e.g. {'np': 'numpy'}")
        merged = dict(self._libraries)
        merged.update(libraries)
        self._check_libraries(libraries)
        self._libraries = merged
        self._shipped = weakref.WeakKeyDictionary()  # keys include the libraries

    def _check_libraries(self, libraries: dict[str, str]) -> None:
        for alias in libraries:
            if not str(alias).isidentifier():
                raise ValueError(f"library alias {alias!r} is not a Python identifier")
        payload = frames.pack_name(self.pool) + json.dumps({"libraries": libraries}).encode()
        status, frame = self._request(Kind.CHECK, [payload])
        if status != Status.OK:
            raise _error_for(status, frame)

    # -- connection ---------------------------------------------------------------------

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and not conn.stale():
            return conn
        with self._lock:
            if self._conn is None or self._conn.broken is not None:
                self._conn = self._open()
            return self._conn

    def _connection_at(self, i: int) -> _Connection:
        """Connection ``i`` of ``connections`` (0 is the session's first, the one ``_connection`` returns)."""
        if i == 0:
            return self._connection()
        conn = self._extra[i - 1]
        if conn is not None and not conn.stale():
            return conn
        with self._lock:
            conn = self._extra[i - 1]
            if conn is None or conn.broken is not None:
                conn = self._extra[i - 1] = self._open()
            return conn

    def _reroute(self, conn: _Connection, tries: int) -> _Connection:
        """``conn``'s daemon refused a call as draining: a new connection in its place (through a load
        balancer, to another daemon); ``conn`` closes once the calls it holds are answered. Waits a
        little first, more each time (the balancer may send the new one to the draining daemon
        until its next health check)."""
        with self._lock:
            at = 0
            if self._conn is conn:
                self._conn = None
            for i, c in enumerate(self._extra):
                if c is conn:
                    self._extra[i] = None
                    at = i + 1
            # not closed here: another thread may be sending on it right now. It closes when its last
            # outstanding reply arrives (_Connection._deliver), else with the session
            if not conn.retiring:
                conn.retiring = True
                self._retired = [c for c in self._retired if c.broken is None] + [conn]
        time.sleep(min(0.5, 0.02 * 2**tries))
        return self._connection_at(at)

    def _next_connection(self) -> _Connection:
        """The connection for one call: the first, or with ``connections`` > 1 each in turn."""
        if self.connections == 1:
            return self._connection()
        return self._connection_at(next(self._turn) % self.connections)

    def _request(self, kind: int, parts: list[Any]) -> tuple[int, bytearray]:
        conn = self._connection()
        (slot,) = conn.send([(kind, parts)])
        conn.wait(slot)
        if slot.error is not None:
            raise slot.error
        assert slot.frame is not None
        return slot.status, slot.frame

    def ping(self) -> None:
        status, frame = self._request(Kind.PING, [])
        if status != Status.OK:
            raise _error_for(status, frame)

    def status(self) -> dict[str, Any]:
        status, frame = self._request(Kind.STATUS, [])
        if status != Status.OK:
            raise _error_for(status, frame)
        return dict(json.loads(bytes(frame[frames.HEADER_SIZE :])))  # the daemon's status: a JSON object

    def reload(self) -> tuple[bool, str]:
        """Have the daemon re-read its config and endpoint code (as SIGHUP does): (ok, message) once done."""
        status, frame = self._request(Kind.RELOAD, [])
        try:
            info = json.loads(bytes(frame[frames.HEADER_SIZE :]))
        except ValueError:
            info = None
        if not isinstance(info, dict) or "ok" not in info:
            raise _error_for(status, frame)
        return bool(info["ok"]), str(info.get("message", ""))

    def drain(self, on: bool | None = None, linger: float = 0.0) -> dict[str, Any]:
        """Start (True) or end (False) the daemon's drain, or only ask (None): the DRAIN frame's reply,
        ``{"draining": bool, "state": "serving"|"draining"|"drained", "queued": n, "running": n,
        "accepting": bool}``. ``linger``: with True, the daemon says it is draining (/readyz, the
        HAProxy agent) at once but takes new calls for that many seconds more."""
        request: dict[str, Any] = {} if on is None else {"drain": on}
        if linger:
            request["linger"] = linger
        status, frame = self._request(Kind.DRAIN, [json.dumps(request).encode()])
        if status != Status.OK:
            raise _error_for(status, frame)
        return dict(json.loads(bytes(frame[frames.HEADER_SIZE :])))

    def metrics(self) -> str:
        """The daemon's Prometheus metrics, as text (what ``GET /metrics`` serves)."""
        status, frame = self._request(Kind.METRICS, [])
        if status != Status.OK:
            raise _error_for(status, frame)
        return bytes(frame[frames.HEADER_SIZE :]).decode()

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            for i, conn in enumerate(self._extra):
                if conn is not None:
                    conn.close()
                    self._extra[i] = None
            for conn in self._retired:
                conn.close()
            self._retired = []
            aconns = list(self._aconns.values())
            self._aconns.clear()
        for aconn in aconns:
            aconn.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- calls ----------------------------------------------------------------------------

    def _ship(self, fn: Callable[..., Any]) -> _Shipped:
        fn = getattr(fn, "__cruised_function__", fn)
        try:
            shipped = self._shipped.get(fn)
        except TypeError:  # not weak-referenceable: ship it every time
            shipped = None
        if shipped is None or not shipping.still_current(shipped.captured):
            captured: list[shipping.Capture] = []
            blob = shipping.dump_function(fn, captured)
            shipped = _Shipped(shipping.function_key(blob, self._libraries), blob, getattr(fn, "__qualname__", repr(fn)), captured)
            try:
                self._shipped[fn] = shipped
            except TypeError:
                pass
        return shipped

    def _send_call(
        self,
        conn: _Connection,
        shipped: _Shipped,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        force_register: bool,
        callback: Callable[[_Pending], None] | None = None,
    ) -> _Pending:
        """One call; a registered one (the commonest) is packed and sent here, without the batch
        machinery of ``_send_calls``: with a small bundle and no file, by ``send_small``."""
        if force_register or (self.pool, shipped.key) not in conn.registered:
            return self._send_calls(conn, shipped, [(args, kwargs)], force_register, callback)[0]
        head = shipped.call_head(self.pool, self._timeout_ms())
        parts = bundle.pack((args, kwargs))
        if len(parts) == 2 and len(parts[1]) < sharedfile.SHARE_MIN and not shipped.big_results:
            return conn.send_small(head, parts[0], parts[1], callback)  # type: ignore[arg-type]  # two parts: no out-of-band buffers, so index and data are bytes
        return conn.send([(Kind.CALL, [head, *parts])], callback, shipped.big_results)[0]

    def _timeout_ms(self) -> int:
        return int(self.timeout * 1000) if self.timeout else 0

    def _send_calls(
        self,
        conn: _CallConnection,
        shipped: _Shipped,
        calls: list[tuple[tuple[Any, ...], dict[str, Any]]],
        force_register: bool = False,
        callback: Callable[[_Pending], None] | None = None,
        credited: bool = False,
    ) -> list[_Pending]:
        """Calls of one function, (args, kwargs) each, in one ``sendmsg`` (and its code first when
        this connection has not registered it); their slots, ``callback`` on the last. ``credited``:
        each call spends a credit of the pool's gate (taken by the caller)."""
        timeout_ms = self._timeout_ms()
        reg_key = (self.pool, shipped.key)
        register = force_register or reg_key not in conn.registered
        requests: list[tuple[int, list[Any]]] = []
        if register:
            meta = json.dumps({"python": shipping.PYTHON, "libraries": self._libraries, "name": shipped.name}).encode()
            requests.append((Kind.REGISTER, [frames.register_head(self.pool, shipped.key, meta), shipped.blob]))
        head = shipped.call_head(self.pool, timeout_ms)
        for args, kwargs in calls:
            requests.append((Kind.CALL, [head, *bundle.pack((args, kwargs))]))
        slots = conn.send(requests, callback, shipped.big_results, credited)
        if register:
            conn.registered[reg_key] = slots[0]
            return slots[1:]
        return slots

    def _outcome(self, conn: _CallConnection, shipped: _Shipped, slot: _Pending, retried: bool) -> tuple[bool, Any]:
        """(final, value-or-exception) of a resolved call; not final means: register again and retry."""
        try:
            return self._read_outcome(conn, shipped, slot, retried)
        finally:
            conn.release(slot)  # after an OK result was read out of the call's shared file

    def _read_outcome(self, conn: _CallConnection, shipped: _Shipped, slot: _Pending, retried: bool) -> tuple[bool, Any]:
        if slot.error is not None:
            return True, slot.error
        assert slot.frame is not None
        if slot.status == Status.UNKNOWN_FUNCTION:
            reg = conn.registered.pop((self.pool, shipped.key), None)
            if reg is not None and reg.done and reg.error is None and reg.status != Status.OK:
                assert reg.frame is not None
                return True, _error_for(reg.status, reg.frame)  # registration was refused: say why
            if not retried:
                return False, None
        if slot.status == Status.OK:
            shipped.saw_result(slot.frame, slot.shared)
            try:
                return True, _Value(bundle.unpack(slot.frame, frames.HEADER_SIZE, slot.shared))
            except Exception as exc:  # noqa: BLE001 - a result this process cannot unpickle is the call's error
                return True, exc
        return True, _error_for(slot.status, slot.frame)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a worker and return its result."""
        shipped = self._ship(fn)
        conn = self._connection() if self.connections == 1 else self._next_connection()
        retried = False
        rerouted: float | None = None  # the deadline of resending a call refused as draining
        tries = 0
        while True:
            try:
                slot = self._send_call(conn, shipped, args, kwargs, retried)
            except errors.DaemonUnavailable:
                if not conn.retiring:
                    raise
                # the connection closed under us as its daemon drains: nothing of this call was sent
                conn, retried = self._connection() if self.connections == 1 else self._next_connection(), False
                continue
            try:
                conn.wait(slot)
            except BaseException:
                conn.abandon(slot)  # Ctrl-C (KeyboardInterrupt): the call is withdrawn, the session stays usable
                raise
            if slot.status == Status.OK and slot.shared is None and slot.error is None:
                # the commonest answer, read here: what _outcome would do with it, in fewer steps
                frame = slot.frame
                assert frame is not None
                shipped.saw_result(frame, None)
                return bundle.unpack(frame, frames.HEADER_SIZE)  # type: ignore[no-any-return]  # fn's result: T by fn's signature
            final, value = self._outcome(conn, shipped, slot, retried)
            if final:
                if isinstance(value, _Value):
                    return value.value  # type: ignore[no-any-return]  # fn's result: T by fn's signature
                if isinstance(value, errors.Draining) and self.remote is not None:
                    if rerouted is None:
                        rerouted = time.monotonic() + DRAIN_REROUTE
                    if time.monotonic() < rerouted:
                        conn = self._reroute(conn, tries)
                        tries += 1
                        retried = False
                        continue
                raise value
            retried = True

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> CallFuture[T]:
        """Start ``fn(*args, **kwargs)`` and return a ``concurrent.futures.Future`` (a ``CallFuture``:
        its ``cancel()`` withdraws the call, even once it runs)."""
        shipped = self._ship(fn)
        conn = self._connection() if self.connections == 1 else self._next_connection()
        fut: CallFuture[T] = CallFuture(conn, conn.track_async())

        def attempt(retried: bool) -> None:
            def resolved(slot: _Pending) -> None:
                if fut.cancelled():
                    conn.release(slot)
                    return
                try:
                    final, value = self._outcome(conn, shipped, slot, retried)
                    if not final:
                        attempt(True)
                        return
                except BaseException as exc:  # noqa: BLE001 - any failure is the future's exception, never lost on the reader thread
                    final, value = True, exc
                fut._settle(value.value if isinstance(value, _Value) else None, None if isinstance(value, _Value) else value)

            fut._slot = self._send_call(conn, shipped, args, kwargs, retried, resolved)

        try:
            attempt(False)
        except BaseException:
            fut._uncount()
            raise
        return fut

    async def acall(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``await s.acall(fn, *args, **kwargs)``: ``call`` for asyncio code (daemon/client/aio.py).
        Cancelling the awaiting task withdraws the call, as Ctrl-C does for ``call``."""
        from cruised.client import aio

        return await aio.call(self, fn, args, kwargs)  # type: ignore[no-any-return]  # fn's result: T by fn's signature

    def amap(self, fn: Callable[..., T], *iterables: Iterable[Any], window: int = DEFAULT_WINDOW) -> AsyncIterator[T]:
        """``async for r in s.amap(fn, xs)``: ``map`` for asyncio code, up to ``window`` calls in
        flight (on credit, as ``map``), results in order; the calls in flight are withdrawn if the
        consumer stops early."""
        from cruised.client import aio

        return aio.amap(self, fn, iterables, window)

    def map(self, fn: Callable[..., T], *iterables: Iterable[Any], window: int = DEFAULT_WINDOW) -> Iterator[T]:
        """Like ``map(fn, *iterables)``, pipelined: up to ``window`` calls in flight, results in order.

        The calls go out as the daemon grants credit (see "Flow control"): a
        ``map`` over more items than the queue holds runs at the pool's full
        speed with no call refused or sent twice, and leaves the rest of the
        queue to other callers.

        With ``connections`` > 1 every connection gets its own ``window`` (and
        credit), and each call goes to the connection with the fewest calls
        outstanding, so a faster daemon gets more of them: through a load
        balancer that puts each connection on another daemon, one ``map`` uses
        every host.

        If the consumer stops early (closes or drops the generator, or is
        interrupted), the calls still in flight are withdrawn.
        """
        shipped = self._ship(fn)
        conns = [self._connection()] if self.connections == 1 else [self._connection_at(i) for i in range(self.connections)]
        lanes: list[_Lane] = []
        try:
            for conn in conns:
                lanes.append(_Lane(conn, conn.open_credit(self.pool)))  # no gate: a daemon without flow control
            yield from self._map(lanes, shipped, zip(*iterables, strict=False), max(1, window))  # as map(): stop at the shortest
        finally:
            for lane in lanes:
                if lane.gate is not None:
                    lane.conn.close_credit(lane.gate)

    def _map(self, lanes: list[_Lane], shipped: _Shipped, items: Iterator[tuple[Any, ...]], window: int) -> Iterator[Any]:
        # (args, lane, the connection it went out on, slot), in item order
        inflight: deque[tuple[tuple[Any, ...], _Lane, _Connection, _Pending]] = deque()
        exhausted = False

        def result() -> Any:
            """The oldest call's value; it stays at ``inflight[0]`` (a resubmission replaces its
            slot there) until it has one, so a consumer that stops meanwhile withdraws it too."""
            args, lane, conn, slot = inflight[0]
            retried = False
            rerouted: float | None = None
            for tries in itertools.count():
                conn.wait(slot)
                final, value = self._outcome(conn, shipped, slot, retried)
                credited = False
                if not final:
                    retried = True  # the daemon lost the code (it restarted): register again, call again
                elif isinstance(value, _Value):
                    return value.value
                elif isinstance(value, errors.Draining) and self.remote is not None and (rerouted is None or time.monotonic() < rerouted):
                    # it never ran: resend it, and the rest of the map, on a new connection
                    rerouted = rerouted or time.monotonic() + DRAIN_REROUTE
                    if lane.conn is conn:
                        self._reroute_lane(lane, tries)
                    conn, retried = lane.conn, False
                    credited = lane.gate is not None and lane.gate.take(1) == 1
                else:
                    raise value
                if credited:
                    slot = self._send_calls(conn, shipped, [(args, {})], credited=True)[0]
                else:
                    slot = self._send_call(conn, shipped, args, {}, retried)
                inflight[0] = (args, lane, conn, slot)

        # Refills go out in batches: once half the window has been consumed, the other half is
        # sent in one sendmsg per connection, so the daemon reads many calls per recv (and we make
        # one syscall per batch, not per call). With credit, a batch is what the credit allows.
        low = window * len(lanes) // 2

        ahead: list[tuple[Any, ...]] = []  # at most one item, read to learn whether any is left

        def refill() -> None:
            nonlocal exhausted
            rooms = [window - lane.busy for lane in lanes]
            for i, lane in enumerate(lanes):
                if lane.gate is not None and rooms[i] > 0:
                    rooms[i] = lane.gate.take(rooms[i])
            room = sum(rooms)
            if ahead and room:
                batch = [ahead.pop(), *itertools.islice(items, room - 1)]
            else:
                batch = list(itertools.islice(items, room))
            if len(batch) < room:
                exhausted = True
            if len(lanes) == 1:  # the common case, kept lean: one send, slots zipped in order
                lane = lanes[0]
                if lane.gate is not None and len(batch) < rooms[0]:
                    lane.gate.give_back(rooms[0] - len(batch))  # the items ran out first
                if batch:
                    slots = self._send_calls(lane.conn, shipped, [(args, {}) for args in batch], credited=lane.gate is not None)
                    lane.busy += len(batch)
                    inflight.extend(zip(batch, itertools.repeat(lane), itertools.repeat(lane.conn), slots, strict=False))
                return
            order = []  # each call to the lane with the fewest in flight that still has room
            load = [lane.busy for lane in lanes]
            for _ in batch:
                i = min((i for i in range(len(lanes)) if rooms[i] > 0), key=load.__getitem__)
                rooms[i] -= 1
                load[i] += 1
                order.append(i)
            for lane, left in zip(lanes, rooms, strict=True):
                if left > 0 and lane.gate is not None:
                    lane.gate.give_back(left)  # the items ran out first
            sent: list[Iterator[_Pending]] = []
            for i, lane in enumerate(lanes):
                calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(args, {}) for args, at in zip(batch, order, strict=True) if at == i]
                sent.append(iter(self._send_calls(lane.conn, shipped, calls, credited=lane.gate is not None) if calls else ()))
                lane.busy += len(calls)
            inflight.extend((args, lanes[i], lanes[i].conn, next(sent[i])) for args, i in zip(batch, order, strict=True))

        try:
            refill()
            while inflight or not exhausted:
                if not inflight:
                    # nothing in flight and no credit (the queue is full of other callers' calls):
                    # if items are left (the last refill may have taken exactly the last ones),
                    # wait for a daemon's next grant
                    if not ahead:
                        first = next(items, _END)
                        if first is _END:
                            break
                        ahead.append(first)  # refill sends it first
                    lane = next(lane for lane in lanes if lane.gate is not None)
                    assert lane.gate is not None
                    grant = _Pending()
                    if lane.gate.on_grant(functools.partial(grant.resolve, Status.OK, None)):
                        lane.conn.wait(grant)
                    refill()
                    continue
                value = result()
                inflight.popleft()[1].busy -= 1
                yield value
                if len(inflight) <= low:
                    refill()
        finally:
            # the consumer stopped early (closed the generator, dropped it, or was interrupted):
            # the calls still in flight are withdrawn, newest first (see abandon), so none runs
            # for nobody
            if inflight:
                by_conn: dict[_Connection, list[_Pending]] = {}
                for _, _, conn, slot in reversed(inflight):
                    by_conn.setdefault(conn, []).append(slot)
                for conn, slots in by_conn.items():
                    conn.abandon(*slots)

    def _reroute_lane(self, lane: _Lane, tries: int) -> None:
        """``lane``'s daemon is draining: the rest of the map goes to a new connection, with credit of its own."""
        old, gate = lane.conn, lane.gate
        lane.conn = self._reroute(old, tries)
        if gate is not None:
            old.close_credit(gate)
        lane.gate = lane.conn.open_credit(self.pool)


#: what ``next(items, _END)`` returns once a map's items have run out
_END: Any = object()


class _Lane:
    """One connection of a ``map``: its credit gate, and how many of the map's calls it has in flight."""

    __slots__ = ("busy", "conn", "gate")

    def __init__(self, conn: _Connection, gate: CreditGate | None) -> None:
        self.conn = conn
        self.gate = gate
        self.busy = 0


class CallFuture(Future[T]):
    """The future ``Session.submit`` returns: a ``concurrent.futures.Future`` whose ``cancel()``
    withdraws the remote call (Kind.CANCEL), queued or running (the worker is interrupted).

    A plain Future can be cancelled only before it runs; this one stays PENDING in
    ``concurrent.futures`` terms until its answer comes (``running()`` says whether it is
    still outstanding), so ``cancel()`` succeeds until then, and waiters (``wait``,
    ``as_completed``) see the cancellation.
    """

    def __init__(self, conn: _Connection, uncount: Callable[[], None]) -> None:
        super().__init__()
        self._conn = conn
        #: the call's current slot (a retry after UNKNOWN_FUNCTION replaces it)
        self._slot: _Pending | None = None
        self._uncount_once: Callable[[], None] | None = uncount

    def _uncount(self) -> None:
        done, self._uncount_once = self._uncount_once, None  # exactly once: answered or cancelled
        if done is not None:
            done()

    def running(self) -> bool:
        return not self.done()

    def cancel(self) -> bool:
        """Withdraw the call; False if it was answered already (as for any Future)."""
        if not super().cancel():
            return False
        self.set_running_or_notify_cancel()  # tell wait()/as_completed() waiters; returns False here
        slot = self._slot
        if slot is not None:
            self._conn.abandon(slot)
        self._uncount()
        return True

    def _settle(self, result: Any, error: BaseException | None) -> None:
        """The call's answer (on the reader's thread); lost quietly if ``cancel`` won the race."""
        self._uncount()
        try:
            if error is None:
                self.set_result(result)
            else:
                self.set_exception(error)
        except InvalidStateError:
            pass  # cancelled meanwhile


class _Value:
    """A successful result (distinguishes a returned exception object from a raised one)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


def session(
    socket: str | None = None,
    pool: str = "default",
    libraries: dict[str, str] | None = None,
    timeout: float | None = None,
    host: str | None = None,
    port: int | None = None,
    tls: TLS | None = None,
    connections: int = 1,
) -> Session:
    """A session with a cruised daemon, in the style of ``pykx.remote.session(host, port)``:
    a local one (``socket``, else ``CRUISED_ADDRESS``/``CRUISED_SOCKET``/the default) or, with
    ``host``, ``port`` and ``tls``, a remote one over mutual TLS. ``connections``: how many
    connections ``map``, ``call`` and ``submit`` spread over (behind a load balancer, several
    daemons).

    With ``socket=...`` or ``host=...`` it connects now, as ``pykx.remote.session`` does: a
    daemon that does not answer there raises ``DaemonUnavailable`` naming it, here, not at the
    first call. Without them, it stays lazy: it connects at the first call, to the address the
    environment names or the default socket (``cruised.client.paths``), so a session can be made
    before the daemon starts (a notebook's first cell). ``Session(...)`` itself is always lazy.
    """
    s = Session(socket=socket, pool=pool, libraries=libraries, timeout=timeout, host=host, port=port, tls=tls, connections=connections)
    if socket is not None or host is not None:
        s.ping()
    return s


def function(session: Session) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorator: calls of the decorated function run in ``session``'s pool."""
    if not isinstance(session, Session):
        raise TypeError(f"cruised.function expects a cruised.session(), got {type(session).__name__}")

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def remote(*args: Any, **kwargs: Any) -> T:
            return session.call(fn, *args, **kwargs)

        remote.__cruised_function__ = fn  # type: ignore[attr-defined]  # a function attribute: the wrapper stays a plain function
        remote.submit = lambda *a, **k: session.submit(fn, *a, **k)  # type: ignore[attr-defined]  # likewise
        remote.aio = lambda *a, **k: session.acall(fn, *a, **k)  # type: ignore[attr-defined]  # likewise: await f.aio(...)
        remote.session = session  # type: ignore[attr-defined]  # likewise
        return remote

    return decorate
