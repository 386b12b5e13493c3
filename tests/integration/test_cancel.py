"""Interrupting and cancelling calls through the real daemon (README: "Interrupting and cancelling").

A real Ctrl-C: a client script runs a long remote call and the test sends it SIGINT. The
worker must see KeyboardInterrupt (the function leaves a marker in its ``except``), the
client must get KeyboardInterrupt at once, its session must stay usable, and the next
caller of a 1-worker pool must not wait for the interrupted call: it runs within
``cancel_grace`` (plus slack for a loaded machine), even when the function ignores the
interrupt (then its worker is killed and replaced). Then ``Future.cancel()``, ``map``
closed early, clients that disconnect (``on_disconnect``), the counters, and the asyncio API.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

import pytest

import cruised
from cruised.client.http import run_path
from support import httphelp
from support.daemon import Daemon, pool_config, wait_for
from support.invariants import memfds

#: the allowance for a loaded machine on top of a bound (the tests assert bounds far below the
#: 30 s a call would otherwise hold its worker)
SLACK = 3.0
GRACE = 2.0  # pools.<name>.cancel_grace's default

#: the user's script: a long call, interrupted by the test's SIGINT; then the same session again
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import cruised

    # a shell's background job (and so a test runner started from one) inherits SIGINT ignored:
    # this script wants Python's own Ctrl-C behaviour, as in a terminal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sock, marker, mode = sys.argv[1:4]
    s = cruised.session(socket=sock)

    def long_call(marker, mode):
        import time
        with open(marker, "a") as fh:
            fh.write(f"started {os.getpid()}\\n")
        if mode == "stubborn":  # ignores every KeyboardInterrupt: only a kill stops it
            while True:
                try:
                    time.sleep(60)
                except KeyboardInterrupt:
                    with open(marker, "a") as fh:
                        fh.write("ignored\\n")
        try:
            time.sleep(2 if mode == "short" else 30)
        except KeyboardInterrupt:
            with open(marker, "a") as fh:
                fh.write("interrupted\\n")
            raise
        with open(marker, "a") as fh:
            fh.write("finished\\n")

    conn = id(s._connection())
    print("ready", flush=True)
    try:
        s.call(long_call, marker, mode)
        print("returned", flush=True)
    except KeyboardInterrupt:
        print(f"interrupted {time.monotonic():.6f}", flush=True)
    # the same session, on the same connection: no stray reply of the cancelled call in the way
    results = [s.call(abs, -i) for i in range(20)]
    print("next", results == list(range(20)), id(s._connection()) == conn, flush=True)
    """
)


def long_call(marker: str, mode: str = "long") -> None:
    """The script's function, for the in-process tests (``Future.cancel``, asyncio)."""
    import time as _t

    with open(marker, "a") as fh:
        fh.write(f"started {os.getpid()}\n")
    try:
        _t.sleep(30)
    except KeyboardInterrupt:
        with open(marker, "a") as fh:
            fh.write("interrupted\n")
        raise
    with open(marker, "a") as fh:
        fh.write("finished\n")


def wait_for_file(path: str, value: Any) -> Any:
    """Hold a worker until ``path`` exists (the test's gate)."""
    import os as _os
    import time as _t

    deadline = _t.monotonic() + 60
    while not _os.path.exists(path) and _t.monotonic() < deadline:
        _t.sleep(0.01)
    return value


def tagged(marker: str, i: int, delay: float) -> int:
    with open(marker, "a") as fh:
        fh.write(f"start {i}\n")
    import time as _t

    _t.sleep(delay)
    with open(marker, "a") as fh:
        fh.write(f"end {i}\n")
    return i


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def one_worker(start_daemon: Callable[..., Daemon], **cfg: Any) -> Daemon:
    return start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1, **cfg)}})


