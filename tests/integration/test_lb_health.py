"""The load balancer's contract through the real daemon: /livez and /readyz, drain and ready, the HAProxy agent.

Calls are held in place with gate files, so "in flight when the drain
starts" is checked through the drain report, not guessed. Every door is
tried: native (``Draining``), HTTP on its Unix socket and TCP, on the fast
path (a fresh connection's first POST) and through aiohttp (a connection
handed over by a GET first), and the q door (a q error string).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import cruised
from cruised.client.http import Response, Target, run_path
from cruised.pool.wire.frames import Kind, Status
from support.daemon import Daemon, pool_config, wait_for
from support.httphelp import call, error_of, get, persistent, tcp, unix, write

KEY = "k-lb-1234567890"

EPS = """
import os
import time


def add(a, b):
    return a + b


def held(gate):
    while not os.path.exists(gate):
        time.sleep(0.005)
    return "held"
"""


def wait_for_file(path: str, tag: str) -> str:
    import time

    while not os.path.exists(path):
        time.sleep(0.005)
    return tag


def add(x: int, y: int) -> int:
    return x + y


def agent(d: Daemon) -> str:
    """One agent-check exchange, as HAProxy makes it: connect, read the line until the close."""
    host, _, port = d.status()["agent"]["listen"].rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        data = b""
        while chunk := s.recv(256):
            data += chunk
    return data.decode()


def lb_config(tmp_path: Path, **pool: Any) -> dict[str, Any]:
    return {
        "daemon": {"shutdown_grace": "60s"},
        "pools": {"default": pool_config(**{"min": 1, "cruise": 1, "max": 1, "queue_size": 8, "queue_timeout": "60s", **pool})},
        "services": {"t": {"api_keys": [KEY], "endpoints": {n: {"code": write(tmp_path / "eps.py", EPS), "function": n} for n in ("add", "held")}}},
        "http": {"listen": "127.0.0.1:0"},
        "qipc": {"listen": "127.0.0.1:0", "unix": False},
        "health": {"agent": "127.0.0.1:0"},
    }


def post(conn: Any, name: str, body: bytes) -> Response:
    """An endpoint call on an open keep-alive connection (http.client's plain POST: the fast path, unless handed over)."""
    service, endpoint = name.split("/")
    conn.request("POST", run_path(service, endpoint), body=body, headers={"Authorization": f"Bearer {KEY}"})
    resp = conn.getresponse()
    return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())


def q_add(d: Daemon) -> Any:
    from support.qraw import RawQ, kx, sym

    with RawQ(int(d.status()["qipc"]["port"])) as q:
        try:
            return int(q.call([sym("t/add"), 20, 22]).py())
        except kx.QError as exc:
            return str(exc)


def drained_calls_refused_everywhere(d: Daemon, targets: list[Target]) -> None:
    """A new call on every door and both HTTP paths is refused with the drain's own error."""
    with d.session() as s, pytest.raises(cruised.Draining, match="draining"):
        s.call(add, 1, 1)
    for target in targets:
        fresh = call(target, "t/add", {"a": 1, "b": 2}, headers={"Authorization": f"Bearer {KEY}"})  # fast path
        assert fresh.status == 503 and error_of(fresh)["errorType"] == "Draining", fresh.body
        assert fresh.headers.get("retry-after") == "1"
        conn = persistent(target)
        try:
            conn.request("GET", "/livez")  # hands the connection to aiohttp
            live = conn.getresponse()
            assert live.status == 200 and live.read()
            handed = post(conn, "t/add", b'{"a": 1, "b": 2}')
            assert handed.status == 503 and error_of(handed)["errorType"] == "Draining", handed.body
        finally:
            conn.close()
    assert "draining" in q_add(d)


