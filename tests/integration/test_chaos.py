"""Chaos and overload through the real daemon, judged by one invariant checker.

Every scenario is bounded in time and count and uses only the daemon's Unix
socket. CRUISED_CHAOS_SECONDS stretches each scenario for a longer local run.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from pathlib import Path

from cruised.pool.wire.frames import Status
from support.daemon import Daemon, pool_config, wait_for
from support.invariants import (
    BusyKiller,
    RawClient,
    check,
    drive,
    resources,
    settle,
    settle_and_check,
)

SECONDS = float(os.environ.get("CRUISED_CHAOS_SECONDS", "3"))


def clients_for(d: Daemon, ledger: Path, n: int, **kw) -> list[RawClient]:
    return [RawClient(d.socket, str(ledger), **kw) for _ in range(n)]


def test_random_worker_kills_while_eight_clients_pipeline(start_daemon, tmp_path: Path) -> None:
    # every connection its own flow: the fair order (daemon/core/fairness.py) takes turns between
    # the eight while workers die under them
    d = start_daemon({"pools": {"default": pool_config(min=2, cruise=3, max=4, queue_size=64, fairness="connection")}})
    daemon_pid = d.status()["pid"]
    rss0, fds0 = resources(daemon_pid)
    ledger = tmp_path / "ledger"
    clients = clients_for(d, ledger, 8)
    killer = BusyKiller(d.status, every=0.15, seed=7, limit=40)
    killer.start()
    drive(clients, SECONDS, 8, lambda i: ("sleep", 0.002) if i % 3 else ("ok", 0.0))
    kills = killer.stop()
    rep = settle_and_check(clients, str(ledger))
    assert rep.ok(), rep.summary()
    assert kills > 0 and rep.by_status[Status.OK] > 100, rep.summary()
    assert rep.by_status[Status.WORKER_CRASHED] > 0, rep.summary()
    # the pool heals and the daemon did not grow without bound
    wait_for(lambda: d.status()["pools"]["default"]["workers"]["idle"] >= 3, 30, what="pool healed")
    rss1, fds1 = resources(daemon_pid)
    assert fds1 <= fds0 + 4, (fds0, fds1)
    assert rss1 < rss0 + (64 << 20), (rss0, rss1)


def test_held_calls_survive_crashes_and_kills_exactly_once(start_daemon, tmp_path: Path) -> None:
    """A pool at max with short calls holds queued calls on busy workers (prefetch); crashes and
    SIGKILLs land while calls are held: every held call still runs at most once, or never if it
    was answered as not run. Each connection is its own flow, so held calls are taken in the fair
    order across the four (and requeued into their flows when their worker dies)."""
    d = start_daemon({"pools": {"default": pool_config(min=2, cruise=2, max=2, queue_size=256, prefetch=2, fairness="connection")}})
    ledger = tmp_path / "ledger"
    clients = clients_for(d, ledger, 4)
    killer = BusyKiller(d.status, every=0.2, seed=11, limit=20)
    killer.start()
    # mostly trivial calls (so the pool's average stays short and it holds), 1 in 97 crashes its worker
    drive(clients, SECONDS, 24, lambda i: ("crash", 0.0) if i % 97 == 0 else ("ok", 0.0))
    killer.stop()
    rep = settle_and_check(clients, str(ledger))
    assert rep.ok(), rep.summary() + "\n" + "\n".join(line for line in d.log().splitlines() if "requeued" in line)[-4000:]
    assert rep.by_status[Status.OK] > 500 and rep.by_status[Status.WORKER_CRASHED] > 0, rep.summary()
    held = d.status()["pools"]["default"]["held_total"]
    assert held > 100, f"the scenario must exercise holding (held_total={held}); {rep.summary()}"


def test_cancels_of_queued_held_and_running_calls_keep_every_invariant(start_daemon, tmp_path: Path) -> None:
    """Clients pipeline short calls into a pool that holds them (prefetch) and withdraw random ones
    (Kind.CANCEL) wherever they are: queued, held by a busy worker, running, or just answered.
    Every call still gets exactly one reply, nothing runs twice, and a call answered CANCELLED
    as never run did not run (a held one included: the worker's cancel board)."""
    d = start_daemon({"pools": {"default": pool_config(min=2, cruise=2, max=2, queue_size=256, prefetch=2)}})
    ledger = tmp_path / "ledger"
    clients = clients_for(d, ledger, 4)
    rng = random.Random(5)
    stop = threading.Event()
    cancels = 0

    def cancel_some() -> None:
        nonlocal cancels
        while not stop.wait(0.0005) and cancels < 20000:
            c = rng.choice(clients)
            waiting = c.outstanding()
            if waiting:
                try:
                    c.cancel(rng.choice(waiting[-8:]))  # the newest: queued or held, sometimes running
                except OSError:
                    return
                cancels += 1

    canceller = threading.Thread(target=cancel_some)
    canceller.start()
    # mostly trivial calls (so the pool holds), some that run long enough to be interrupted
    drive(clients, SECONDS, 24, lambda i: ("sleep", 0.05) if i % 50 == 0 else ("ok", 0.0))
    stop.set()
    canceller.join(10)
    rep = settle_and_check(clients, str(ledger))
    assert rep.ok(), rep.summary()
    assert rep.by_status[Status.OK] > 200 and rep.by_status[Status.CANCELLED] > 20, rep.summary()
    st = d.status()["pools"]["default"]
    assert st["held_total"] > 50, f"the scenario must exercise holding; {rep.summary()}"
    assert st["requests"].get("cancelled", 0) == rep.by_status[Status.CANCELLED], (st["requests"], rep.summary())
    assert d.session().call(lambda: "alive") == "alive"


def test_hostile_mix_keeps_every_invariant(start_daemon, tmp_path: Path) -> None:
    d = start_daemon(
        {
            "pools": {"default": pool_config(min=1, cruise=2, max=3, queue_size=6, queue_timeout="400ms", exec_timeout="300ms")},
            "daemon": {"kill_grace": "200ms"},
        }
    )
    ledger = tmp_path / "ledger"
    clients = clients_for(d, ledger, 4)
    modes = [("ok", 0.0)] * 6 + [("sleep", 0.05), ("raise", 0.0), ("crash", 0.0), ("hang", 0.0)]
    rng = random.Random(3)
    drive(clients, SECONDS, 6, lambda i: rng.choice(modes))
    rep = settle_and_check(clients, str(ledger))
    assert rep.ok(), rep.summary()
    for status in (Status.OK, Status.ERROR, Status.WORKER_CRASHED, Status.EXEC_TIMEOUT, Status.QUEUE_FULL):
        assert rep.by_status[status] > 0, f"{Status.name(status)} never happened: {rep.summary()}"
    assert d.session().call(lambda: "alive") == "alive"


def test_clients_that_leave_mid_call_do_not_disturb_the_others(start_daemon, tmp_path: Path) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=2, max=2, queue_size=32)}})
    ledger = tmp_path / "ledger"
    clients = clients_for(d, ledger, 6)
    leavers = {0, 1, 2}
    done = threading.Event()

    def leave() -> None:
        for i in sorted(leavers):
            if done.wait(SECONDS / 4):
                return
            clients[i].close()

    t = threading.Thread(target=leave)
    t.start()
    drive(clients, SECONDS, 4, lambda i: ("sleep", 0.01))
    done.set()
    t.join(10)
    settle(clients, 60, skip=leavers)
    rep = check(clients, str(ledger), disconnected=leavers)
    for i, c in enumerate(clients):
        if i not in leavers:
            c.close()
    assert rep.ok(), rep.summary()
    wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 0, 20, what="queue drained")