class Script:
    """The user's script (SCRIPT) in a subprocess: its output lines, as they come."""

    def __init__(self, d: Daemon, tmp_path: Path, marker: Path, mode: str = "long") -> None:
        path = tmp_path / "user_script.py"
        path.write_text(SCRIPT)
        self.proc = subprocess.Popen(
            [sys.executable, str(path), d.socket, str(marker), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
        self.out: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out.append(line.strip())

    def line(self, prefix: str, timeout: float = 30) -> str:
        return str(wait_for(lambda: next((ln for ln in self.out if ln.startswith(prefix)), None), timeout, what=f"the script to print {prefix!r}: {self.out}"))

    def finish(self) -> None:
        try:
            assert self.proc.wait(60) == 0, self.proc.stderr.read() if self.proc.stderr else ""
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def queued_behind(d: Daemon, fn: Callable[..., Any], *args: Any) -> tuple[threading.Thread, list[float]]:
    """Another caller's call, queued behind the busy worker: the time it returned, once it has."""
    done: list[float] = []
    other = d.session()

    def run() -> None:
        other.call(fn, *args)
        done.append(time.monotonic())
        other.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 1, what="the other caller's call queued")
    return t, done


def test_ctrl_c_interrupts_the_running_call_and_the_next_caller_does_not_wait(start_daemon, tmp_path: Path) -> None:
    d = one_worker(start_daemon)
    marker = tmp_path / "marker"
    script = Script(d, tmp_path, marker)
    script.line("ready")
    wait_for(lambda: any(ln.startswith("started") for ln in lines(marker)), what="the long call to start")
    worker_pid = int(lines(marker)[0].split()[1])
    nxt, done = queued_behind(d, os.getpid)

    sigint_at = time.monotonic()
    script.proc.send_signal(signal.SIGINT)
    client_raised_at = float(script.line("interrupted").split()[1])
    assert client_raised_at - sigint_at < SLACK, "the client raises KeyboardInterrupt at once, not when the call ends"
    nxt.join(GRACE + SLACK)
    assert done and done[0] - sigint_at < GRACE + SLACK, "the next caller of the 1-worker pool ran within the grace"
    wait_for(lambda: "interrupted" in lines(marker), what="the function to see KeyboardInterrupt")
    assert "finished" not in lines(marker)
    assert script.line("next") == "next True True", "the session stays usable, on the same connection"
    script.finish()

    st = d.status()["pools"]["default"]
    assert st["requests"]["cancelled"] == 1 and "cancelled" not in st["exits"], st
    with d.session() as s:
        assert s.call(os.getpid) == worker_pid, "a worker that handled the interrupt stays in the pool"
        assert 'cruised_requests_total{door="native",endpoint="function",outcome="cancelled",pool="default"} 1.0' in s.metrics()
    assert d.cli("status").stdout.splitlines()[-1].split()[-1] == "1", "cruised status: the cancel column"


def test_ctrl_c_while_queued_withdraws_the_call_and_it_never_runs(start_daemon, tmp_path: Path) -> None:
    d = one_worker(start_daemon)
    gate, marker = tmp_path / "gate", tmp_path / "marker"
    with d.session() as holder:
        busy = holder.submit(wait_for_file, str(gate), "held")
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, what="the worker busy")
        script = Script(d, tmp_path, marker)
        script.line("ready")
        wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 1, what="the script's call queued")
        sigint_at = time.monotonic()
        script.proc.send_signal(signal.SIGINT)
        assert float(script.line("interrupted").split()[1]) - sigint_at < SLACK
        # (the script's next calls queue behind the gate at once: the count says the call was withdrawn)
        wait_for(lambda: d.status()["pools"]["default"]["requests"].get("cancelled") == 1, what="the call withdrawn from the queue")
        gate.touch()
        assert busy.result(timeout=30) == "held"
        assert script.line("next") == "next True True"
        script.finish()
    assert lines(marker) == [], "a call withdrawn from the queue never runs"
    assert d.status()["pools"]["default"]["requests"]["cancelled"] == 1


