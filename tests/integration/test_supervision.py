"""Supervisor semantics through the real daemon: overload, deadlines, crashes, sizing, sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import cruised
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status
from support.daemon import Daemon, pool_config, wait_for
from support.raw import raw_connect, read_frame


def counts(d: Daemon, pool: str = "default") -> dict[str, int]:
    return d.status()["pools"][pool]["requests"]


def marker_fn(path: str, delay: float):
    """A call that leaves evidence that it ran, then takes ``delay`` seconds."""

    def run(tag: int) -> int:
        import time as _t

        with open(path, "a") as fh:
            fh.write(f"{tag}\n")
        _t.sleep(delay)
        return tag

    return run


def test_overflow_rejects_immediately_and_runs_exactly_queue_plus_workers(start_daemon, tmp_path: Path) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1, queue_size=2)}})
    ran = tmp_path / "ran.txt"
    fn = marker_fn(str(ran), 1.0)
    s = d.session()
    s.call(lambda: None)  # registered and warm
    outcomes: dict[int, Any] = {}
    rejected_after: list[float] = []
    start = threading.Barrier(10)

    def one(i: int) -> None:
        sess = d.session()
        start.wait()
        t0 = time.monotonic()
        try:
            outcomes[i] = sess.call(fn, i)
        except cruised.QueueFull as exc:
            rejected_after.append(time.monotonic() - t0)
            outcomes[i] = exc
        finally:
            sess.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ok = [i for i, v in outcomes.items() if v == i]
    rejected = [v for v in outcomes.values() if isinstance(v, cruised.QueueFull)]
    assert len(ok) == 3 and len(rejected) == 7, outcomes
    assert sorted(int(x) for x in ran.read_text().split()) == sorted(ok), "rejected calls never ran"
    # rejections are immediate (not after a 1s call); generous bound for a noisy 2-core CI box
    assert max(rejected_after) < 0.5, rejected_after
    assert "queue 2/2" in str(rejected[0])
    c = counts(d)
    assert c["rejected"] == 7 and c["ok"] == 4


def test_queue_timeout_fails_the_waiter_and_it_never_runs_later(start_daemon, tmp_path: Path) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, queue_timeout="300ms")}})
    ran = tmp_path / "ran.txt"
    fn = marker_fn(str(ran), 1.5)
    s = d.session()
    first = s.submit(fn, 1)
    wait_for(lambda: ran.exists(), 20, what="first call running")
    with pytest.raises(cruised.QueueTimeout, match="queue_timeout"):
        s.call(fn, 2)
    assert first.result(timeout=30) == 1
    assert s.call(lambda: "after") == "after"
    assert ran.read_text().split() == ["1"], "the timed-out request must never run"
    assert counts(d).get("queue_timeout") == 1


def test_exec_timeout_kills_the_worker_and_the_next_call_succeeds(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, exec_timeout="500ms")}, "daemon": {"kill_grace": "500ms"}})
    s = d.session()
    pid_before = s.call(os.getpid)

    def hang():
        import time as _t

        _t.sleep(60)

    t0 = time.monotonic()
    with pytest.raises(cruised.ExecutionTimeout, match=re.escape("0.5s")):
        s.call(hang)
    assert time.monotonic() - t0 < 10
    assert s.call(lambda: 5) == 5
    assert s.call(os.getpid) != pid_before, "the worker was replaced"
    wait_for(lambda: d.status()["pools"]["default"]["exits"].get("exec_timeout") == 1, 10, what="exit counted")


def test_per_call_timeout_from_the_session(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, exec_timeout="30s")}, "daemon": {"kill_grace": "200ms"}})
    s = d.session(timeout=0.3)
    with pytest.raises(cruised.ExecutionTimeout):
        s.call(time.sleep, 30)
    assert s.call(lambda: 1) == 1


def test_a_busy_loop_in_c_is_killed_too(start_daemon) -> None:
    # a call that never returns to the interpreter (C loop) still dies: SIGTERM, then SIGKILL
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, exec_timeout="500ms")}, "daemon": {"kill_grace": "300ms"}})
    s = d.session()

    def ignore_term_and_spin():
        import signal as _s

        _s.signal(_s.SIGTERM, _s.SIG_IGN)
        while True:
            pass

    with pytest.raises(cruised.ExecutionTimeout):
        s.call(ignore_term_and_spin)
    assert s.call(lambda: "alive") == "alive"


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        ("import os; os._exit(7)", "exit code 7"),
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
        ("import ctypes; ctypes.string_at(0)", "SIGSEGV"),
    ],
)
def test_a_crash_fails_only_that_call_and_the_pool_heals(start_daemon, body: str, expect: str) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=2)}})
    s, other = d.session(), d.session()
    ns: dict[str, Any] = {}
    exec(f"def crash():\n    {body}\n", ns)
    background = other.submit(time.sleep, 0.5)
    with pytest.raises(cruised.WorkerCrashed, match=expect) as info:
        s.call(ns["crash"])
    assert "not retried" in str(info.value)
    assert background.result(timeout=30) is None, "another caller's call is unaffected"
    assert s.call(lambda: 3) == 3
    c = counts(d)
    assert c.get("crashed") == 1


def test_a_worker_killed_by_an_escaping_exception_logs_its_traceback(daemon: Daemon) -> None:
    """KeyboardInterrupt is the one exception a call does not catch: the worker dies of it, and
    the daemon's log says why, tagged with the worker, not just its exit code."""
    s = daemon.session()

    def interrupted() -> None:
        raise KeyboardInterrupt("stop-7f3a")

    with pytest.raises(cruised.WorkerCrashed, match="exit code 70"):
        s.call(interrupted)
    wait_for(lambda: "KeyboardInterrupt: stop-7f3a" in daemon.log(), what="the traceback in the daemon's log")
    line = next(ln for ln in daemon.log().splitlines() if "KeyboardInterrupt: stop-7f3a" in ln)
    assert "worker=default-" in line and "output:" in line
    assert s.call(lambda: 3) == 3


