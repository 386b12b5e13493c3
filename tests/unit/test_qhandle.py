"""The worker's q handle (pool/qconn.py) against a fake connection and a fake clock.

These pin the policy: lazy connect, one connection reused, bounded exponential
backoff, no re-send of a query, which failures mean "connection lost", secrets
kept out of messages, idle-time loss detection. The real pykx path is covered
through the daemon in test_qconn.py.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

os.environ.setdefault("PYKX_UNLICENSED", "true")  # before pykx: no licence probe, no prompt

import pykx as kx

from cruised.pool import qconn
from cruised.pool.qconn import QConnectionError, QHandle, QSettings

SECRET = "hunter2-very-secret"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeConn:
    def __init__(self, fileno: int = -1) -> None:
        self.queries: list[tuple[Any, ...]] = []
        self.closed = False
        self.fail: BaseException | None = None
        self._fileno = fileno

    def __call__(self, query: Any, *args: Any, **kw: Any) -> Any:
        if self.closed:
            raise RuntimeError("Attempted to use a closed IPC connection")
        self.queries.append((query, *args))
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return ("result", query, *args)

    def close(self) -> None:
        self.closed = True

    def fileno(self) -> int:
        return self._fileno


class Connector:
    """Scripted outcomes: a FakeConn to hand out, or an exception to raise."""

    def __init__(self, *outcomes: Any) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[tuple[QSettings, str]] = []
        self.made: list[FakeConn] = []

    def __call__(self, settings: QSettings, password: str) -> FakeConn:
        self.calls.append((settings, password))
        out = self.outcomes.pop(0) if self.outcomes else FakeConn()
        if isinstance(out, BaseException):
            raise out
        self.made.append(out)
        return out


def handle(connector: Callable[..., Any], clock: Clock | None = None, **settings: Any) -> QHandle:
    spec = {"port": 5001, "username": "alice", "password": SECRET, "reconnect_initial": 0.5, "reconnect_max": 4.0, "timeout": 7.0}
    spec.update(settings)
    return QHandle(spec, connect=connector, clock=clock or Clock())


def test_connects_lazily_once_and_reuses_the_connection() -> None:
    conn = Connector()
    q = handle(conn)
    assert conn.calls == [] and not q.connected
    assert q("1+1") == ("result", "1+1")
    assert q("{x+y}", 1, 2) == ("result", "{x+y}", 1, 2)
    assert len(conn.calls) == 1 and q.connected
    settings, password = conn.calls[0]
    assert password == SECRET and settings.username == "alice" and settings.port == 5001


def test_failed_connects_back_off_exponentially_up_to_the_max() -> None:
    clock = Clock()
    conn = Connector(*[kx.PyKXException("Connection error")] * 8)
    q = handle(conn, clock)
    waits = []
    for _ in range(6):
        with pytest.raises(QConnectionError, match=r"cannot connect to q at 127\.0\.0\.1:5001"):
            q("1+1")
        attempts = len(conn.calls)
        # a call during the backoff fails at once, without touching q
        with pytest.raises(QConnectionError, match=r"unavailable .* next connection attempt in"):
            q("1+1")
        assert len(conn.calls) == attempts
        waits.append(q._next_attempt - clock.t)
        clock.t = q._next_attempt
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_rejected_credentials_name_the_user_and_endpoint_never_the_password() -> None:
    clock = Clock()
    conn = Connector(kx.PyKXException("Authentication error"), kx.PyKXException(f"weird failure mentioning {SECRET}"))
    q = handle(conn, clock)
    with pytest.raises(QConnectionError) as info:
        q("1+1")
    assert str(info.value) == "q at 127.0.0.1:5001 rejected the credentials of user 'alice'"
    clock.t += 10
    with pytest.raises(QConnectionError) as info:
        q("1+1")
    assert SECRET not in str(info.value) and "***" in str(info.value)
    assert SECRET not in repr(q) and SECRET not in repr(q.settings) and SECRET not in str(q.state())


def test_a_query_that_loses_the_connection_is_not_resent() -> None:
    clock = Clock()
    first, second = FakeConn(), FakeConn()
    conn = Connector(first, second)
    q = handle(conn, clock)
    assert q("warm up")  # proves the connection
    first.fail = RuntimeError("Failed to send query on IPC socket: '[Errno 32] Broken pipe'")
    with pytest.raises(QConnectionError, match="not re-sent") as info:
        q("insert", 1)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert first.queries == [("warm up",), ("insert", 1)] and first.closed
    assert not q.connected and "Broken pipe" in (q.last_error or "")
    # the connection had worked, so the next call reconnects at once (same clock time)
    assert q("next") == ("result", "next")
    assert second.queries == [("next",)] and len(conn.calls) == 2


def test_a_connection_that_drops_before_it_worked_counts_as_a_failure() -> None:
    clock = Clock()
    a, b = FakeConn(), FakeConn()
    conn = Connector(a, b)
    q = handle(conn, clock)
    q.try_connect()
    a.closed = True  # q accepted us, then hung up before any query
    with pytest.raises(QConnectionError, match=re.escape("next connection attempt in 0.5s")):
        q("1+1")
    assert len(conn.calls) == 1
    clock.t += 0.5
    assert q("1+1") and len(conn.calls) == 2


def test_q_errors_and_bad_arguments_keep_the_connection() -> None:
    c = FakeConn()
    q = handle(Connector(c))
    c.fail = kx.QError("type")
    with pytest.raises(kx.QError, match="type"):
        q("1+`a")
    c.fail = TypeError("Too many parameters - q queries cannot have more than 8 parameters")
    with pytest.raises(TypeError):
        q("f", *range(9))
    assert q.connected and not c.closed and q.last_error is None


def test_a_reply_timeout_drops_the_connection() -> None:
    c = FakeConn()
    q = handle(Connector(c, FakeConn()))
    q("warm up")
    c.fail = kx.QError("Query timed out")
    with pytest.raises(QConnectionError, match=r"no reply from q at 127\.0\.0\.1:5001 within 7s"):
        q("slow")
    assert c.closed  # pykx would make the next query wait for the late reply
    q("next")


def test_a_dead_tls_handle_is_a_lost_connection() -> None:
    c = FakeConn()
    q = handle(Connector(c, FakeConn()))
    q("warm up")
    c.fail = kx.QError("snd handle: 3. OS reports: Protocol error")
    with pytest.raises(QConnectionError, match="lost the connection"):
        q("x")
    assert c.closed


def test_interrupt_mid_query_drops_the_connection_and_keeps_its_type() -> None:
    c = FakeConn()
    q = handle(Connector(c))
    c.fail = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        q("x")
    assert c.closed and not q.connected


def test_password_file_and_env_are_read_at_connect_time(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file\nignored second line\n")
    conn = Connector()
    handle(conn, password=None, password_file=str(pw)).connect()
    assert conn.calls[-1][1] == "from-file"
    pw.write_text("rotated\n")
    handle(conn, password=None, password_file=str(pw)).connect()
    assert conn.calls[-1][1] == "rotated"

    monkeypatch.delenv("CRUISED_TEST_QPW", raising=False)
    clock = Clock()
    q = handle(conn, clock, password=None, password_env="CRUISED_TEST_QPW")
    with pytest.raises(QConnectionError, match=r"environment variable CRUISED_TEST_QPW .* is not set"):
        q.connect()
    monkeypatch.setenv("CRUISED_TEST_QPW", "from-env")
    clock.t += 1
    q("1+1")
    assert conn.calls[-1][1] == "from-env"

    missing = handle(conn, password=None, password_file=str(tmp_path / "nope"))
    with pytest.raises(QConnectionError, match=re.escape("cannot read q.password_file")):
        missing.connect()


def test_state_changes_are_reported_once() -> None:
    c = FakeConn()
    q = handle(Connector(kx.PyKXException("Connection error"), c))
    assert q.take_change() == {"connected": False, "error": None}
    assert q.take_change() is None
    assert not q.try_connect()
    change = q.take_change()
    assert change is not None and change["connected"] is False and "cannot connect" in change["error"]
    q.connect()
    assert q.take_change() == {"connected": True, "error": None}
    assert q.take_change() is None


def test_a_forked_child_cannot_use_the_parents_connection() -> None:
    c = FakeConn()
    q = handle(Connector(c))
    q("warm up")
    pid = os.fork()
    if pid == 0:  # the child: must be refused, and must not touch the socket
        code = 1
        try:
            q("from the child")
        except QConnectionError as exc:
            code = 0 if "forked child" in str(exc) else 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q("parent still works") and c.queries == [("warm up",), ("parent still works",)]


def test_idle_notices_q_closing_the_connection_and_reconnects_in_the_background() -> None:
    chan_ours, chan_theirs = socket.socketpair()
    q_ours, q_theirs = socket.socketpair()
    later = FakeConn()
    conn = Connector(FakeConn(fileno=q_ours.fileno()), kx.PyKXException("Connection error"), later)
    q = QHandle({"port": 5001, "reconnect_initial": 0.01, "reconnect_max": 0.02}, connect=conn)
    reports: list[dict[str, Any]] = []

    def report() -> None:
        change = q.take_change()
        if change is not None:
            reports.append(change)
            if change["connected"] and len(reports) > 1:
                chan_theirs.send(b"x")  # a request arrives once q is back: idle() must return

    try:
        q.connect()
        q._connected_at -= 1.0  # it has been up longer than reconnect_max: a proven connection
        q_theirs.close()  # q goes away while the worker waits for work
        t0 = time.monotonic()
        q.idle(chan_ours, report)
        assert time.monotonic() - t0 < 10
        assert [r["connected"] for r in reports] == [True, False, False, True]
        assert "closed the connection" in reports[1]["error"]
        assert "cannot connect" in reports[2]["error"]
        assert q.connected and q._conn is later and len(conn.calls) == 3
    finally:
        for s in (chan_ours, chan_theirs, q_ours):
            s.close()


def test_idle_stops_watching_after_unsolicited_data() -> None:
    chan_ours, chan_theirs = socket.socketpair()
    q_ours, q_theirs = socket.socketpair()
    c = FakeConn(fileno=q_ours.fileno())
    q = QHandle({"port": 5001}, connect=Connector(c))
    calls = 0

    def report() -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # after the first wake-up for q's bytes
            chan_theirs.send(b"x")

    try:
        q.connect()
        q_theirs.send(b"\x01\x00")  # an async message from q: not ours to read
        q.idle(chan_ours, report)
        assert q.connected and not c.closed and not q._watching
        q("1+1")  # pykx reads pending messages before the reply: watching resumes
        assert q._watching
    finally:
        for s in (chan_ours, chan_theirs, q_ours, q_theirs):
            s.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, {"PYKX_UNLICENSED": "true", "PYKX_SUPPRESS_WARNINGS": "true"}),
        ({"PYKX_LICENSED": "true"}, {"PYKX_LICENSED": "true", "PYKX_SUPPRESS_WARNINGS": "true"}),
        ({"PYKX_UNLICENSED": "false"}, {"PYKX_UNLICENSED": "false", "PYKX_SUPPRESS_WARNINGS": "true"}),
        ({"QARGS": "--licensed", "PYKX_SUPPRESS_WARNINGS": "false"}, {"QARGS": "--licensed", "PYKX_SUPPRESS_WARNINGS": "false"}),
    ],
)
def test_pykx_environment_respects_the_operators_choice(env: dict[str, str], expected: dict[str, str]) -> None:
    assert qconn.pykx_environment(env) == expected
