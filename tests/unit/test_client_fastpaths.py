"""The client's fast paths against the general paths they shortcut (daemon/client/session.py).

``_Connection.send_small`` writes the commonest request (one small CALL) without the batch
machinery of ``send``, and ``Session.call`` reads an OK reply inline instead of through
``_outcome``. Each must be exactly what it shortcuts: the same bytes on the wire, the same
result or error, the same thing learnt about the function's results (``big_results``). A
fake daemon on a Unix socket records what the client sends and answers from a script.
"""

from __future__ import annotations

import itertools
import pickle
import socket
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cruised.client import errors
from cruised.client import session as client
from cruised.pool.wire import bundle, frames, sharedfile
from cruised.pool.wire.framebuf import FrameBuffer
from cruised.pool.wire.frames import Kind, Status


class FakeDaemon:
    """Records every frame the client sends. Answers REGISTER with OK, PASS_FDS with a refusal
    (as a daemon without shared files would: the client stays inline), and each CALL with the
    next scripted (status, payload); with nothing scripted, a CALL goes unanswered."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="cruised-fast-", dir="/tmp")  # short: a socket path has 108 bytes
        self.path = str(Path(self.dir) / "d.sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.received: deque[bytes] = deque()
        self.script: deque[tuple[int, bytes]] = deque()
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def answer(self, status: int, payload: bytes) -> None:
        with self.cond:
            self.script.append((status, payload))

    def take(self, n: int, timeout: float = 10.0) -> list[bytes]:
        """The next ``n`` frames the client sent."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.received) >= n, timeout), f"{len(self.received)} of {n} frames came"
            return [self.received.popleft() for _ in range(n)]

    def _serve(self) -> None:
        try:
            self._serve_one()
        except (ConnectionResetError, BrokenPipeError):  # the client closed with replies unread
            pass

    def _serve_one(self) -> None:
        conn, _ = self.listener.accept()
        fb = FrameBuffer(1 << 16, 1 << 30)
        n = 0
        with conn:
            while True:
                frame = fb.next(n)
                if frame is None:
                    n = conn.recv_into(fb.space())
                    if not n:
                        return
                    continue
                n = 0
                _, _, kind, _, reqid = fb.header
                reply: tuple[int, bytes] | None = None
                with self.cond:
                    self.received.append(bytes(frame))
                    self.cond.notify_all()
                    if kind == Kind.REGISTER:
                        reply = (Status.OK, b"")
                    elif kind == Kind.PASS_FDS:
                        reply = (Status.BAD_REQUEST, b'{"message": "no shared files here"}')
                    elif kind == Kind.CALL and self.script:
                        reply = self.script.popleft()
                if reply is not None:
                    conn.sendall(frames.frame(Kind.REPLY, reqid, reply[1], reply[0]))

    def close(self) -> None:
        self.listener.close()
        Path(self.path).unlink(missing_ok=True)
        Path(self.dir).rmdir()


@pytest.fixture
def daemon() -> Iterator[FakeDaemon]:
    d = FakeDaemon()
    yield d
    d.close()


def add(x: Any, y: Any = 1) -> Any:
    return x + y


#: arguments small enough for send_small (what Session._send_call sends through it)
SMALL_CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),
    ((1,), {}),
    ((2,), {"y": 3}),
    (("text", "ä" * 100), {}),
    (([1.5] * 1000,), {"y": [2.5]}),
    ((b"x" * (sharedfile.SHARE_MIN - 200),), {}),  # just under the size that would share a file
]


def test_send_small_writes_the_frame_send_would_write(daemon: FakeDaemon) -> None:
    s = client.Session(socket=daemon.path, pool="fast", timeout=1.5)
    conn = s._connection()
    head = s._ship(add).call_head(s.pool, s._timeout_ms())
    for args, kwargs in SMALL_CALLS:
        parts = bundle.pack((args, kwargs))
        assert len(parts) == 2 and len(parts[1]) < sharedfile.SHARE_MIN, "a call send_small takes"
        conn.ids = itertools.count(41)
        fast_slot = conn.send_small(head, parts[0], parts[1])  # type: ignore[arg-type]
        conn.ids = itertools.count(41)
        (general_slot,) = conn.send([(Kind.CALL, [head, *parts])])
        fast, general = daemon.take(2)
        assert fast == general, (args, kwargs)
        assert frames.parse_header(fast, 1 << 30) == (len(fast), Kind.CALL, 0, 41)
        assert conn.pending[41] is general_slot is not fast_slot  # both registered their slot under the id
    s.close()


