"""Tests for tests/support/qserver.py, driven by real (unlicensed) pykx clients and raw sockets."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import socket
import struct
import subprocess
import threading
import time

import pytest

os.environ.setdefault("PYKX_UNLICENSED", "true")  # before pykx: no licence probe, no prompt

import numpy as np
import pandas as pd
import pykx as kx

from support.qserver import QServer, make_trade, run_qserver
from support.qtls import TlsQ

HOST = "127.0.0.1"
# pykx's own KeyedTable.pd() uses set_index(inplace=True), which pandas 3.1 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.set_index")


def connect(port: int, **kw) -> kx.SyncQConnection:
    kw.setdefault("timeout", 10.0)  # no test can hang forever on a lost reply
    return kx.SyncQConnection(HOST, port, no_ctx=True, **kw)


def raw_connect(port: int, hello: bytes) -> tuple[socket.socket, bytes]:
    s = socket.create_connection((HOST, port), timeout=10.0)
    s.sendall(hello)
    return s, s.recv(1)


def read_msg(s: socket.socket) -> bytes:
    buf = b""
    while len(buf) < 8 or len(buf) < struct.unpack("<I", buf[4:8])[0]:
        chunk = s.recv(65536)
        assert chunk, "server closed mid-message"
        buf += chunk
    return buf


@pytest.fixture(scope="module")
def srv():
    with run_qserver("--unix") as s:
        yield s


@pytest.fixture
def conn(srv):
    with connect(srv.port) as c:
        yield c


def test_arithmetic_and_til(conn):
    assert conn("1+1").py() == 2
    assert conn("{x+y}", 1, 2).py() == 3
    assert conn("{x+y}", 1, 2.5).py() == 3.5
    assert conn("{x+y}", kx.LongVector(np.arange(3)), 10).py() == [10, 11, 12]
    til = conn("til 5")
    assert isinstance(til, kx.LongVector) and til.py() == [0, 1, 2, 3, 4]


def test_trade_table(conn):
    expected = make_trade()
    for q in ("trade", "select from trade"):
        t = conn(q)
        assert isinstance(t, kx.Table)
        df = t.pd()
        assert list(df.columns) == ["sym", "time", "price", "size"]
        assert len(df) == 1000 and set(df["sym"]) == {"AAPL", "MSFT", "GOOG", "IBM"}
        assert df["time"].dtype == "datetime64[ns]" and df["size"].dtype == np.int64
        assert np.allclose(df["price"], expected["price"])
    aapl = conn("select from trade where sym=`AAPL").pd()
    assert len(aapl) == (expected["sym"] == "AAPL").sum() and set(aapl["sym"]) == {"AAPL"}


def test_vwap(conn):
    t = make_trade()
    for sym in ("AAPL", "IBM"):
        rows = t[t["sym"] == sym]
        want = (rows["price"] * rows["size"]).sum() / rows["size"].sum()
        got = conn("vwap", sym)  # pykx sends a Python str as a symbol
        assert isinstance(got, kx.FloatAtom) and got.py() == pytest.approx(want)
    assert math.isnan(conn("vwap", "NOPE").py())
    by_sym = conn("vwap")
    assert isinstance(by_sym, kx.KeyedTable)
    df = by_sym.pd()
    assert list(df.index) == ["AAPL", "GOOG", "IBM", "MSFT"] and list(df.columns) == ["vwap"]
    assert df.loc["AAPL", "vwap"] == pytest.approx(conn("vwap", "AAPL").py())
    by_arg = conn("{select from trade where sym=x}", "IBM").pd()
    pd.testing.assert_frame_equal(by_arg, conn("select from trade where sym=`IBM").pd())
    with pytest.raises(kx.QError, match="type"):
        conn("{select from trade where sym=x}", 1)
    as_q = conn("select vwap:size wavg price by sym from trade")
    pd.testing.assert_frame_equal(as_q.pd(), df)


def test_errors_keep_connection_usable(conn):
    with pytest.raises(kx.QError, match=r"^err$"):
        conn("err")
    with pytest.raises(kx.QError, match=r"^boom$"):
        conn("err", b"boom")
    with pytest.raises(kx.QError, match=r"^nyi: no such thing$"):
        conn("no such thing")
    with pytest.raises(kx.QError, match="rank"):
        conn("{x+y}", 1)
    assert conn("1+1").py() == 2


@pytest.mark.parametrize(
    "obj",
    [
        kx.LongVector(np.arange(5)),
        kx.toq(np.array(["a", "b"], dtype=object)),
        kx.toq({"a": 1, "b": 2.5}),
        kx.toq([1, b"two", "three"]),
        kx.toq(pd.Timestamp("2024-01-02 03:04:05.123456789")),
        kx.toq(pd.DataFrame({"x": [1, 2], "y": ["p", "q"]})),
        kx.toq(pd.DataFrame({"k": ["a", "b"], "v": [1.0, 2.0]}).set_index("k")),
    ],
)
def test_echo_round_trip(conn, obj):
    back = conn("echo", obj)
    assert type(back) is type(obj)
    if isinstance(obj, (kx.Table, kx.KeyedTable)):
        pd.testing.assert_frame_equal(back.pd(), obj.pd())
    else:
        assert back.py() == obj.py()


def test_sleep_and_client_timeout(srv):
    with connect(srv.port, timeout=0.3) as c:
        t0 = time.monotonic()
        with pytest.raises(kx.QError, match="Query timed out"):
            c("sleep", 0.8)
        assert time.monotonic() - t0 < 0.7
        assert c("1+1").py() == 2  # pykx drains the late reply first
    with connect(srv.port) as c:
        assert c("sleep", 0.05).py() == 0.05
        assert c("sleep 0.05").py() == 0.05


def test_connections_are_served_concurrently(srv):
    conns = [connect(srv.port) for _ in range(3)]
    try:
        results: list[object] = []

        def work(c: kx.SyncQConnection) -> None:
            results.append(c("sleep", 0.4).py())
            results.extend(len(c("trade")) for _ in range(20))

        threads = [threading.Thread(target=work, args=(c,)) for c in conns]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert time.monotonic() - t0 < 1.1  # three 0.4 s sleeps in parallel, not in series
        assert sorted(results)[:3] == [0.4] * 3 and results.count(1000) == 60
    finally:
        for c in conns:
            c.close()


def test_async_gets_no_reply(conn):
    conn("til 3", wait=False)
    conn("err", wait=False)  # async errors are not answered either
    assert conn("1+1").py() == 2  # a stray reply would have been read here instead


def test_wire_format_raw_socket(srv):
    for hello, agreed in [(b"u:p\x03\x00", b"\x03"), (b"u:p\x00", b"\x00"), (b"u\x09\x00", b"\x06"), (b":\x06\x00", b"\x06")]:
        s, reply = raw_connect(srv.port, hello)
        with s:
            assert reply == agreed, hello
    s, reply = raw_connect(srv.port, b"raw:\x03\x00")
    with s:
        s.sendall(kx.serialize(kx.CharVector("til 3"), mode=3, wait=0).copy())
        s.sendall(kx.serialize(kx.CharVector("1+1"), mode=3, wait=1).copy())
        msg = read_msg(s)
        assert msg[:4] == b"\x01\x02\x00\x00" and struct.unpack("<I", msg[4:8])[0] == len(msg)
        assert kx.deserialize(msg).py() == 2
        s.sendall(kx.serialize(kx.toq([b"err", b"boom"]), mode=3, wait=1).copy())
        assert read_msg(s) == b"\x01\x02\x00\x00\x0e\x00\x00\x00\x80boom\x00"


def test_close_then_reconnect(srv):
    with connect(srv.port) as c:
        before = c(".cruised.test.connections").py()
        with pytest.raises(RuntimeError, match="closed IPC connection"):
            c("close")
    with connect(srv.port) as c:
        assert c("1+1").py() == 2
        assert c(".cruised.test.connections").py() == before + 1
        assert isinstance(c(".cruised.test.connections"), kx.LongAtom)


def test_counters_count_executions_even_when_the_reply_is_lost(srv):
    with connect(srv.port) as c:
        assert c(".cruised.test.count", "ctr_a").py() == 0
        assert c("incr", "ctr_a").py() == 1
        assert c("incr", "ctr_a").py() == 2
        with pytest.raises(kx.QError, match="rank"):
            c("incr")
        with pytest.raises(kx.QError, match="type"):
            c("incr", 1)
        with pytest.raises(kx.QError, match="type"):
            c("incr", "ctr_a", "nope")
        with pytest.raises(RuntimeError, match="closed IPC connection"):
            c("incr", "ctr_a", "close")
    with connect(srv.port) as c:
        assert c(".cruised.test.count", "ctr_a").py() == 3  # it ran, though its reply never came
        assert c(".cruised.test.count", "ctr_b").py() == 0


def test_unix_socket(srv):
    with kx.SyncQConnection(port=srv.port, unix=True, no_ctx=True, timeout=10.0) as c:
        assert c("til 3").py() == [0, 1, 2]


def test_users_and_record(tmp_path):
    md5 = hashlib.md5(b"hunter2").hexdigest()
    sha1 = hashlib.sha1(b"s3cret").hexdigest().upper()
    users = tmp_path / "users.txt"
    users.write_text(f"alice:plain\nbob:{md5}\n\ncarol:{sha1}\n")
    record = tmp_path / "record.jsonl"
    with run_qserver("--users", str(users), "--user", "dave:pw4", "--record", str(record)) as s:
        assert s.record_path == record
        for user, pw in [("alice", "plain"), ("bob", "hunter2"), ("carol", "s3cret"), ("dave", "pw4")]:
            with connect(s.port, username=user, password=pw) as c:
                assert c("1+1").py() == 2
        for user, pw in [("alice", "wrong"), ("bob", md5), ("carol", "hunter2"), ("eve", ""), ("", "")]:
            with pytest.raises(kx.PyKXException, match="Authentication error"):
                connect(s.port, username=user, password=pw)
        sock, reply = raw_connect(s.port, b"alice:nope\x03\x00")
        with sock:
            assert reply == b""  # closed without a byte
        with connect(s.port, username="alice", password="plain") as c:
            assert c(".cruised.test.users").py() == ["alice", "bob", "carol", "dave"]
            assert c(".cruised.test.connections").py() == 5
        hs = s.handshakes()
        assert len(hs) == 11 and sum(h["ok"] for h in hs) == 5
        assert {k: hs[0][k] for k in ("user", "ok", "cap")} == {"user": "alice", "ok": True, "cap": 6}
        assert {k: hs[9][k] for k in ("user", "ok", "cap")} == {"user": "alice", "ok": False, "cap": 3}
        times = [h["t"] for h in hs]
        assert times == sorted(times) and times[0] <= time.monotonic()  # one clock for every process


def test_restart_on_same_port_and_sigterm(tmp_path):
    with run_qserver() as s:
        port, first = s.port, s.proc
        old = connect(port)
        old("sleep", 30, wait=False)  # a busy connection must not delay SIGTERM
        t0 = time.monotonic()
        s.restart()
        assert time.monotonic() - t0 < 5 and first.returncode == 0
        assert s.port == port and s.proc is not first
        with pytest.raises(RuntimeError):
            old("1+1")
        old.close()
        with connect(port) as c:
            assert c("1+1").py() == 2
        assert len(s.handshakes()) == 2  # the record file survives a restart
    assert s.proc.returncode == 0


def test_failed_start_is_reaped():
    srv = QServer(["--no-such-flag"], timeout=20)
    with pytest.raises(RuntimeError, match="exited before listening"):
        srv.start()
    assert srv.proc is not None and srv.proc.returncode == 2
    srv.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_tls(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with run_qserver("--tls", str(cert), str(key)) as s:
        # pykx TLS clients each in a process of its own: libe fixes its TLS settings at a process's
        # first TLS connect, so they could not differ here, nor in later tests (tests/support/qtls.py)
        with pytest.raises(kx.PyKXException, match="Connection error"):
            TlsQ(s.port, host="localhost", tls_env={}, timeout=10.0)  # verified by default: the certificate is not trusted
        with TlsQ(s.port, host="localhost", tls_env={"SSL_CA_CERT_FILE": str(cert)}, timeout=10.0) as c:
            assert c("til 3") == [0, 1, 2]
            with pytest.raises(kx.QError, match="boom"):
                c("err", b"boom")