def test_a_function_that_ignores_the_interrupt_is_killed_after_cancel_grace(start_daemon, tmp_path: Path) -> None:
    d = one_worker(start_daemon, cancel_grace="1s")
    marker = tmp_path / "marker"
    script = Script(d, tmp_path, marker, mode="stubborn")
    script.line("ready")
    wait_for(lambda: any(ln.startswith("started") for ln in lines(marker)), what="the call to start")
    worker_pid = int(lines(marker)[0].split()[1])
    nxt, done = queued_behind(d, os.getpid)
    sigint_at = time.monotonic()
    script.proc.send_signal(signal.SIGINT)
    assert float(script.line("interrupted").split()[1]) - sigint_at < SLACK
    nxt.join(1.0 + SLACK)
    assert done and done[0] - sigint_at < 1.0 + SLACK, "the next caller ran within cancel_grace, on a replacement worker"
    assert "ignored" in lines(marker), "the function did get its KeyboardInterrupt"
    assert script.line("next") == "next True True"
    script.finish()
    st = d.status()["pools"]["default"]
    assert st["exits"].get("cancelled") == 1 and st["requests"]["cancelled"] == 1, st
    with d.session() as s:
        assert s.call(os.getpid) != worker_pid
    assert "did not stop within cancel_grace (1s)" in d.log()
    # the killed worker's cancel board went with it: one per live worker in the supervisor
    wait_for(lambda: memfds(d.status()["pid"], "cruised-cancel-") == 1, what="one cancel board, the replacement's")


def test_future_cancel_withdraws_a_running_and_a_queued_call(start_daemon, tmp_path: Path) -> None:
    d = one_worker(start_daemon)
    marker, queued_marker = tmp_path / "marker", tmp_path / "queued"
    with d.session() as s:
        running = s.submit(long_call, str(marker))
        wait_for(lambda: lines(marker), what="the call to start")
        queued = s.submit(long_call, str(queued_marker))
        wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 1, what="the second call queued")
        assert running.running() and queued.running(), "outstanding calls: running() until answered"
        assert queued.cancel() and running.cancel()
        assert running.cancelled() and queued.cancelled()
        done, not_done = wait_futures([running, queued], timeout=5)
        assert len(done) == 2 and not not_done, "waiters see the cancellation"
        with pytest.raises(CancelledError):
            running.result(timeout=0)
        wait_for(lambda: "interrupted" in lines(marker), what="the running call's KeyboardInterrupt")
        assert s.call(lambda: "after") == "after"
        finished = s.submit(abs, -3)
        assert finished.result(timeout=30) == 3 and not finished.cancel(), "an answered future cannot be cancelled"
    assert lines(queued_marker) == []
    assert d.status()["pools"]["default"]["requests"]["cancelled"] == 2


@pytest.mark.parametrize("stop", ["close", "drop"])
def test_map_withdraws_its_calls_in_flight_when_its_consumer_stops(start_daemon, tmp_path: Path, stop: str) -> None:
    d = one_worker(start_daemon)
    marker = tmp_path / "marker"
    with d.session() as s:
        results = s.map(tagged, [str(marker)] * 8, range(8), [0.0] + [30.0] * 7, window=8)
        assert next(results) == 0
        wait_for(lambda: "start 1" in lines(marker), what="the second call to start")
        # the consumer stops: 1 is interrupted, 2..7 never run
        if stop == "close":
            results.close()
        else:
            del results  # dropped: the generator is finalized
            gc.collect()
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["idle"] == 1, GRACE + SLACK, what="the worker free again")
        assert s.call(abs, -1) == 1
    assert [ln for ln in lines(marker) if ln.startswith("start")] == ["start 0", "start 1"] and "end 1" not in lines(marker)
    assert d.status()["pools"]["default"]["requests"]["cancelled"] == 7


@pytest.mark.parametrize("policy", ["cancel", "finish"])
def test_a_client_that_disconnects_has_its_running_call_cancelled_or_finished(start_daemon, tmp_path: Path, policy: str) -> None:
    d = one_worker(start_daemon, on_disconnect=policy)
    marker = tmp_path / "marker"
    script = Script(d, tmp_path, marker, mode="long" if policy == "cancel" else "short")
    script.line("ready")
    wait_for(lambda: any(ln.startswith("started") for ln in lines(marker)), what="the call to start")
    script.proc.kill()  # gone without a word: no CANCEL, only the closed connection
    script.proc.wait()
    if policy == "cancel":
        wait_for(lambda: "interrupted" in lines(marker), GRACE + SLACK, what="the departed client's call interrupted")
        assert d.status()["pools"]["default"]["requests"]["cancelled"] == 1
    else:
        with d.session() as s:
            assert s.call(abs, -2) == 2  # waited for the departed client's call to finish
        assert "finished" in lines(marker)
        assert d.status()["pools"]["default"]["requests"].get("cancelled", 0) == 0


