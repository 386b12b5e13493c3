"""Signals and shutdown, on the real daemon: drain, fast path, and a SIGKILLed supervisor.

Calls are held in place with gate files instead of sleeps, so "in flight when
SIGTERM arrives" is a fact checked through ``cruised status``, not a guess.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import cruised
from cruised.client.errors import ShuttingDown
from support.daemon import Daemon, group_members, pool_config, wait_for


def wait_for_file(path: str, tag: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.005)
    return tag


def sleep_long() -> None:
    time.sleep(120)


def add(x: int, y: int) -> int:
    return x + y


def pids_alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def test_sigterm_drains_queued_and_running_requests(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    """Every accepted request is answered: running ones finish, queued ones run, even on a replacement worker."""
    d = start_daemon(
        {
            "daemon": {"shutdown_grace": "60s"},
            "pools": {
                "default": pool_config(min=1, cruise=1, max=1, queue_size=8, queue_timeout="60s"),
                "other": pool_config(min=1, cruise=1, max=1),
            },
        }
    )
    gate = str(tmp_path / "gate")
    with d.session() as s, d.session(timeout=1.0) as short, d.session(pool="other") as other:
        running = other.submit(wait_for_file, gate, "ran")  # in flight in the other pool
        doomed = short.submit(sleep_long)  # holds default's only worker until its 1 s limit kills it
        wait_for(lambda: all(p["workers"]["busy"] == 1 for p in d.status()["pools"].values()), what="both pools busy")
        queued = [s.submit(wait_for_file, gate, f"q{i}") for i in range(4)]
        wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 4, what="four queued calls")

        d.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down gracefully" in d.log(), what="the daemon to start draining")
        # no new work: an open connection gets a clear refusal, a new one finds no socket
        with pytest.raises(ShuttingDown, match="shutting down"):
            s.call(add, 1, 1)
        assert not os.path.exists(d.socket)
        with pytest.raises(cruised.DaemonUnavailable):
            cruised.session(socket=d.socket).create()

        Path(gate).touch()
        assert running.result(timeout=60) == "ran"
        with pytest.raises(cruised.ExecutionTimeout):
            doomed.result(timeout=60)
        # the queued calls ran on the worker that replaced the killed one
        assert [f.result(timeout=60) for f in queued] == [f"q{i}" for i in range(4)]
    assert d.wait_exit(timeout=60) == 0
    log = d.log()
    assert "stopped" in log and "was not run" not in log
    assert not os.path.exists(d.socket)


def test_second_signal_takes_the_fast_path(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon({"daemon": {"shutdown_grace": "120s"}, "pools": {"default": pool_config()}})
    with d.session() as s:
        stuck = s.submit(wait_for_file, str(tmp_path / "never"), "x")
        queued = s.submit(wait_for_file, str(tmp_path / "never"), "y")
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] >= 1, what="a busy worker")
        d.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down gracefully" in d.log(), what="the graceful stop")
        d.signal(signal.SIGINT)  # Ctrl-C twice in a terminal: same as a second SIGTERM
        # far sooner than the 120 s grace: the stuck call is interrupted, not waited for
        assert d.wait_exit(timeout=30) == 0
        for fut in (stuck, queued):
            with pytest.raises(cruised.CruisedError):
                fut.result(timeout=30)
    assert "fast shutdown" in d.log()


def test_sigkill_of_the_supervisor_leaves_no_worker(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=2, cruise=2, max=3), "b": pool_config()}})
    with d.session() as s:
        busy = s.submit(sleep_long)  # a worker in the middle of a call dies too
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, what="a busy worker")
        assert d.proc is not None
        children = [int(m.split(":")[0]) for m in group_members(d.pgid) if int(m.split(":")[0]) != d.proc.pid]
        assert len(children) >= 5, children  # two templates and at least three workers
        d.proc.kill()
        d.proc.wait()
        wait_for(lambda: not pids_alive(children), timeout=20, what=f"templates and workers to die with the supervisor: {children}")
        with pytest.raises(cruised.DaemonUnavailable):
            busy.result(timeout=30)