def test_probes_need_no_key_on_the_unix_socket_and_tcp_on_both_paths(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(lb_config(tmp_path))
    for target in (unix(d), tcp(d)):  # over TCP without a key: the probes reveal nothing a call could not
        live = get(target, "/livez")
        assert live.status == 200 and live.json()["status"] == "alive"
        ready = get(target, "/readyz")
        assert ready.status == 200 and ready.json() == {"ready": True, "draining": False}
        conn = persistent(target)  # a keep-alive connection that served a call on the fast path first
        try:
            assert post(conn, "t/add", b'{"a": 2, "b": 3}').json()["response"] == 5
            conn.request("GET", "/readyz")  # hands it to aiohttp
            probe = conn.getresponse()
            assert probe.status == 200 and probe.read()
            assert post(conn, "t/add", b'{"a": 1, "b": 1}').json()["response"] == 2
        finally:
            conn.close()
    assert get(tcp(d), "/status").status == 401, "status still needs a key over TCP"
    assert agent(d) == "up ready maxconn:1\n"


def test_drain_finishes_in_flight_work_refuses_new_work_and_ready_resumes(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(lb_config(tmp_path))
    gate = str(tmp_path / "gate")
    targets = [unix(d), tcp(d, KEY)]
    with d.session() as s:
        running = s.submit(wait_for_file, gate, "ran")  # holds the pool's only worker
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, what="the worker busy")
        queued: list[Response] = []
        http_call = threading.Thread(target=lambda: queued.append(call(targets[1], "t/held", {"gate": gate}, timeout=120)))
        http_call.start()
        try:
            wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 1, what="an HTTP call queued")

            out = d.cli("drain")
            assert out.returncode == 0 and out.stdout.strip() == "draining: 1 queued, 1 running", out
            drained_calls_refused_everywhere(d, targets)
            for target in targets:
                ready = get(target, "/readyz")
                assert ready.status == 503 and ready.json()["draining"] is True and "draining" in ready.json()["reasons"][0]
                assert get(target, "/livez").status == 200
            assert agent(d) == "drain\n"
            assert "cruised_draining 1.0" in d.cli("metrics").stdout
            st = d.status()
            assert st["draining"] is True and st["drain"] == {"draining": True, "state": "draining", "queued": 1, "running": 1}
            assert "DRAINING" in d.cli("status").stdout

            timed_out = d.cli("drain", "--wait", "--timeout", "0.3")
            assert timed_out.returncode == 1 and "timed out after 0.3s" in timed_out.stderr, timed_out
            waiter = subprocess.Popen(
                [sys.executable, "-m", "cruised", "drain", "--wait", "--timeout", "120"], env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            try:
                # its first report is taken while both calls are held: "drained" at the end means it polled until they finished
                wait_for(lambda: f"drain started by client pid={waiter.pid} " in d.log(), 60, 0.02, "drain --wait to ask the daemon")
                Path(gate).touch()
                assert running.result(timeout=60) == "ran"
                http_call.join(60)
                assert queued and queued[0].status == 200 and queued[0].json()["response"] == "held"
                stdout, stderr = waiter.communicate(timeout=60)
            finally:
                if waiter.poll() is None:
                    waiter.kill()
                    waiter.wait()
            assert waiter.returncode == 0 and stdout.strip() == "drained: 0 queued, 0 running", (stdout, stderr)
        finally:
            Path(gate).touch()
            http_call.join(60)

        out = d.cli("ready")
        assert out.returncode == 0 and out.stdout.strip() == "serving: 0 queued, 0 running", out
        assert s.call(add, 1, 1) == 2
    for target in targets:
        assert call(target, "t/add", {"a": 1, "b": 2}).json()["response"] == 3
        assert get(target, "/readyz").status == 200
    assert q_add(d) == 42
    assert agent(d) == "up ready maxconn:1\n"
    assert "cruised_draining 0.0" in d.cli("metrics").stdout
    assert d.status()["draining"] is False


def test_a_reload_keeps_the_drain_and_sigterm_still_stops(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(lb_config(tmp_path))
    first = d.status()["generation"]
    with d.session() as s:
        for bad in (b'{"drain": 1}', b"[true]", b"{not json"):
            status, frame = s._request(Kind.DRAIN, [bad])  # the CLI never sends these
            assert status == Status.BAD_REQUEST and (b"DRAIN payload" in frame or b"malformed request" in frame), (bad, bytes(frame))
        assert s.drain() == {"draining": False, "state": "serving", "queued": 0, "running": 0}, "asking changes nothing"
    assert d.cli("drain").returncode == 0
    out = d.cli("reload")
    assert out.returncode == 0, out
    assert d.status()["generation"] == first + 1
    with d.session() as s, pytest.raises(cruised.Draining):
        s.call(add, 1, 1)
    assert get(unix(d), "/readyz").status == 503 and agent(d) == "drain\n"
    assert d.cli("ready").returncode == 0
    with d.session() as s:
        assert s.call(add, 2, 2) == 4
    assert d.cli("drain").returncode == 0
    d.signal(signal.SIGTERM)
    assert d.wait_exit(60) == 0
    assert "stopped" in d.log()


def test_before_the_pool_is_warm_readyz_is_503_and_the_agent_says_down(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    gate = tmp_path / "warm"
    init = write(tmp_path / "init.py", f"import os, time\nwhile not os.path.exists({str(gate)!r}):\n    time.sleep(0.01)\n")
    d = start_daemon(lb_config(tmp_path, min=2, cruise=2, max=2, init=init), wait_ready=False)
    wait_for(lambda: d.status()["agent"] is not None, 60, 0.05, "the agent listening")
    assert agent(d) == "down\n"
    ready = get(unix(d), "/readyz")
    assert ready.status == 503 and "0/2 warm workers" in " ".join(ready.json()["reasons"])
    assert get(unix(d), "/livez").status == 200
    gate.touch()
    d.wait_ready()
    wait_for(lambda: agent(d) == "up ready maxconn:2\n", 30, 0.05, "the agent to count both warm workers")
    assert get(unix(d), "/readyz").status == 200
