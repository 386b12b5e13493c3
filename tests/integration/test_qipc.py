"""The kdb+ IPC front door through the real daemon, with real pykx clients.

One daemon (``door``) serves most of the module: endpoints for every row of
the error table, a one-worker pool for busy and pykx.remote caching, a pool
with a 1 s execution limit, and a -U users file. A second one (``strict``)
has no loopback trust, TLS on TCP, a small message limit and a short read
timeout. Clients: ``kx.SyncQConnection(no_ctx=True)``, ``kx.AsyncQConnection``,
unmodified ``pykx.remote``, and ``RawQ`` (tests/support/qraw.py) where exact bytes
matter (handshakes, compression, callbacks, fuzzing).

No timing assertions: "ran concurrently" is shown by rendezvous endpoints
that only succeed when N calls are inside the pool at once, and "never
blocked" by a call that waits on a gate only another handle can open.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.daemon import Daemon, pool_config, wait_for
from support.qraw import ASYNC, RESPONSE, SYNC, RawQ, Refused, kx, q_compress, sym
from support.qtls import TlsQ

EPS = '''
import os
import signal
import time
import uuid

import numpy as np
import pandas as pd


def greet(name, punct="!"):
    return f"hello {name}{punct}"


def add(x, y):
    return x + y


def nothing():
    return "nothing"


def kinds(*args, **kw):
    def kind(a):
        if isinstance(a, np.ndarray):
            return f"ndarray[{a.dtype}]"
        if isinstance(a, pd.DataFrame):
            return "DataFrame[" + ",".join(map(str, a.columns)) + "]"
        if isinstance(a, list):
            return "list[" + ",".join(kind(x) for x in a) + "]"
        if isinstance(a, dict):
            return "dict[" + ",".join(f"{k}:{kind(v)}" for k, v in a.items()) + "]"
        if a is None:
            return "None"
        return type(a).__name__ + (f"={a}" if isinstance(a, str) else "")
    return " ".join([kind(a) for a in args] + [f"{k}={kind(v)}" for k, v in sorted(kw.items())])


def result(kind):
    return {
        "text": lambda: "hello",
        "dict": lambda: {"a": 1, "b": "x"},
        "ints": lambda: [1, 2, 3],
        "floats": lambda: [1.0, 2.5],
        "frame": lambda: pd.DataFrame({"sym": ["a", "b"], "px": [1.5, 2.5]}),
        "keyed": lambda: pd.DataFrame({"k": ["a", "b"], "v": [1, 2]}).set_index("k"),
        "none": lambda: None,
        "array": lambda: np.arange(3),
        "symbols": lambda: np.array(["a", "b"]),
        "mixed": lambda: [1, "a"],
        "guid": lambda: uuid.UUID(int=7),
        "unconvertible": lambda: object(),
    }[kind]()


def record(path, i):
    with open(path, "a") as fh:
        fh.write(f"{i}\\n")
    return i


def wait_gate(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.005)
    return False


def open_gate(path):
    open(path, "w").close()
    return True


def rendezvous(folder, n, timeout=30.0):
    """True only if n calls are in here at the same time (each waits for the others)."""
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, f"{os.getpid()}-{time.monotonic_ns()}"), "w").close()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(os.listdir(folder)) >= n:
            return True
        time.sleep(0.005)
    return False


def boom(msg):
    raise ValueError(msg)


def crash():
    os.kill(os.getpid(), signal.SIGSEGV)


def sleep(secs):
    time.sleep(secs)
    return secs


def big(rows):
    return pd.DataFrame({"a": np.arange(rows, dtype=np.float64), "b": np.ones(rows)})


def total(v):
    return int(np.asarray(v).sum())
'''

PLAIN, MD5, SHA1 = "alice-pw", "bob-pw", "carol-pw"
USERS = f"""# q -U format
alice:{PLAIN}
bob:{hashlib.md5(MD5.encode()).hexdigest()}
carol:{hashlib.sha1(SHA1.encode()).hexdigest().upper()}
"""
ERROR_ID = r" #\d+$"


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _start(root: Path, config: dict[str, Any]) -> Daemon:
    d = Daemon(config, root, args=[], env={"PYKX_UNLICENSED": "true"})
    d.start()
    return d


def _stop(d: Daemon) -> None:
    try:
        d.cleanup()
    except AssertionError as exc:
        pytest.fail(f"{exc}\n--- daemon log ---\n{d.log()[-4000:]}")


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("qdoor")
    code = write(root / "eps.py", EPS)

    def ep(function: str, pool: str = "default") -> dict[str, Any]:
        return {"code": code, "function": function, "pool": pool}

    names = ["greet", "add", "nothing", "kinds", "result", "record", "wait_gate", "open_gate", "rendezvous", "boom", "crash", "big", "total"]
    config = {
        "daemon": {"read_timeout": "5s"},
        "http": {"enabled": False},
        "pools": {
            "default": pool_config(min=1, cruise=2, max=4, queue_size=64),
            # one worker, one queue slot: busy on demand; also pykx.remote's pool (compiled once per worker)
            "one": pool_config(min=1, cruise=1, max=1, queue_size=1, queue_timeout="30s"),
            # one worker, a 1 s execution limit and a 300 ms queue limit: both timeouts on demand
            "short": pool_config(min=1, cruise=1, max=1, exec_timeout="1s", queue_timeout="300ms"),
        },
        "services": {
            "demo": {"endpoints": {**{n: ep(n) for n in names}, "secret": ep("greet")}},
            "one": {"endpoints": {"wait": ep("wait_gate", "one"), "record": ep("record", "one")}},
            "short": {"endpoints": {"sleep": ep("sleep", "short")}},
        },
        "qipc": {
            "listen": "127.0.0.1:0",
            "users_file": write(root / "users.txt", USERS),
            "endpoint_users": {"demo/secret": ["alice"]},
            "remote_functions": True,  # pykx.remote runs here, after a password login (test_qipc_code.py: the rules)
            "remote_pool": "one",
        },
    }
    d = _start(root, config)
    d.port = d.status()["qipc"]["port"]  # type: ignore[attr-defined]  # the fixture hangs the door's port and folder on the Daemon
    d.root = root  # type: ignore[attr-defined]  # the fixture hangs the door's port and folder on the Daemon
    try:
        yield d
    finally:
        _stop(d)


def port(d: Daemon) -> int:
    return int(d.port)  # type: ignore[attr-defined]  # set by the door fixture on its Daemon


def conn(d: Daemon, **kw: Any) -> Any:
    return kx.SyncQConnection("127.0.0.1", port(d), no_ctx=True, **kw)


def qerror(fn: Callable[[], Any]) -> str:
    with pytest.raises(kx.QError) as info:
        fn()
    return str(info.value)


def text(k: Any) -> str:
    return bytes(k.py()).decode()


# -- handshake and logins ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("creds", "cap", "agreed"),
    [(b":", 6, 6), (b":", 3, 3), (b"bob", 6, 6), (b"", 1, 1), (b"dave", None, 0), (b":", 9, 6)],
    ids=["cap6", "cap3", "q-style-user-no-colon", "cap1", "no-capability-byte", "future-cap"],
)
def test_handshake_answers_the_offered_capability_and_serves(door: Daemon, creds: bytes, cap: int | None, agreed: int) -> None:
    with RawQ(port(door), creds=creds, cap=cap) as q:
        assert q.cap == agreed
        assert text(q.call([sym("demo/greet"), kx.CharVector("q")])) == "hello q!"


def test_unix_socket_serves_what_hopen_unix_dials(door: Daemon) -> None:
    with kx.SyncQConnection(port=port(door), unix=True, no_ctx=True) as c:
        assert c(sym("demo/add"), 2, 3).py() == 5
    with RawQ(port(door), unix=True, creds=b"eve") as q:
        assert q.call([sym("demo/add"), 1, 1]).py() == 2


@pytest.mark.parametrize(("user", "password"), [("alice", PLAIN), ("bob", MD5), ("carol", SHA1)], ids=["plain", "md5", "sha1"])
def test_users_file_formats_plain_md5_sha1(door: Daemon, user: str, password: str) -> None:
    with conn(door, username=user, password=password) as c:
        assert c(sym("demo/add"), 1, 2).py() == 3
    with pytest.raises(kx.PyKXException):
        conn(door, username=user, password=password + "x")


def test_bad_credentials_are_closed_during_the_handshake_and_counted(door: Daemon) -> None:
    before = door.status()["qipc"]["logins"]["failed"]
    with pytest.raises(kx.PyKXException, match="Authentication"):
        conn(door, username="alice", password="wrong")
    with pytest.raises(Refused):
        RawQ(port(door), creds=b"nobody:secret")
    with pytest.raises(Refused):
        RawQ(port(door), creds=b"alice:" + PLAIN.upper().encode())
    assert door.status()["qipc"]["logins"]["failed"] == before + 3
    from prometheus_client.parser import text_string_to_metric_families

    with door.session() as s:
        fams = {f.name: f for f in text_string_to_metric_families(s.metrics())}
    failed = [x.value for x in fams["cruised_auth_failures"].samples if x.labels == {"door": "qipc"} and x.name.endswith("_total")]
    assert failed == [before + 3], "failed q logins are counted in /metrics"


def test_endpoint_user_list_answers_access(door: Daemon) -> None:
    with conn(door, username="alice", password=PLAIN) as c:
        assert text(c(sym("demo/secret"), "x")) == "hello x!"
    with conn(door, username="bob", password=MD5) as c:
        assert qerror(lambda: c(sym("demo/secret"), "x")) == "access: demo/secret"
        assert c(sym("demo/add"), 1, 1).py() == 2  # the handle keeps serving


# -- calls, arguments and the type mapping ---------------------------------------------------


def test_sync_calls_symbol_or_string_name_positional_and_keywords(door: Daemon) -> None:
    with conn(door) as c:
        assert text(c(sym("demo/greet"), "bob")) == "hello bob!"
        assert text(c(kx.CharVector("demo/greet"), "bob", kx.CharVector("?"))) == "hello bob?"
        assert text(c(sym("demo/greet"), {"name": "al", "punct": "."})) == "hello al."
        assert text(c(sym("demo/greet"), {"name": "al"})) == "hello al!"
        assert text(c(sym("demo/nothing"), None)) == "nothing"  # a lone :: is no arguments
        assert c(sym("demo/add"), np.arange(3), 10).np().tolist() == [10, 11, 12]


def test_arguments_arrive_as_documented_python_types(door: Daemon) -> None:
    import pandas as pd

    with conn(door) as c:
        got = text(
            c(
                sym("demo/kinds"),
                kx.CharVector("free text"),
                sym("ticker"),
                kx.SymbolVector(["a", "b"]),
                np.array([1.5, 2.5]),
                pd.DataFrame({"x": [1, 2]}),
                {"k": 1},
                [1, kx.CharVector("s")],
            )
        )
    assert got == "str=free text str=ticker list[str=a,str=b] ndarray[float64] DataFrame[x] dict[k:int] list[int,str=s]"


def test_results_go_back_as_documented_q_types(door: Daemon) -> None:
    with conn(door) as c:

        def res(kind: str) -> Any:
            return c(sym("demo/result"), kx.CharVector(kind))

        assert isinstance(res("text"), kx.CharVector) and text(res("text")) == "hello"
        d = res("dict")
        assert isinstance(d, kx.Dictionary) and isinstance(d.keys(), kx.SymbolVector)
        assert [type(v).__name__ for v in d.values()] == ["LongAtom", "CharVector"]
        assert isinstance(res("ints"), kx.LongVector) and res("ints").py() == [1, 2, 3]
        assert isinstance(res("floats"), kx.FloatVector)
        frame = res("frame")
        assert isinstance(frame, kx.Table) and frame.pd()["px"].tolist() == [1.5, 2.5]
        assert isinstance(res("keyed"), kx.KeyedTable)
        assert isinstance(res("none"), kx.Identity)
        assert isinstance(res("array"), kx.LongVector)
        assert isinstance(res("symbols"), kx.SymbolVector)
        assert [type(v).__name__ for v in res("mixed")] == ["LongAtom", "CharVector"]
        assert isinstance(res("guid"), kx.GUIDAtom)


# -- ordering, concurrency, callbacks -----------------------------------------------------------


def test_async_messages_on_one_handle_run_in_order_and_h_empty_is_a_barrier(door: Daemon) -> None:
    path = str(door.root / "order.txt")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    with conn(door) as c:
        for i in range(24):
            c(sym("demo/record"), path, i, wait=False)
        assert isinstance(c(kx.CharVector("")), kx.Identity)  # h"" returns once all of them ran
        assert Path(path).read_text().split() == [str(i) for i in range(24)]


def test_pipelined_sync_requests_on_one_handle_answer_in_order(door: Daemon) -> None:
    async def main() -> list[int]:
        c = await kx.AsyncQConnection("127.0.0.1", port(door), no_ctx=True)
        try:
            futures = [c(sym("demo/add"), i, 100) for i in range(12)]
            return [(await f).py() for f in futures]
        finally:
            await c.close()

    assert asyncio.run(main()) == [i + 100 for i in range(12)]


def test_a_pending_call_never_delays_another_handle(door: Daemon) -> None:
    gate = str(door.root / "gate-handles")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    results: dict[str, Any] = {}

    def blocked() -> None:
        with conn(door) as c:
            results["blocked"] = c(sym("demo/wait_gate"), gate).py()

    t = threading.Thread(target=blocked)
    t.start()
    try:
        wait_for(lambda: door.status()["pools"]["default"]["workers"]["busy"] >= 1, 20, what="the gated call to run")
        for i in range(4):  # other handles are answered while that one is still pending
            with conn(door) as c:
                assert c(sym("demo/add"), i, 1).py() == i + 1
        assert "blocked" not in results
        with conn(door) as c:
            assert c(sym("demo/open_gate"), gate).py() is True
    finally:
        t.join(30)
    assert results["blocked"] is True


def test_many_handles_have_sync_calls_pending_at_once(door: Daemon) -> None:
    folder = str(door.root / "rv-handles")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    out: list[Any] = []

    def one() -> None:
        with conn(door) as c:
            out.append(c(sym("demo/rendezvous"), folder, 4).py())

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [True] * 4


def _callback(q: RawQ) -> tuple[str, Any, bool, Any]:
    msgtype, msg = q.recv()
    assert msgtype == ASYNC
    name, reqid, (failed, value) = list(msg)
    return name.py(), reqid.py(), failed.py(), value


def test_deferred_sync_callbacks_answer_with_the_callers_reqid(door: Daemon) -> None:
    with RawQ(port(door)) as q:
        q.send([sym("demo/add"), 1, 2, sym("onResult"), 42], ASYNC)
        name, reqid, failed, value = _callback(q)
        assert (name, reqid, failed, value.py()) == ("onResult", 42, False, 3)
        q.send([sym("demo/boom"), kx.CharVector("bad x"), sym("onResult"), 43], ASYNC)
        name, reqid, failed, value = _callback(q)
        assert (name, reqid, failed) == ("onResult", 43, True)
        assert re.fullmatch(r"ValueError: bad x" + ERROR_ID, text(value))
        q.send([sym("demo/nope"), 1, sym("onResult"), kx.GUIDAtom(__import__("uuid").UUID(int=5))], ASYNC)
        name, reqid, failed, value = _callback(q)
        assert failed and str(reqid) == "00000000-0000-0000-0000-000000000005" and text(value) == "cruised: unknown endpoint demo/nope"


def test_callbacks_from_one_handle_run_concurrently_then_a_sync_waits_for_them(door: Daemon) -> None:
    folder = str(door.root / "rv-callbacks")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    with RawQ(port(door)) as q:
        for i in range(3):
            q.send([sym("demo/rendezvous"), kx.CharVector(folder), 3, sym("cb"), i], ASYNC)
        answers = sorted(_callback(q)[1:] for _ in range(3))
        assert [(rid, failed, value.py()) for rid, failed, value in answers] == [(0, False, True), (1, False, True), (2, False, True)]


def test_plain_async_with_a_symbol_argument_is_not_taken_for_a_callback(door: Daemon) -> None:
    path = str(door.root / "plain.txt")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    with RawQ(port(door)) as q:
        # record(path, i) takes two arguments and gets two: a plain async call, no answer
        q.send([sym("demo/record"), sym(path), sym("x")], ASYNC)
        q.send(kx.CharVector(""), SYNC)
        msgtype, value = q.recv()
        assert msgtype == RESPONSE and isinstance(value, kx.Identity)  # the barrier's answer comes first: no callback was sent
    assert Path(path).read_text().split() == ["x"]


# -- the error table -----------------------------------------------------------------------------


def test_error_lines_for_the_function_and_its_arguments(door: Daemon) -> None:
    with conn(door) as c:
        assert re.fullmatch(r"ValueError: it broke" + ERROR_ID, qerror(lambda: c(sym("demo/boom"), kx.CharVector("it broke"))))
        assert qerror(lambda: c(sym("demo/add"), 1, 2, 3)) == "rank: demo/add takes 2 args, got 3"
        assert qerror(lambda: c(sym("demo/greet"), None)) == "rank: demo/greet takes 1 to 2 args, got 0"
        assert qerror(lambda: c(sym("demo/nope"), 1)) == "cruised: unknown endpoint demo/nope"
        assert re.fullmatch(r"cruised: cannot convert object to q" + ERROR_ID, qerror(lambda: c(sym("demo/result"), kx.CharVector("unconvertible"))))
        unsupported = "cruised: q expressions not supported; use h(`endpoint;args)"
        assert qerror(lambda: c("1+1")) == unsupported
        assert qerror(lambda: c("{x+y}", 1, 2)) == unsupported
        assert qerror(lambda: c(sym("demo/greet"))) == unsupported  # h`name evaluates a name in q: not a call
    with RawQ(port(door), cap=1) as q:  # a GUID needs capability 3: never a hang, an error
        with pytest.raises(kx.QError, match=r"cruised: cannot convert GUIDAtom to q"):
            q.call([sym("demo/result"), kx.CharVector("guid")])


def test_error_line_busy(door: Daemon) -> None:
    gate = str(door.root / "gate-busy")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    out: list[Any] = []

    def waiter() -> None:
        with conn(door) as c:
            out.append(c(sym("one/wait"), gate).py())

    threads = [threading.Thread(target=waiter)]
    threads[0].start()
    try:
        wait_for(lambda: door.status()["pools"]["one"]["workers"]["busy"] == 1, 20, what="the one worker to be busy")
        threads.append(threading.Thread(target=waiter))
        threads[1].start()
        wait_for(lambda: door.status()["pools"]["one"]["queue"]["depth"] == 1, 20, what="the queue to fill")
        with conn(door) as c:
            assert re.fullmatch(r"cruised: busy \(queue 1/1\)" + ERROR_ID, qerror(lambda: c(sym("one/wait"), gate)))
            assert c(sym("demo/open_gate"), gate).py() is True
    finally:
        for t in threads:
            t.join(30)
    assert out == [True, True]


def test_a_closed_handle_drops_its_queued_calls(door: Daemon) -> None:
    gate = str(door.root / "gate-drop")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    path = str(door.root / "dropped.txt")  # type: ignore[attr-defined]  # set by the door fixture on its Daemon
    out: list[Any] = []

    def waiter() -> None:
        with conn(door) as c:
            out.append(c(sym("one/wait"), gate).py())

    t = threading.Thread(target=waiter)
    t.start()
    try:
        wait_for(lambda: door.status()["pools"]["one"]["workers"]["busy"] == 1, 20, what="the one worker to be busy")
        with RawQ(port(door)) as q:
            q.send([sym("one/record"), kx.CharVector(path), kx.CharVector("never")], ASYNC)
            wait_for(lambda: door.status()["pools"]["one"]["queue"]["depth"] == 1, 20, what="the async call to queue")
        wait_for(lambda: door.status()["pools"]["one"]["queue"]["depth"] == 0, 20, what="the closed handle's call to leave the queue")
        with conn(door) as c:
            assert c(sym("demo/open_gate"), gate).py() is True
    finally:
        t.join(30)
    with conn(door) as c:
        assert text(c(sym("one/record"), path, kx.CharVector("after"))) == "after"
    assert Path(path).read_text().split() == ["after"]


def test_error_lines_timeout_and_queue_timeout(door: Daemon) -> None:
    """Two calls at once into one worker: one runs past exec_timeout, the other waits past queue_timeout."""
    lines: list[str] = []

    def call() -> None:
        with conn(door) as c:
            lines.append(qerror(lambda: c(sym("short/sleep"), 30)))

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(lines) == 2
    assert any(re.fullmatch(r"cruised: timeout after 1s" + ERROR_ID, line) for line in lines), lines
    assert any(re.fullmatch(r"cruised: queue timeout after 0.3s" + ERROR_ID, line) for line in lines), lines


def test_error_line_worker_died(door: Daemon) -> None:
    with conn(door) as c:
        assert re.fullmatch(r"cruised: worker died \(SIGSEGV\)" + ERROR_ID, qerror(lambda: c(sym("demo/crash"), None)))
        assert c(sym("demo/add"), 1, 1).py() == 2  # the pool replaced it; the handle is fine


def test_traceback_of_a_failed_request_by_its_id(door: Daemon) -> None:
    with conn(door) as c:
        line = qerror(lambda: c(sym("demo/boom"), kx.CharVector("traced")))
        rid = int(line.rsplit("#", 1)[1])
        tb = text(c(sym(".cruised.trace"), rid))
        assert "Traceback" in tb and "raise ValueError(msg)" in tb and "ValueError: traced" in tb


def test_introspection_tables(door: Daemon) -> None:
    with conn(door) as c:
        stats = c(sym(".cruised.stats"), None).pd()
        assert set(stats["pool"]) == {"default", "one", "short"}
        assert {"idle", "busy", "queued", "capacity", "ok", "errors", "crashed"} <= set(stats.columns)
        eps = c(sym(".cruised.endpoints"), None).pd()
        row = eps[eps["endpoint"] == "demo/greet"].iloc[0]
        assert row["pool"] == "default" and row["state"] == "loaded"
        assert bytes(row["signature"]).decode() == "greet(name, punct='!')"


def test_cli_status_shows_the_listener(door: Daemon) -> None:
    out = door.cli("status")
    assert out.returncode == 0, out.stderr
    assert f"kdb+ IPC on 127.0.0.1:{port(door)} and @/tmp/kx.{port(door)}:" in out.stdout


# -- big, compressed and hostile messages ----------------------------------------------------------


def test_compressed_request(door: Daemon) -> None:
    values = np.arange(200_000) % 7
    with RawQ(port(door)) as q:
        plain = q.message([sym("demo/total"), values], SYNC)
        packed = q_compress(plain)
        assert len(packed) < len(plain) // 4 and kx.deserialize(packed).py()[0] == "demo/total"
        q.send_bytes(packed)
        assert q.recv()[1].py() == int(values.sum())
        # a compressed message whose declared size exceeds the limit is refused; the handle lives on
        bomb = bytearray(packed)
        struct.pack_into("<I", bomb, 8, 1 << 31)
        q.send_bytes(bytes(bomb))
        with pytest.raises(kx.QError, match="cruised: bad compressed message"):
            q.recv()
        assert q.call([sym("demo/add"), 1, 2]).py() == 3


def test_a_100mb_table_result(door: Daemon) -> None:
    rows = 6_600_000  # two float columns: ~105 MB on the wire
    with conn(door) as c:
        table = c(sym("demo/big"), rows)
    assert isinstance(table, kx.Table) and len(table) == rows
    df = table.pd()
    assert df["a"].iloc[-1] == rows - 1 and df["b"].sum() == rows


_fuzz_frames = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda endian, kind, comp, length, body: bytes([endian, kind, comp, 0]) + struct.pack("<I", length) + body,
        st.sampled_from([0, 1, 2]),
        st.sampled_from([0, 1, 2, 7]),
        st.sampled_from([0, 1, 3]),
        st.one_of(st.integers(0, 64), st.just(1 << 31), st.integers(0, 2**32 - 1)),
        st.binary(max_size=64),
    ),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    handshake=st.one_of(st.just(b":\x06\x00"), st.binary(max_size=40)),
    frames=st.lists(_fuzz_frames, max_size=3),
    mutate=st.one_of(st.none(), st.tuples(st.integers(0, 60), st.integers(0, 255))),
)
def test_fuzzed_frames_leave_the_listener_serving(door: Daemon, handshake: bytes, frames: list[bytes], mutate: tuple[int, int] | None) -> None:
    import socket

    good = bytearray(kx.serialize(kx.toq([sym("demo/add"), 1, 2]), mode=6, wait=SYNC).copy())
    if mutate is not None:
        good[mutate[0] % len(good)] = mutate[1]
    with socket.create_connection(("127.0.0.1", port(door)), timeout=10) as s:
        try:
            s.sendall(handshake + b"".join(frames) + bytes(good))
        except OSError:
            pass  # the daemon may close a connection it cannot trust, mid-send
    with RawQ(port(door)) as q:
        assert q.call([sym("demo/add"), 20, 22]).py() == 42


def test_fuzzed_frames_left_no_worker_or_connection_behind(door: Daemon) -> None:
    wait_for(lambda: door.status()["qipc"]["connections"] == 0, 20, what="fuzz connections to close")
    assert door.proc is not None and door.proc.poll() is None


# -- pykx.remote, unmodified --------------------------------------------------------------------


def test_pykx_remote_session_libraries_and_functions(door: Daemon) -> None:
    session = kx.remote.session("127.0.0.1", port(door), libraries={"np": "numpy"}, username="alice", password=PLAIN)
    try:

        @kx.remote.function(session)
        def spread(start, stop, n):
            return np.linspace(start, stop, n)

        @kx.remote.function(session)
        def fails(x):
            raise ValueError(f"remote says no to {x}")

        @kx.remote.function(session)
        def frame(n):
            import pandas as pd

            return pd.DataFrame({"x": list(range(n)), "y": [float(i) / 2 for i in range(n)]})

        @kx.remote.function(session)
        def calls():
            calls.n = getattr(calls, "n", 0) + 1
            return calls.n

        @kx.remote.function(session)
        def zero():
            return 7

        assert spread(0, 10, 5).np().tolist() == [0.0, 2.5, 5.0, 7.5, 10.0]
        with pytest.raises(kx.QError, match="ValueError: remote says no to 3"):
            fails(3)
        t = frame(4)
        assert isinstance(t, kx.Table) and t.pd()["y"].tolist() == [0.0, 0.5, 1.0, 1.5]
        # compiled once and cached in the (single) worker, not re-executed per call
        assert [calls().py() for _ in range(3)] == [1, 2, 3]
        assert zero().py() == 7
        with pytest.raises(kx.QError, match=r"Failed to load library 'no_such_mod_q' with alias 'zz' with error: .*No module named"):
            session.libraries({"zz": "no_such_mod_q"})
        session.libraries({"pd": "pandas"})

        @kx.remote.function(session)
        def uses_pd(n):
            return pd.Series(range(n)).sum()  # noqa: F821 - pd comes from session.libraries, in the worker

        assert uses_pd(5).py() == 10
    finally:
        session.close()


def test_pykx_2x_remote_messages(door: Daemon) -> None:
    library = '{x:string x;  @[.pykx.pyexec;"import ",x;{\'"Failed to load package: ",x," with: ",y}[x]]}'
    call = '{.pykx.pyexec "\n" sv 1_"\n" vs x; .pykx.get[y;<] . z}'
    source = b"@kx.remote.function(session)\ndef twice(x):\n    return math.floor(x * 2.5)\n"
    with conn(door, username="alice", password=PLAIN) as c:  # code needs a password login
        assert c("`pykx in key `").py() is True
        assert isinstance(c('@[system"l ",;"pykx.q";{\'"Failed to load PyKX with error: ",x}]'), kx.Identity)
        assert isinstance(c(library, sym("math")), kx.Identity)
        assert c(call, source, sym("twice"), [3]).py() == 7
        with pytest.raises(kx.QError, match="Failed to load package: no_such_mod_2 with: "):
            c(library, sym("no_such_mod_2"))


# -- the strict daemon: no loopback trust, TLS, limits, shutdown --------------------------------------


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("qstrict")
    code = write(root / "eps.py", EPS)
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    config = {
        "daemon": {"read_timeout": "1s", "max_message_bytes": "1MiB"},
        "http": {"enabled": False},
        "pools": {"default": pool_config(min=1, cruise=1, max=2)},
        "services": {"demo": {"endpoints": {n: {"code": code, "function": n} for n in ("add", "sleep")}}},
        "qipc": {
            "listen": "127.0.0.1:0",
            "users_file": write(root / "users.txt", USERS),
            "allow_loopback_without_password": False,
            "tls_cert": str(cert),
            "tls_key": str(key),
        },
    }
    d = _start(root, config)
    d.port = d.status()["qipc"]["port"]  # type: ignore[attr-defined]  # the fixture hangs the door's port and folder on the Daemon
    try:
        yield d
    finally:
        _stop(d)


def test_without_loopback_trust_every_login_needs_a_password(strict: Daemon) -> None:
    with pytest.raises(Refused):
        RawQ(port(strict), unix=True, creds=b"alice")
    with pytest.raises(Refused):
        RawQ(port(strict), unix=True, creds=b"alice:nope")
    with RawQ(port(strict), unix=True, creds=f"alice:{PLAIN}".encode()) as q:
        assert q.call([sym("demo/add"), 2, 2]).py() == 4


def test_tls_listener(strict: Daemon) -> None:
    # a pykx TLS client in a process of its own: libe fixes its TLS settings at a process's first
    # TLS connect, so an earlier test's client would decide this one's (tests/support/qtls.py)
    with pytest.raises(kx.PyKXException, match="Connection error"):
        TlsQ(port(strict), tls_env={}, username="carol", password=SHA1)  # verified by default: the throwaway certificate is not trusted
    with TlsQ(port(strict), tls_env={"KX_SSL_VERIFY_SERVER": "NO"}, username="carol", password=SHA1) as c:
        assert c("demo/add", 20, 1) == 21  # pykx's TLS client sends only string queries: a string name works too


def test_oversized_message_is_refused_and_a_stalled_one_closed(strict: Daemon) -> None:
    with RawQ(port(strict), unix=True, creds=f"bob:{MD5}".encode()) as q:
        q.send_bytes(bytes([1, SYNC, 0, 0]) + struct.pack("<I", 2 << 20))  # the header announces 2 MiB > 1 MiB
        with pytest.raises(kx.QError, match="exceeds the limit of 1048576 bytes"):
            q.recv()
        assert q.closed_by_server()
    with RawQ(port(strict), unix=True, creds=f"bob:{MD5}".encode()) as q:
        try:
            q.send([sym("demo/add"), np.zeros(200_000), 1], SYNC)  # 1.6 MB: closed while it is still sending
        except OSError:
            pass
        assert q.closed_by_server()
    with RawQ(port(strict), unix=True, creds=f"bob:{MD5}".encode()) as q:
        q.send_bytes(q.message([sym("demo/add"), 1, 2], SYNC)[:12])  # a message that never completes
        assert q.closed_by_server(timeout=20)  # daemon.read_timeout is 1s


def test_shutdown_answers_pending_calls_refuses_new_ones_then_closes(strict: Daemon) -> None:
    out: list[Any] = []

    def slow() -> None:
        with RawQ(port(strict), unix=True, creds=f"alice:{PLAIN}".encode()) as q:
            out.append(q.call([sym("demo/sleep"), 2.0]).py())

    other = RawQ(port(strict), unix=True, creds=f"alice:{PLAIN}".encode())
    t = threading.Thread(target=slow)
    t.start()
    try:
        wait_for(lambda: strict.status()["pools"]["default"]["workers"]["busy"] == 1, 20, what="the slow call to run")
        strict.signal(signal.SIGTERM)

        def refused() -> str | None:
            try:
                other.call([sym("demo/add"), 1, 1])
            except kx.QError as exc:
                return str(exc)
            return None  # not stopping yet

        assert re.fullmatch(r"cruised: shutting down" + ERROR_ID, wait_for(refused, 20, what="new calls to be refused"))
    finally:
        t.join(30)
    assert out == [2.0]  # the call that was running when SIGTERM came was answered
    assert other.closed_by_server(timeout=30)
    other.close()
    assert strict.wait_exit(30) == 0