def test_sys_exit_in_a_function_is_an_error_not_a_crash(daemon: Daemon) -> None:
    s = daemon.session()

    def leave():
        import sys as _s

        _s.exit(3)

    with pytest.raises(SystemExit):
        s.call(leave)
    assert s.call(lambda: 1) == 1


def test_max_requests_recycles_between_calls(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, max_requests=3)}})
    s = d.session()
    pids = [s.call(os.getpid) for _ in range(7)]
    assert len(set(pids[0:3])) == 1 and len(set(pids[3:6])) == 1 and pids[0] != pids[3] != pids[6]
    wait_for(lambda: d.status()["pools"]["default"]["exits"].get("recycled", 0) >= 2, 10, what="recycles counted")


def test_scales_up_to_max_under_load_and_back_to_cruise_when_idle(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=3, queue_size=10, idle_timeout="1s")}})
    s = d.session()
    futs = [s.submit(time.sleep, 0.6) for _ in range(6)]
    peak = wait_for(lambda: (w := d.status()["pools"]["default"]["workers"])["busy"] + w["idle"] >= 3 and w, 30, what="3 workers")
    assert peak["starting"] + peak["idle"] + peak["busy"] <= 3, "never above max"
    for f in futs:
        f.result(timeout=30)
    wait_for(
        lambda: d.status()["pools"]["default"]["workers"]["idle"] == 1 and d.status()["pools"]["default"]["exits"].get("idle") == 2, 20, what="back to cruise"
    )


def test_client_disconnect_drops_queued_and_discards_running(start_daemon, tmp_path: Path) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1)}})
    ran = tmp_path / "ran.txt"
    fn = marker_fn(str(ran), 1.0)
    leaver = d.session()
    leaver.submit(fn, 1)
    leaver.submit(fn, 2)
    leaver.submit(fn, 3)
    wait_for(lambda: ran.exists(), 20, what="first call running")
    wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 2, 10, what="two queued")
    leaver.close()
    wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 0, 10, what="queue emptied by the disconnect")
    stay = d.session()
    assert stay.call(lambda: "next") == "next"
    assert ran.read_text().split() == ["1"], "queued calls of a departed client never run"


