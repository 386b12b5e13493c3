"""The per-worker q connection, through the real daemon against tests/support/qserver.py.

Each test starts a kdb+ IPC test server (a real wire-protocol peer; pykx in
the workers talks to it unlicensed) and a daemon whose pool has a ``q:``
section, then drives shipped functions through the client. Handshakes are
counted from the server's record file, so "one connection per worker" and
"no tight retry loop" are checked on the server side, not inferred.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("PYKX_UNLICENSED", "true")  # the client unpickles pykx results: no licence probe

import pandas as pd
import pykx as kx

import cruised
from support.daemon import Daemon, pool_config, wait_for
from support.qserver import QServer, make_trade, run_qserver

PW = "pw-7f3a-not-in-any-log"
# pykx's own KeyedTable.pd() uses set_index(inplace=True), which pandas 3.1 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:The inplace keyword in DataFrame.set_index")


def q_section(port: int, **overrides: Any) -> dict[str, Any]:
    q: dict[str, Any] = {
        "port": port,
        "username": "alice",
        "password": PW,
        "timeout": "10s",
        "reconnect": {"initial": "50ms", "max": "400ms"},
    }
    q.update(overrides)
    return q


def q_pool(port: int, workers: int = 2, **q_overrides: Any) -> dict[str, Any]:
    return pool_config(min=workers, cruise=workers, max=workers, q=q_section(port, **q_overrides))


def pool_status(d: Daemon, pool: str = "default") -> dict[str, Any]:
    return d.status()["pools"][pool]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def qsrv() -> Iterator[QServer]:
    with run_qserver("--user", f"alice:{PW}", "--unix") as s:
        yield s


def ok_handshakes(srv: QServer) -> list[dict[str, Any]]:
    return [h for h in srv.handshakes() if h["ok"]]


def test_each_worker_holds_one_connection_across_many_calls(start_daemon: Any, qsrv: QServer) -> None:
    pools = {"default": q_pool(qsrv.port, password=None, password_env="CRUISED_TEST_Q_PW"), "plain": pool_config()}
    d = start_daemon({"pools": pools}, env={"CRUISED_TEST_Q_PW": PW})
    wait_for(lambda: pool_status(d)["q"]["connected"] == 2, what="both workers connected")
    s = d.session()

    @cruised.function(s)
    def add(i):
        import os

        return os.getpid(), q("{x+y}", i, 1).py()  # noqa: F821 - the worker's q global

    results = list(s.map(add, range(60)))
    assert [r for _, r in results] == [i + 1 for i in range(60)]
    pids = {pid for pid, _ in results}
    assert 1 <= len(pids) <= 2
    st = pool_status(d)
    assert st["exits"] == {} and st["requests"]["ok"] == 60
    hs = qsrv.handshakes()
    assert len(hs) == 2 and all(h["ok"] and h["user"] == "alice" for h in hs)  # one per worker, held
    assert st["q"] == {"endpoint": f"127.0.0.1:{qsrv.port}", "user": "alice", "required": False, "connected": 2, "workers": 2, "last_error": None}
    assert all(w["q"] == {"connected": True, "error": None} for w in st["worker_list"])
    assert s.call(lambda: q(".cruised.test.users").py()) == ["alice"]  # noqa: F821 - the worker's q global
    # nothing in a worker can wait on a terminal: stdin is /dev/null, pykx runs non-interactively
    env_stdin = s.call(lambda: (os.readlink("/proc/self/fd/0"), os.environ.get("PYKX_UNLICENSED"), "pykx" in sys.modules))
    assert env_stdin == ("/dev/null", "true", True)
    # a pool without q: no connection, no q global, pykx never imported
    plain = d.session(pool="plain")
    assert plain.call(lambda: ("pykx" in sys.modules, "q" in globals())) == (False, False)
    assert pool_status(d, "plain")["q"] is None and len(qsrv.handshakes()) == 2
    out = d.cli("status")
    assert out.returncode == 0 and f"q 127.0.0.1:{qsrv.port}: 2/2 workers connected" in out.stdout


def test_q_in_init_code_and_functions_with_pykx_values_both_ways(start_daemon: Any, qsrv: QServer, tmp_path: Path) -> None:
    init = tmp_path / "init.py"
    init.write_text("TRADE_ROWS = len(q('trade'))\nVWAP = q('vwap')\n")
    pw = tmp_path / "q.pw"
    pw.write_text(PW + "\n")
    pool = q_pool(qsrv.port, workers=1, password=None, password_file=str(pw))
    pool["init"] = str(init)
    d = start_daemon({"pools": {"default": pool}})
    s = d.session()

    assert s.call(lambda: TRADE_ROWS) == 1000  # noqa: F821 - defined by the init file with q
    by_init = s.call(lambda: VWAP)  # noqa: F821 - the worker's q global
    assert isinstance(by_init, kx.KeyedTable)

    @cruised.function(s)
    def vwap_by_sym():
        return q("vwap")  # noqa: F821 - the worker's q global

    result = vwap_by_sym()
    assert isinstance(result, kx.KeyedTable)  # a pykx object reaches the client as one
    t = make_trade()
    expected = (t.price * t["size"]).groupby(t.sym).sum() / t["size"].groupby(t.sym).sum()
    got = result.pd()["vwap"]
    assert list(got.index) == sorted(expected.index)
    assert got.to_numpy() == pytest.approx(expected.sort_index().to_numpy())
    pd.testing.assert_frame_equal(result.pd(), by_init.pd())

    # pykx values as arguments, passed on to q and back
    vec = kx.LongVector(pd.Series([1, 2, 3]).to_numpy())
    back = s.call(lambda v, n: q("{x+y}", v, n), vec, 10)  # noqa: F821 - the worker's q global
    assert isinstance(back, kx.LongVector) and back.py() == [11, 12, 13]
    aapl = s.call(lambda: q("select from trade where sym=`AAPL"))  # noqa: F821 - the worker's q global
    assert isinstance(aapl, kx.Table) and set(aapl.pd()["sym"]) == {"AAPL"}
    # q's own errors are the function's errors, and leave the connection alone
    with pytest.raises(kx.QError, match="boom"):
        s.call(lambda: q("err", b"boom"))  # noqa: F821 - the worker's q global
    assert s.call(lambda: q("1+1").py()) == 2  # noqa: F821 - the worker's q global
    assert len(qsrv.handshakes()) == 1


def test_the_documented_vwap_example(start_daemon: Any, qsrv: QServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/kdb.md's example, run verbatim against the test server."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "kdb.md").read_text()
    block = doc.split("<!-- example: vwap", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    d = start_daemon({"pools": {"default": q_pool(qsrv.port, workers=1)}})
    monkeypatch.setenv("CRUISED_SOCKET", d.socket)  # what `cruised.session()` finds by default
    ns: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(block, "docs/kdb.md", "exec"), ns)
    table = ns["table"]
    assert isinstance(table, kx.KeyedTable)
    t = make_trade()
    aapl = t[t.sym == "AAPL"]
    expected = float((aapl.price * aapl["size"]).sum() / aapl["size"].sum())
    assert table.pd().loc["AAPL", "vwap"] == pytest.approx(expected)
    assert ns["vwap_in_python"]("AAPL") == pytest.approx(expected)


def uses_module_q() -> str:
    return repr(q)  # noqa: F821 - a module global only while the test below runs


def test_a_local_pykx_connection_named_q_is_replaced_by_the_workers(start_daemon: Any, qsrv: QServer) -> None:
    """Code developed against a local ``q = pykx.SyncQConnection(...)`` ships unchanged."""
    d = start_daemon({"pools": {"default": q_pool(qsrv.port, workers=1)}})
    # a module global, as in a user's script; bound only for this test, or every other function
    # shipped from this module would carry it
    globals()["q"] = kx.SyncQConnection("127.0.0.1", qsrv.port, username="alice", password=PW, no_ctx=True, timeout=10.0)
    try:
        assert d.session().call(uses_module_q).startswith(f"<cruised q handle 127.0.0.1:{qsrv.port}")
    finally:
        globals().pop("q").close()


def test_server_killed_mid_call_then_restarted(start_daemon: Any, qsrv: QServer) -> None:
    d = start_daemon({"pools": {"default": q_pool(qsrv.port, workers=1)}})
    s = d.session()
    pid = s.call(os.getpid)

    def slow():
        q("incr", "started")  # noqa: F821 - the worker's q global
        return q("sleep", 30.0)  # noqa: F821 - the worker's q global

    fut = s.submit(slow)
    with kx.SyncQConnection("127.0.0.1", qsrv.port, username="alice", password=PW, no_ctx=True, timeout=10.0) as probe:
        wait_for(lambda: probe(".cruised.test.count", "started").py() == 1, what="the slow query to reach q")
    qsrv.stop()  # q dies while the worker waits for its reply
    with pytest.raises(cruised.QConnectionError, match="lost the connection to q") as info:
        fut.result(timeout=30)
    assert "not re-sent" in str(info.value)
    # the worker survived, noticed, and says so; a call while q is down fails fast and cleanly
    wait_for(lambda: pool_status(d)["q"]["connected"] == 0, what="q shown disconnected")
    assert s.call(os.getpid) == pid
    with pytest.raises(cruised.QConnectionError, match=f"127.0.0.1:{qsrv.port}"):
        s.call(lambda: q("1+1"))  # noqa: F821 - the worker's q global
    qsrv.start()  # same port
    # it reconnects by itself, with no call to trigger it
    wait_for(lambda: pool_status(d)["q"]["connected"] == 1, what="background reconnect")
    assert s.call(lambda: q("1+1").py()) == 2  # noqa: F821 - the worker's q global
    assert s.call(os.getpid) == pid
    st = pool_status(d)
    assert st["exits"] == {} and st["requests"]["q_unavailable"] == 2
    assert "connection" in (st["q"]["last_error"] or "")
    assert f"q 127.0.0.1:{qsrv.port}: 1/1 workers connected, 2 calls failed on q" in d.cli("status").stdout


def test_a_query_whose_reply_is_lost_is_not_resent(start_daemon: Any, qsrv: QServer) -> None:
    d = start_daemon({"pools": {"default": q_pool(qsrv.port, workers=1)}})
    s = d.session()
    with pytest.raises(cruised.QConnectionError, match="may or may not have run"):
        s.call(lambda: q("incr", "n", "close"))  # noqa: F821 - q counts it, then hangs up

    def caught():
        try:
            q("incr", "n", "close")  # noqa: F821 - the worker's q global
        except q.QConnectionError as exc:  # noqa: F821 - catchable in shipped code too
            return "caught: " + str(exc)

    assert s.call(caught).startswith("caught: lost the connection")
    assert s.call(lambda: q(".cruised.test.count", "n").py()) == 2  # noqa: F821 - each ran exactly once
    assert len(ok_handshakes(qsrv)) == 3  # the first connection and one per loss
    assert pool_status(d)["exits"] == {}


def test_q_down_at_start_then_up(start_daemon: Any) -> None:
    port = free_port()
    d = start_daemon({"pools": {"default": q_pool(port, workers=2)}})  # ready: q is not required
    st = pool_status(d)
    assert st["ready"] and st["q"]["connected"] == 0 and st["q"]["workers"] == 2
    assert st["q"]["last_error"].startswith(f"cannot connect to q at 127.0.0.1:{port}")
    s = d.session()
    with pytest.raises(cruised.QConnectionError, match=f"127.0.0.1:{port}"):
        s.call(lambda: q("1+1"))  # noqa: F821 - the worker's q global
    assert s.call(lambda: 1 + 1) == 2  # the pool works for code that does not need q
    with run_qserver("--port", str(port), "--user", f"alice:{PW}") as srv:
        wait_for(lambda: pool_status(d)["q"]["connected"] == 2, what="workers to connect by themselves")
        assert s.call(lambda: q("til 3").py()) == [0, 1, 2]  # noqa: F821 - the worker's q global
        assert len(ok_handshakes(srv)) == 2
    assert pool_status(d)["exits"] == {}


def test_required_q_holds_readiness_until_every_warm_worker_is_connected(start_daemon: Any) -> None:
    port = free_port()
    d = start_daemon({"pools": {"default": q_pool(port, workers=2, required=True)}}, wait_ready=False)
    wait_for(lambda: pool_status(d)["workers"]["idle"] == 2, what="workers warm")
    st = d.status()
    assert st["state"] == "starting" and not st["pools"]["default"]["ready"]
    out = d.cli("status")
    assert "0/2 workers connected, required" in out.stdout and f"cannot connect to q at 127.0.0.1:{port}" in out.stdout
    with run_qserver("--port", str(port), "--user", f"alice:{PW}"):
        d.wait_ready()
        assert d.status()["state"] == "ready"
    # q gone again: the pool is no longer ready (what /readyz reports), the daemon keeps serving
    wait_for(lambda: not pool_status(d)["ready"], what="pool unready without q")
    assert d.session().call(lambda: "still serving") == "still serving"


def test_bad_credentials_clear_error_and_bounded_retries(start_daemon: Any, qsrv: QServer) -> None:
    wrong = "wrong-" + PW
    d = start_daemon({"pools": {"default": q_pool(qsrv.port, workers=1, password=wrong, reconnect={"initial": "100ms", "max": "400ms"})}})
    expected = f"q at 127.0.0.1:{qsrv.port} rejected the credentials of user 'alice'"
    assert pool_status(d)["q"]["last_error"] == expected
    s = d.session()
    for _ in range(20):  # calls during the backoff fail at once and do not hit q
        with pytest.raises(cruised.QConnectionError) as info:
            s.call(lambda: q("1+1"))  # noqa: F821 - the worker's q global
        assert "rejected the credentials of user 'alice'" in str(info.value)
        assert wrong not in str(info.value) and PW not in str(info.value)
    wait_for(lambda: len(qsrv.handshakes()) >= 6, what="a few retries")
    hs = qsrv.handshakes()
    assert not any(h["ok"] for h in hs) and all(h["user"] == "alice" for h in hs)
    # attempts follow the backoff: 100, 200, 400, 400 ms apart at least (a slow machine only
    # stretches that; the slack covers the server stamping one handshake late)
    span = hs[5]["t"] - hs[1]["t"]
    assert span >= 1.4 - 0.3, [h["t"] - hs[0]["t"] for h in hs]
    # the secret appears nowhere: not in the log, the status, or the CLI
    status_json = d.cli("status", "--json").stdout
    for text in (d.log(), status_json, json.dumps(d.status())):
        assert wrong not in text and PW not in text
    assert expected in d.log()


def test_password_never_appears_with_good_credentials(start_daemon: Any, qsrv: QServer) -> None:
    d = start_daemon({"pools": {"default": q_pool(qsrv.port, workers=1)}}, args=["--log-level", "debug"])
    s = d.session()
    assert s.call(lambda: q("1+1").py()) == 2  # noqa: F821 - the worker's q global
    with pytest.raises(cruised.QConnectionError) as info:
        s.call(lambda: q("incr", "x", "close"))  # noqa: F821 - the worker's q global
    assert s.call(lambda: repr(q)).startswith("<cruised q handle")  # noqa: F821 - the worker's q global
    for text in (d.log(), d.cli("status", "--json").stdout, str(info.value), d.cli("check-config", str(d.config_path)).stdout):
        assert PW not in text


def test_unix_domain_socket(start_daemon: Any, qsrv: QServer) -> None:
    d = start_daemon({"pools": {"default": q_pool(qsrv.port, workers=1, unix=True, host="ignored.invalid")}})
    s = d.session()
    assert s.call(lambda: q("til 2").py()) == [0, 1]  # noqa: F821 - the worker's q global
    assert pool_status(d)["q"]["endpoint"] == f"unix:/tmp/kx.{qsrv.port}"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI for a throwaway certificate")
def test_tls_with_ca_file_and_with_verification_off(start_daemon: Any, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with run_qserver("--tls", str(cert), str(key), "--user", f"alice:{PW}") as srv:
        one = {"min": 1, "cruise": 1, "max": 1}
        d = start_daemon(
            {
                "pools": {
                    "verified": pool_config(**one, q=q_section(srv.port, tls=True, tls_ca_file=str(cert))),
                    "unverified": pool_config(**one, q=q_section(srv.port, tls=True, tls_verify=False)),
                    "untrusted": pool_config(**one, q=q_section(srv.port, tls=True, reconnect={"initial": "5s", "max": "5s"})),
                }
            },
        )
        for pool in ("verified", "unverified"):
            s = d.session(pool=pool)
            assert s.call(lambda: q("til 3").py()) == [0, 1, 2], pool  # noqa: F821 - the worker's q global
        st = d.status()["pools"]
        assert st["verified"]["q"]["connected"] == 1 and st["unverified"]["q"]["connected"] == 1
        assert st["untrusted"]["q"]["connected"] == 0
        assert st["untrusted"]["q"]["last_error"].startswith(f"cannot connect to q at 127.0.0.1:{srv.port}")
        # tls_verify (true by default) decides, not a KX_SSL_VERIFY_SERVER=NO the daemon inherits
        untrusted = {"untrusted": pool_config(**one, q=q_section(srv.port, tls=True, reconnect={"initial": "5s", "max": "5s"}))}
        inherited = start_daemon({"pools": untrusted}, env={"KX_SSL_VERIFY_SERVER": "NO"})
        qst = wait_for(
            lambda: (lambda p: p if p["last_error"] or p["connected"] else None)(inherited.status()["pools"]["untrusted"]["q"]), what="a first connect attempt"
        )
        assert qst["connected"] == 0 and qst["last_error"].startswith(f"cannot connect to q at 127.0.0.1:{srv.port}")


def test_an_operator_chosen_licensed_mode_is_left_alone(start_daemon: Any, qsrv: QServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """PYKX_LICENSED in the pool's env is passed through, not overridden to unlicensed."""
    monkeypatch.delenv("PYKX_UNLICENSED", raising=False)  # the daemon inherits this process's env
    pool = q_pool(qsrv.port, workers=1)
    pool["env"] = {"PYKX_LICENSED": "true"}
    d = start_daemon({"pools": {"default": pool}}, wait_ready=False)
    st = wait_for(lambda: (lambda p: p if p["ready"] or p["last_error"] else None)(pool_status(d)), what="licensed start or its failure")
    if st["ready"]:  # a machine with a kdb+ licence: licensed pykx, and q works
        assert d.session().call(lambda: (__import__("pykx").licensed, q("1+1").py())) == (True, 2)  # noqa: F821 - the worker's q global
    else:  # no licence here: pykx's own error, reported rather than prompted for
        assert "cannot import 'pykx'" in st["last_error"] and "licen" in st["last_error"].lower()