ENDPOINT = """
import os, time

def slow(marker):
    with open(marker, "a") as fh:
        fh.write(f"started {os.getpid()}\\n")
    try:
        time.sleep(30)
    except KeyboardInterrupt:
        with open(marker, "a") as fh:
            fh.write("interrupted\\n")
        raise
    return "finished"
"""


def test_an_http_caller_that_hangs_up_has_its_endpoint_call_interrupted(start_daemon, tmp_path: Path) -> None:
    code = httphelp.write(tmp_path / "eps.py", ENDPOINT)
    d = start_daemon(
        {
            "pools": {"default": pool_config(min=1, cruise=1, max=1)},
            "services": {"t": {"endpoints": {"slow": {"code": code, "function": "slow", "pool": "default"}}}},
        }
    )
    marker = tmp_path / "marker"
    conn = httphelp.persistent(httphelp.unix(d))
    conn.request("POST", run_path("t", "slow"), body=json.dumps({"marker": str(marker)}).encode())
    wait_for(lambda: lines(marker), what="the endpoint call to start")
    worker_pid = int(lines(marker)[0].split()[1])
    hung_up_at = time.monotonic()
    conn.close()  # the caller hangs up without reading the answer
    wait_for(lambda: "interrupted" in lines(marker), GRACE + SLACK, what="the endpoint function interrupted")
    assert time.monotonic() - hung_up_at < GRACE + SLACK
    wait_for(lambda: d.status()["pools"]["default"]["requests"].get("cancelled") == 1, what="counted as cancelled")
    with d.session() as s:
        assert s.call(os.getpid) == worker_pid, "the worker stays"
    resp = httphelp.call(httphelp.unix(d), "t/slow", {"marker": "/nonexistent/dir/marker"})
    assert resp.status == 500, "the next HTTP call runs (and fails on its own)"


def test_a_q_client_that_closes_its_handle_has_its_endpoint_call_interrupted(start_daemon, tmp_path: Path) -> None:
    pytest.importorskip("pykx")
    from support.qraw import RawQ, kx

    code = httphelp.write(tmp_path / "eps.py", ENDPOINT)
    d = start_daemon(
        {
            "http": {"enabled": False},
            "pools": {"default": pool_config(min=1, cruise=1, max=1)},
            "services": {"t": {"endpoints": {"slow": {"code": code, "function": "slow", "pool": "default"}}}},
            "qipc": {"listen": "127.0.0.1:0"},
        },
        env={"PYKX_UNLICENSED": "true"},
    )
    marker = tmp_path / "marker"
    q = RawQ(d.status()["qipc"]["port"])
    q.send([kx.SymbolAtom("t/slow"), kx.CharVector(str(marker))])  # a sync call: q waits for its answer
    wait_for(lambda: lines(marker), what="the q client's call to start")
    worker_pid = int(lines(marker)[0].split()[1])
    q.close()  # the q session goes away mid-call (hclose, or the process ends)
    wait_for(lambda: "interrupted" in lines(marker), GRACE + SLACK, what="the endpoint function interrupted")
    wait_for(lambda: d.status()["pools"]["default"]["requests"].get("cancelled") == 1, what="counted as cancelled")
    with d.session() as s:
        assert s.call(os.getpid) == worker_pid, "the worker stays"


def test_session_with_a_socket_reports_a_missing_daemon_when_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "nothing.sock")
    with pytest.raises(cruised.DaemonUnavailable) as info:
        cruised.session(socket=path)
    assert path in str(info.value) and "cruised serve" in str(info.value)
    monkeypatch.setenv("CRUISED_SOCKET", path)
    lazy = cruised.session()  # without a socket: lazy, it may be made before the daemon starts
    with pytest.raises(cruised.DaemonUnavailable, match=r"nothing\.sock"):
        lazy.call(abs, -1)