def test_oversize_frame_gets_an_error_and_a_closed_connection_only(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"max_message_bytes": "64KiB"}})
    s = raw_connect(d.socket)
    s.sendall(frames.header(Kind.CALL, 42, 1 << 20))  # announces 1 MiB, sends nothing more
    kind, status, reqid, body = read_frame(s)
    assert (kind, status, reqid) == (Kind.REPLY, Status.BAD_REQUEST, 42)
    assert "max_message_bytes" in json.loads(body)["message"]
    assert s.recv(1) == b"", "connection closed"
    s.close()
    assert d.session().call(lambda: "fine") == "fine"
    with pytest.raises(cruised.CruisedError, match="max_message_bytes"):
        d.session().call(lambda b: len(b), b"x" * 100_000)


def test_garbage_and_malformed_frames_never_hurt_the_daemon(daemon: Daemon) -> None:
    s = raw_connect(daemon.socket)
    s.sendall(frames.frame(Kind.CALL, 7, b"\x05ab"))  # truncated call head
    _kind, status, reqid, body = read_frame(s)
    assert (status, reqid) == (Status.BAD_REQUEST, 7) and "malformed" in json.loads(body)["message"]
    s.sendall(frames.frame(99, 8))  # unknown kind: refused, connection kept
    assert read_frame(s)[1:3] == (Status.BAD_REQUEST, 8)
    s.sendall(frames.frame(Kind.PING, 9))
    assert read_frame(s)[1:3] == (Status.OK, 9)
    s.sendall(os.urandom(64))  # garbage header: refused and closed
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    s.close()
    assert daemon.session().call(lambda: 1) == 1