def test_overload_at_2x_and_10x_capacity(start_daemon, tmp_path: Path) -> None:
    queue_size, workers = 4, 2
    d = start_daemon({"pools": {"default": pool_config(min=2, cruise=2, max=workers, queue_size=queue_size, queue_timeout="1s", exec_timeout="2s")}})
    for factor in (2, 10):
        ledger = tmp_path / f"ledger-{factor}x"
        clients = clients_for(d, ledger, factor)
        depths: list[int] = []
        statuses_ok: list[bool] = []
        stop = threading.Event()

        # this round's lists and event, passed in: the thread must not see the next round's
        def watch(stop: threading.Event, depths: list[int], statuses_ok: list[bool]) -> None:
            while not stop.wait(0.05):
                try:
                    st = d.status()
                    depths.append(st["pools"]["default"]["queue"]["depth"])
                    statuses_ok.append(True)
                except Exception:  # noqa: BLE001 - any failure to answer is what this counts
                    statuses_ok.append(False)

        w = threading.Thread(target=watch, args=(stop, depths, statuses_ok))
        w.start()
        started = time.monotonic()
        drive(clients, SECONDS, queue_size + workers, lambda i: ("sleep", 0.02))
        settle(clients, 30)
        stop.set()
        w.join(10)
        rep = check(clients, str(ledger))
        for c in clients:
            c.close()
        assert rep.ok(), rep.summary()
        assert rep.by_status[Status.QUEUE_FULL] > 0, f"{factor}x offered load produced no rejections: {rep.summary()}"
        assert max(depths) <= queue_size, f"queue exceeded its bound: {max(depths)}"
        assert statuses_ok and all(statuses_ok), "status must answer throughout"
        assert time.monotonic() - started < SECONDS + 1 + 2 + 30