async def test_asyncio_calls_map_and_cancellation(start_daemon, tmp_path: Path) -> None:
    d = one_worker(start_daemon)
    marker = tmp_path / "marker"
    s = cruised.session(socket=d.socket)

    @cruised.function(s)
    def add(x: int, y: int = 1) -> int:
        return x + y

    try:
        assert await s.acall(add, 1, y=2) == 3
        assert await add.aio(10) == 11  # type: ignore[attr-defined]
        results = await asyncio.gather(*(s.acall(abs, -i) for i in range(12)))  # pipelined on one connection
        assert results == list(range(12))
        assert [r async for r in s.amap(add, range(30), window=7)] == [i + 1 for i in range(30)]

        # cancelling the awaiting task cancels the remote call, as Ctrl-C does
        task = asyncio.ensure_future(s.acall(long_call, str(marker)))
        await asyncio.to_thread(wait_for, lambda: lines(marker), what="the call to start")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.to_thread(wait_for, lambda: "interrupted" in lines(marker), GRACE + SLACK, what="the call interrupted")
        assert await s.acall(abs, -5) == 5, "the connection is still in step"
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.acall(long_call, str(marker)), 0.5)

        # an async for that stops early withdraws the calls it has in flight
        tags = tmp_path / "tags"
        gen = s.amap(tagged, [str(tags)] * 6, range(6), [0.0] + [30.0] * 5, window=6)
        async for value in gen:
            assert value == 0
            break
        await gen.aclose()
        await asyncio.to_thread(wait_for, lambda: d.status()["pools"]["default"]["workers"]["idle"] == 1, GRACE + SLACK, what="worker free")
        assert [ln for ln in lines(tags) if ln.startswith("start")] in (["start 0"], ["start 0", "start 1"])
        assert "end 1" not in lines(tags)
        with pytest.raises(ZeroDivisionError):
            await s.acall(divmod, 1, 0)
    finally:
        s.close()
    assert d.status()["pools"]["default"]["requests"]["cancelled"] >= 1 + 1 + 5


def test_interrupting_a_jupyter_kernel_interrupts_its_remote_call(start_daemon, tmp_path: Path) -> None:
    """Jupyter's ■ (interrupt the kernel: SIGINT to the kernel process) on a cell that waits for a
    long remote call: the cell ends with KeyboardInterrupt at once, the worker sees it, and the
    next cell uses the same session, top-level ``await`` included."""
    pytest.importorskip("ipykernel")
    from jupyter_client.manager import start_new_kernel

    d = one_worker(start_daemon)
    marker = tmp_path / "marker"
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:

        def run(code: str, timeout: float = 60) -> tuple[str, list[str]]:
            """Execute a cell; its status and what it printed (or its error's name)."""
            out: list[str] = []

            def keep(msg: dict[str, Any]) -> None:
                content = msg["content"]
                if msg["msg_type"] == "stream":
                    out.append(content["text"])
                elif msg["msg_type"] == "error":
                    out.append(content["ename"])

            reply = kc.execute_interactive(code, timeout=timeout, output_hook=keep)
            return reply["content"]["status"], out

        setup = textwrap.dedent(
            f"""
            import cruised, os, time
            s = cruised.session(socket={d.socket!r})
            def long_call(marker):
                with open(marker, "a") as fh:
                    fh.write(f"started {{os.getpid()}}\\n")
                try:
                    time.sleep(30)
                except KeyboardInterrupt:
                    with open(marker, "a") as fh:
                        fh.write("interrupted\\n")
                    raise
            print("set up", s.call(abs, -1))
            """
        )
        assert run(setup) == ("ok", ["set up 1\n"])
        waiting = kc.execute(f"s.call(long_call, {str(marker)!r})")
        wait_for(lambda: lines(marker), what="the cell's remote call to start")
        interrupted_at = time.monotonic()
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=30)
        assert reply["parent_header"]["msg_id"] == waiting
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - interrupted_at < SLACK, "the cell stops at once, not when the call ends"
        wait_for(lambda: "interrupted" in lines(marker), GRACE + SLACK, what="the worker's KeyboardInterrupt")
        assert run("print(s.call(abs, -2), await s.acall(abs, -3))", timeout=GRACE + SLACK + 10) == ("ok", ["2 3\n"])
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert d.status()["pools"]["default"]["requests"]["cancelled"] == 1