def test_socket_mode_stale_socket_and_live_daemon(start_daemon, tmp_path: Path) -> None:
    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"socket_mode": "0600"}})
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    # a second daemon on the same path: clear error, exit 2, the first keeps serving
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pools: {default: {min: 1, cruise: 1, max: 1}}\n")
    env = dict(os.environ, CRUISED_SOCKET=d.socket)
    second = subprocess.run([sys.executable, "-m", "cruised", "serve", "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=60)
    assert second.returncode == 2 and "already listening" in second.stderr
    assert d.session().call(lambda: 1) == 1
    # a stale socket file (nobody listening) is replaced
    d.stop()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(d.socket)
    stale.close()
    assert os.path.exists(d.socket)
    d.start()
    assert d.session().call(lambda: 2) == 2
    # something that is not a socket is never removed
    d.stop()
    Path(d.socket).write_text("not a socket")
    third = subprocess.run([sys.executable, "-m", "cruised", "serve", "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=60)
    assert third.returncode == 2 and "not a socket" in third.stderr
    assert Path(d.socket).read_text() == "not a socket"


def test_preload_failure_is_reported_and_retried_with_backoff(start_daemon, tmp_path: Path) -> None:
    init = tmp_path / "init.py"
    init.write_text("raise RuntimeError('database unreachable at init')\n")
    d = start_daemon({"pools": {"default": pool_config(), "bad": pool_config(init=str(init))}}, wait_ready=False)
    wait_for(lambda: d.status()["pools"]["default"]["ready"], 60, what="good pool ready")

    def reported() -> dict[str, Any] | None:
        bad = d.status()["pools"]["bad"]
        return bad if bad["last_error"] and "database unreachable" in bad["last_error"] else None

    bad = wait_for(reported, 30, what="preload error in status")
    assert not bad["ready"]
    assert d.session().call(lambda: "good pool unaffected") == "good pool unaffected"
    status_cli = d.cli("status")
    assert "database unreachable" in status_cli.stdout
    # backoff: attempts are spaced out, not a tight crash loop
    wait_for(lambda: d.status()["pools"]["bad"]["exits"].get("preload_failed", 0) >= 2, 30, what="a retry")
    n = d.status()["pools"]["bad"]["exits"]["preload_failed"]
    assert n < 10, f"{n} attempts in a few seconds is a crash loop"
    assert "database unreachable" in d.log()
    # a bad library import is reported the same way
    d2 = start_daemon({"pools": {"default": pool_config(libraries={"nope": "no_such_lib_abc"})}}, wait_ready=False)
    wait_for(lambda: "no_such_lib_abc" in (d2.status()["pools"]["default"]["last_error"] or ""), 30, what="library error")


def test_init_file_and_pool_libraries_are_visible_to_functions(start_daemon, tmp_path: Path) -> None:
    init = tmp_path / "init.py"
    init.write_text("import math\nGREETING = 'hi from init'\ndef twice(x):\n    return 2 * x\n")
    d = start_daemon({"pools": {"default": pool_config(libraries={"np": "numpy"}, init=str(init))}})
    s = d.session()
    assert s.call(lambda: (GREETING, twice(21), int(np.sum([1, 2])))) == ("hi from init", 42, 3)  # noqa: F821 - GREETING, twice and np come from the pool's init file and libraries


def test_status_cli_text_and_json(daemon: Daemon) -> None:
    daemon.session().call(lambda: 1)
    text = daemon.cli("status")
    assert text.returncode == 0 and "default" in text.stdout and "queue" in text.stdout
    data = json.loads(daemon.cli("status", "--json").stdout)
    pool = data["pools"]["default"]
    assert pool["queue"]["capacity"] == 16 and pool["requests"]["ok"] >= 1
    assert set(pool["workers"]) >= {"starting", "idle", "busy", "draining"}
    down = daemon.cli("--socket", "/tmp/definitely-not-here.sock", "status")
    assert down.returncode == 1 and "cruised serve" in down.stderr


def test_worker_output_is_tagged_in_the_log(daemon: Daemon) -> None:
    def talk():
        import sys as _s

        print("hello from a function")
        print("to stderr", file=_s.stderr)

    daemon.session().call(talk)
    wait_for(lambda: "output: hello from a function" in daemon.log() and "output: to stderr" in daemon.log(), 10, what="tagged output")
    line = next(ln for ln in daemon.log().splitlines() if "hello from a function" in ln)
    assert "worker=default-" in line


def test_sigterm_stops_cleanly_and_removes_the_socket(daemon: Daemon) -> None:
    daemon.session().call(lambda: 1)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(30) == 0
    assert not os.path.exists(daemon.socket)


def test_a_client_that_stalls_mid_frame_is_cut_off(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"read_timeout": "500ms"}})
    s = raw_connect(d.socket)
    s.sendall(frames.header(Kind.CALL, 5, 100)[:10])  # half a header, then silence
    _kind, status, _reqid, body = read_frame(s)
    assert status == Status.BAD_REQUEST and "read_timeout" in json.loads(body)["message"]
    assert s.recv(1) == b""
    big = raw_connect(d.socket)
    big.sendall(frames.header(Kind.CALL, 6, 1 << 20) + b"x" * 1000)  # a large frame that stops
    assert "read_timeout" in json.loads(read_frame(big)[3])["message"]
    assert d.session().call(lambda: "still serving") == "still serving"


def test_sigusr1_logs_memory_diagnostics(daemon: Daemon) -> None:
    daemon.session().call(lambda: 1)
    daemon.signal(signal.SIGUSR1)
    wait_for(lambda: "memory: " in daemon.log() and "after malloc_trim" in daemon.log(), 10, what="memory lines in the log")
    line = next(ln for ln in daemon.log().splitlines() if "top types:" in ln)
    assert "objects; top types: " in line and "=" in line
    assert daemon.session().call(lambda: 2) == 2, "the daemon keeps serving"