def test_session_sends_small_calls_through_send_small_and_others_not(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the comparison above stands for: the calls Session sends by the fast path."""
    s = client.Session(socket=daemon.path, pool="fast")
    conn = s._connection()
    used: list[str] = []
    for name in ("send_small", "send"):
        real = getattr(conn, name)
        monkeypatch.setattr(conn, name, lambda *a, _real=real, _name=name, **k: (used.append(_name), _real(*a, **k))[1])
    shipped = s._ship(add)
    s._send_call(conn, shipped, (1,), {}, False)  # first: REGISTER in front of the CALL, by send
    daemon.take(2)
    for args, kwargs in SMALL_CALLS:
        s._send_call(conn, shipped, args, kwargs, False)
    s._send_call(conn, shipped, (np.zeros(sharedfile.SHARE_MIN // 8),), {}, False)  # an out-of-band buffer
    shipped.big_results = True  # a function whose results are large asks for a file: send
    s._send_call(conn, shipped, (1,), {}, False)
    n = len(SMALL_CALLS)
    assert used[: n + 1] == ["send"] + ["send_small"] * n
    assert used[n + 1 :] and "send_small" not in used[n + 1 :]
    s.close()


def _reply_ok(value: Any) -> tuple[int, bytes]:
    return Status.OK, b"".join(bytes(p) for p in bundle.pack(value))


def _reply_error(exc: BaseException) -> tuple[int, bytes]:
    info = b'{"type": "%s", "module": "builtins", "message": "%s", "traceback": "Traceback ..."}' % (type(exc).__name__.encode(), str(exc).encode())
    return Status.ERROR, b"".join(frames.error_payload(info, pickle.dumps(exc)))


def _refusal(status: int, message: str) -> tuple[int, bytes]:
    return status, b'{"message": "%s"}' % message.encode()


#: replies to compare the two ways of reading them on: OK ones (the inline read), and the others
REPLIES: list[tuple[str, tuple[int, bytes]]] = [
    ("small", _reply_ok(11)),
    ("none", _reply_ok(None)),
    ("returned exception", _reply_ok(ValueError("returned, not raised"))),
    ("array", _reply_ok(np.arange(1000.0))),
    ("large result", _reply_ok(b"r" * (2 * sharedfile.SHARE_MIN))),  # teaches big_results, a frame over the client's buffer
    ("small again", _reply_ok([1, 2, 3])),  # and unteaches it
    ("raised", _reply_error(KeyError("k"))),
    ("queue full", _refusal(Status.QUEUE_FULL, "queue 2/2")),
    ("crashed", _refusal(Status.WORKER_CRASHED, "worker exited with signal 9")),
]


def _outcome_of(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        value = fn()
    except errors.CruisedError as exc:
        return ("raised", type(exc), str(exc))
    except KeyError as exc:  # the function's own exception (REPLIES), re-created in the client
        return ("raised", type(exc), exc.args)
    if isinstance(value, BaseException):
        return ("returned", type(value), value.args)
    if isinstance(value, np.ndarray):
        return ("returned", "ndarray", value.tolist())
    return ("returned", value)


def test_call_reads_a_reply_as_the_general_path_does(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Session.call reads an OK reply itself; submit() always goes through _outcome. The same reply
    must give the same result (or error), and teach the same about the function's results."""
    s = client.Session(socket=daemon.path, pool="fast")
    shipped = s._ship(add)
    general_reads: list[int] = []
    real_outcome = s._outcome
    monkeypatch.setattr(s, "_outcome", lambda *a: (general_reads.append(1), real_outcome(*a))[1])
    learnt: dict[str, bool] = {}
    for label, reply in REPLIES:
        big_before = shipped.big_results
        daemon.answer(*reply)
        del general_reads[:]
        fast = _outcome_of(lambda: s.call(add, 1))
        fast_learnt = shipped.big_results
        assert bool(general_reads) == (reply[0] != Status.OK), f"{label}: call() read an OK reply inline, and nothing else"
        shipped.big_results = big_before  # the general path starts from the same knowledge
        daemon.answer(*reply)
        general = _outcome_of(lambda: s.submit(add, 1).result(10))
        assert fast == general, label
        assert fast_learnt == shipped.big_results, label
        shipped.big_results = learnt[label] = fast_learnt
    assert learnt["large result"] and not learnt["small again"], "the comparison covered what a reply teaches"
    s.close()
