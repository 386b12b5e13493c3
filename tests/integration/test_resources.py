"""Resource-leak regression: the supervisor's fds and threads stay flat under churn.

Twenty rounds of the things that open and close resources in the supervisor
(a client connection, a metrics scrape, a worker crash and its replacement)
must leave its fd and thread counts where they started. The same helper
serves the reload variant (twenty SIGHUPs), which belongs with the reload
feature.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import cruised
from support.daemon import Daemon, pool_config, wait_for

ROUNDS = 20


def crash() -> None:
    os._exit(3)


def add(x: int, y: int) -> int:
    return x + y


def fd_and_thread_counts(pid: int) -> tuple[int, int]:
    """Open file descriptors and threads of a live process, from /proc."""
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return fds, threads


def test_fds_and_threads_stable_across_worker_churn(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1)}})
    assert d.proc is not None
    pid = d.proc.pid

    def settled() -> bool:
        st = d.status()["pools"]["default"]
        return st["workers"]["idle"] == 1 and st["workers"]["starting"] == 0 and not st["worker_list"][0]["requests"]

    wait_for(settled, what="one fresh idle worker")
    before = fd_and_thread_counts(pid)
    for i in range(ROUNDS):
        with d.session() as s:
            assert s.call(add, i, 1) == i + 1
            assert "cruised_requests_total" in s.metrics()
            with pytest.raises(cruised.WorkerCrashed):
                s.call(crash)
        wait_for(settled, what=f"the replacement worker (round {i})")

    # Connection closes are processed asynchronously (the baseline itself may still hold the
    # last status connection), so poll until the counts are back at or below the baseline;
    # one leaked fd per round would leave them 20 above it.
    def back_to_baseline() -> bool:
        fds, threads = fd_and_thread_counts(pid)
        return fds <= before[0] and threads <= before[1]

    wait_for(back_to_baseline, timeout=10, what=f"fd/thread counts back to {before}")
    assert fd_and_thread_counts(pid)[0] >= before[0] - 2  # sanity: measuring the right process


def test_fds_and_threads_stable_across_twenty_reloads(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1)}})
    assert d.proc is not None
    pid = d.proc.pid

    def settled() -> bool:
        st = d.status()
        return not st.get("retiring_pools") and st["pools"]["default"]["workers"]["idle"] == 1

    wait_for(settled, what="one idle worker")
    # a first reload warms every lazily created structure (the reload task machinery)
    assert d.cli("reload").returncode == 0
    wait_for(settled, timeout=30, what="first reload retired")
    before = fd_and_thread_counts(pid)
    for i in range(20):
        r = d.cli("reload")
        assert r.returncode == 0, r.stderr
        with d.session() as s:
            assert s.call(add, i, 1) == i + 1
        wait_for(settled, timeout=30, what=f"old generation retired (reload {i})")

    def back_to_baseline() -> bool:
        fds, threads = fd_and_thread_counts(pid)
        return fds <= before[0] and threads <= before[1]

    wait_for(back_to_baseline, timeout=15, what=f"fd/thread counts back to {before}, now {fd_and_thread_counts(pid)}")
    # the retired generations' workers are counted under reason="reload" (21 reloads, one worker each)
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(d.session().metrics())}
    reload_exits = [s.value for s in families["cruised_worker_exits"].samples if s.labels.get("reason") == "reload" and s.name.endswith("_total")]
    assert reload_exits == [21.0]


@pytest.mark.parametrize(
    ("limits", "expected"),
    [((1024, 4096), (1024, 4096)), ((1024, -1), (1024, 1 << 20)), ((4096, 4096), (4096, 4096)), ((-1, -1), (-1, -1))],
)
def test_the_open_file_limit_is_raised_to_the_hard_one(monkeypatch: pytest.MonkeyPatch, limits: tuple[int, int], expected: tuple[int, int]) -> None:
    from cruised.core import supervisor

    current = list(limits)
    monkeypatch.setattr(supervisor.resource, "RLIM_INFINITY", -1)
    monkeypatch.setattr(supervisor.resource, "getrlimit", lambda which: tuple(current))

    def setrlimit(which: int, new: tuple[int, int]) -> None:
        assert new[1] == current[1], "the hard limit is never touched"
        current[0] = new[0]

    monkeypatch.setattr(supervisor.resource, "setrlimit", setrlimit)
    assert supervisor.raise_fd_limit() == expected
    assert current[0] == expected[1]


def test_the_daemon_raises_its_open_file_limit(start_daemon: Callable[..., Daemon]) -> None:
    """Started from a shell with a low soft limit (inherited here), the daemon lifts it to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(soft, 256)
    if hard != resource.RLIM_INFINITY and hard <= low:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        d = start_daemon({"pools": {"default": pool_config()}})
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    pid = d.status()["pid"]
    with open(f"/proc/{pid}/limits") as fh:
        line = next(ln for ln in fh if ln.startswith("Max open files"))
    daemon_soft = line.split()[3]
    assert daemon_soft == (str(hard) if hard != resource.RLIM_INFINITY else "unlimited") or int(daemon_soft) >= 1 << 20
    assert f"open-file limit raised from {low}" in d.log()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_an_idle_worker_hands_back_the_heap_of_its_last_large_calls(start_daemon: Callable[..., Daemon]) -> None:
    """Large buffers come from the heap and stay warm between calls (pool/heap.py); a worker
    that then goes idle returns them, so a pool does not keep holding its last burst."""
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1)}})
    with d.session() as s:
        pid = s.call(os.getpid)
        base = _rss_kib(pid)
        blob = os.urandom(24 << 20)
        for _ in range(3):
            assert s.call(lambda b: b[::-1], blob) == blob[::-1]
        assert s.call(os.getpid) == pid
        grown = _rss_kib(pid)
        assert grown > base + (40 << 10), (base, grown)  # the freed buffers are still held...
        wait_for(lambda: _rss_kib(pid) < base + (12 << 10), timeout=15, what=f"worker RSS back near {base} KiB (was {grown})")
        assert s.call(lambda b: len(b), blob) == len(blob)  # ...and it still serves large calls after


def test_a_worker_that_never_idles_still_trims_after_a_bounded_number_of_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a trim is due the worker waits for each frame with a timeout (a select() per call),
    so a steady stream of calls cannot keep it due for ever: after TRIM_BUSY_WAITS it trims."""
    import socket

    from cruised.pool import heap, worker

    trims: list[int] = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(1))
    a, b = socket.socketpair()
    try:
        w = worker.Worker.__new__(worker.Worker)  # only its channel is used
        w.channel = worker.Channel(b, 1 << 20)
        w.channel.churn = worker.TRIM_AFTER_BYTES
        a.send(b"x")  # a frame is always waiting: the worker is never idle
        for _ in range(worker.TRIM_BUSY_WAITS):
            w._trim_when_idle()
        assert trims == [] and w.channel.busy_waits == worker.TRIM_BUSY_WAITS
        w._trim_when_idle()
        assert trims == [1] and w.channel.churn == 0 and w.channel.busy_waits == 0
    finally:
        a.close()
        b.close()