def test_a_thousand_connections_at_once(start_daemon) -> None:
    import cruised
    from cruised.pool.wire import frames
    from cruised.pool.wire.frames import Kind
    from support.raw import read_frame

    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"max_connections": 200}})
    socks = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(d.socket)
            except OSError:  # the kernel's listen backlog is full: refused before the daemon sees it
                s.close()
                continue
            socks.append(s)
        # beyond the limit: a clean, specific refusal, not a hang
        refused = wait_for(lambda: _refusal(d), 30, what="a clean refusal at the limit")
        assert "max_connections" in refused
        # the admitted connections are served
        served = 0
        for s in socks[:50]:
            try:
                s.sendall(frames.frame(Kind.PING, 9))
                if read_frame(s)[1] == Status.OK:
                    served += 1
            except OSError:
                pass
        assert served == 50
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: d.session().call(lambda: 2) == 2, 30, what="service after the storm")
    assert cruised


def _refusal(d: Daemon) -> str | None:
    import cruised

    try:
        d.session().call(lambda: 1)
    except cruised.QueueFull as exc:
        return str(exc)
    return None


def test_q_server_killed_and_restarted_during_load(start_daemon, tmp_path: Path) -> None:
    from support.qserver import run_qserver

    with run_qserver() as qsrv:
        q = {"port": qsrv.port, "timeout": "5s", "reconnect": {"initial": "50ms", "max": "200ms"}}
        d = start_daemon({"pools": {"default": pool_config(min=2, cruise=2, max=2, queue_size=32, q=q)}})
        ledger = tmp_path / "ledger"
        clients = clients_for(d, ledger, 4)
        stop = threading.Event()

        def bounce() -> None:
            for _ in range(3):
                if stop.wait(SECONDS / 4):
                    return
                qsrv.stop()
                stop.wait(0.3)
                qsrv.restart()  # always: the load may end while q is down, and reconnection is checked after

        b = threading.Thread(target=bounce)
        b.start()
        drive(clients, SECONDS, 4, lambda i: ("q", 0.0))
        stop.set()
        b.join(30)
        rep = settle_and_check(clients, str(ledger))
        assert rep.ok(), rep.summary()
        assert rep.by_status[Status.OK] > 0 and rep.by_status[Status.Q_UNAVAILABLE] > 0, rep.summary()
        assert rep.by_status[Status.WORKER_CRASHED] == 0, "a q outage never kills a worker"
        wait_for(lambda: d.status()["pools"]["default"]["q"]["connected"] == 2, 30, what="both workers reconnected")


def test_sighup_every_second_during_load_fails_nothing(start_daemon, tmp_path: Path) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=2, cruise=2, max=3, queue_size=64)}})
    ledger = tmp_path / "ledger"
    clients = clients_for(d, ledger, 4)
    stop = threading.Event()
    reloads = 0

    def hup() -> None:
        nonlocal reloads
        while not stop.wait(1.0) and reloads < 10:
            d.signal(signal.SIGHUP)
            reloads += 1

    h = threading.Thread(target=hup)
    h.start()
    drive(clients, max(SECONDS, 3.5), 4, lambda i: ("sleep", 0.005))
    stop.set()
    h.join(10)
    rep = settle_and_check(clients, str(ledger))
    assert rep.ok(), rep.summary()
    assert reloads >= 3
    failed = sum(n for s, n in rep.by_status.items() if s != Status.OK)
    assert failed == 0, f"requests failed across {reloads} reloads: {rep.summary()}"
    wait_for(lambda: d.status()["generation"] > 1, 30, what="reloads took effect")