def test_the_commented_q_block_in_config_yaml_is_valid(tmp_path: Path) -> None:
    from cruised import config

    text = (Path(__file__).resolve().parents[2] / "config.yaml").read_text()
    assert "    # q:\n" in text
    enabled = text.replace("    # q:\n", "    q:\n").replace("    #   ", "      ")
    (tmp_path / "q.pw").write_text("secret\n")
    (tmp_path / "config.yaml").write_text(enabled)
    shutil.copytree(Path(__file__).resolve().parents[2] / "examples", tmp_path / "examples")  # the demo service's code
    q = config.load(tmp_path / "config.yaml").pools["default"].q
    assert q is not None and q.port == 5010 and q.password_file == str(tmp_path / "q.pw")
    assert q.reconnect.initial == 0.5 and q.reconnect.max == 30 and not q.required


def test_config_errors_for_the_q_section(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        textwrap.dedent(
            """
            pools:
              default:
                q:
                  password: a
                  password_env: B
                  timeout: 0
            """
        )
    )
    proc = subprocess.run([sys.executable, "-m", "cruised", "check-config", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        f"{bad}: pools.default.q.port: is required (the port q listens on)",
        f"{bad}: pools.default.q.password_env: give only one of password, password_file, password_env (also set: password)",
        f"{bad}: pools.default.q.timeout: must be positive, got 0.0",
    ]


def test_q_in_endpoints_over_http_json_rule_502_and_readyz(start_daemon, qsrv: QServer, tmp_path: Path) -> None:
    """The q global in endpoint modules, pykx results as JSON over HTTP, and q outages as 502s."""
    from support.httphelp import call, error_of, get, unix

    code = tmp_path / "vwap.py"
    code.write_text(
        textwrap.dedent(
            """
            BY_SYM = q('select vwap:size wavg price by sym from trade')   # module code sees q too, at load

            def vwap(sym):
                return q('select from trade where sym=`' + sym)

            def syms():
                return BY_SYM
            """
        )
    )
    cfg = {
        "pools": {"default": pool_config(min=1, cruise=1, max=1, q=q_section(qsrv.port, required=True))},
        "services": {"k": {"endpoints": {"vwap": {"code": str(code), "function": "vwap"}, "syms": {"code": str(code), "function": "syms"}}}},
    }
    d = start_daemon(cfg)
    target = unix(d)
    assert get(target, "/readyz").status == 200
    by_sym = json.loads(call(target, "k/syms").body)["response"]
    # a keyed q table -> a list of records, the key columns included
    assert {r["sym"] for r in by_sym} >= {"AAPL", "MSFT"} and all(isinstance(r["vwap"], float) for r in by_sym)
    rows = json.loads(call(target, "k/vwap", {"sym": "AAPL"}).body)["response"]
    # a table -> records; timestamps -> ISO strings
    assert rows and all(r["sym"] == "AAPL" for r in rows) and isinstance(rows[0]["time"], str) and "T" in rows[0]["time"]
    qsrv.stop()
    resp = call(target, "k/vwap", {"sym": "AAPL"})
    assert resp.status == 502, resp.body
    assert error_of(resp)["errorType"] == "QConnectionError"
    # required: q down -> the pool is not ready, and /readyz says 503
    wait_for(lambda: get(target, "/readyz").status == 503, 30, what="/readyz 503 while q is down")
    qsrv.restart()
    wait_for(lambda: get(target, "/readyz").status == 200, 30, what="/readyz 200 after q is back")
    assert json.loads(call(target, "k/vwap", {"sym": "AAPL"}).body)["response"][0]["sym"] == "AAPL"
