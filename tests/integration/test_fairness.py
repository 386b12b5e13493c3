"""Fair sharing through the real daemon: callers under different uids, API keys and q users.

Issue 17's scenario: a pool of 2 workers and a queue of 16. While analyst A
(this process, root) maps 600 calls of 10 ms, analyst B (a forked child that
switched to uid 65534 before connecting, so SO_PEERCRED names another user)
calls a 10 ms function every 50 ms. B must never be refused and wait little
(p50 <= 25 ms, max <= 50 ms, measured by B around each call); A's map must
finish within 15% of its time alone (B's calls take 10% of the pool). The
same with three callers, with weights 3:1, through the HTTP door (two API
keys) and the q door (two q users). Then the asyncio ``amap`` under the same
flow control: never refused, each call sent once, its credit given back when
it ends or is left early.

The daemon's socket is made reachable by the other uids (``daemon.socket_mode:
"0666"`` and a traversable socket directory; no allow_uids). Timing bounds are
the issue's; the machine is shared, so a timing measurement that misses is
taken once more (COMMON.md), never the correctness checks (no refusal, each
call counted once).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import cruised
from cruised.client import errors
from cruised.client.http import run_path
from support.daemon import Daemon, pool_config, wait_for
from support.httphelp import call as http_call
from support.httphelp import persistent, tcp, unix, write

NOBODY = 65534
OTHER = 65533  # no passwd entry: the caller is "uid:65533"
PERIOD = 0.05
CALL_S = 0.01

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients under other uids")


def work(x: int) -> int:
    time.sleep(CALL_S)
    return x


def hold(x: int) -> int:
    time.sleep(0.4)
    return x


# -- clients in other processes -------------------------------------------------------------


class Child:
    """``body(conn)`` in a forked child, as ``uid`` if given (set before it connects anywhere).

    Forked, not spawned: the child has every module the parent imported, since
    after the switch it may no longer read the interpreter's files (they are
    root's). ``body`` sends "ready" when it is set up, then runs until the
    parent's "stop" (or its own end) and sends its result.
    """

    def __init__(self, body: Callable[[Connection], Any], uid: int | None = None) -> None:
        ctx = multiprocessing.get_context("fork")
        self.uid = uid
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=self._run, args=(theirs, body, uid), daemon=True)
        self.proc.start()
        assert self.conn.poll(60), "the child did not get ready"
        ready = self.conn.recv()
        assert ready == "ready", ready

    @staticmethod
    def _run(conn: Connection, body: Callable[[Connection], Any], uid: int | None) -> None:
        try:
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            conn.send(body(conn))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            conn.send(f"child failed: {exc!r}")

    def result(self, stop: bool = True, timeout: float = 120) -> Any:
        if stop:
            self.conn.send("stop")
        assert self.conn.poll(timeout), "the child did not answer"
        out = self.conn.recv()
        self.proc.join(10)
        assert not (isinstance(out, str) and out.startswith("child failed")), out
        return out


def every(one: Callable[[], Any]) -> Callable[[Connection], list[tuple[float, float | str]]]:
    """A child body: call ``one()`` every PERIOD until stopped; (start, latency or error name) per call."""

    def body(conn: Connection) -> list[tuple[float, float | str]]:
        one()  # connected, the function registered
        conn.send("ready")
        out: list[tuple[float, float | str]] = []
        tick = time.monotonic()
        while True:
            t = time.monotonic()
            try:
                one()
                out.append((t, time.monotonic() - t))
            except Exception as exc:  # noqa: BLE001 - a refusal is what the test looks for
                out.append((t, type(exc).__name__))
            tick += PERIOD
            if conn.poll(max(0.0, tick - time.monotonic())):  # paced by the period, stopped by the parent
                return out

    return body


def native_caller(socket: str) -> Callable[[], Any]:
    """One call of ``work`` per invocation, on a session made in the process that calls it."""
    holder: dict[str, Any] = {}

    def one() -> Any:
        s = holder.get("s")
        if s is None:
            s = holder["s"] = cruised.session(socket=socket, pool="p")
        return s.call(work, 0)

    return one


# -- the daemon -------------------------------------------------------------------------------


def open_to_all(d: Daemon) -> Daemon:
    os.chmod(d.sockdir, 0o755)  # mkdtemp made it 0700: the other uids must reach the socket in it
    return d


def fair_config(**pool: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {"min": 2, "cruise": 2, "max": 2, "queue_size": 16, "queue_timeout": "30s", **pool}
    return {"daemon": {"socket_mode": "0666"}, "metrics": {"caller_labels": True}, "pools": {"p": pool_config(**settings)}}


def requests_by_caller(d: Daemon) -> dict[tuple[str, str], float]:
    """cruised_requests_total by (caller, outcome), pool p."""
    with d.session() as s:
        text = s.metrics()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "cruised_requests":
            for sample in fam.samples:
                if sample.name == "cruised_requests_total" and sample.labels["pool"] == "p":
                    key = (sample.labels["caller"], sample.labels["outcome"])
                    out[key] = out.get(key, 0) + sample.value
    return out


def p50(values: list[float]) -> float:
    return statistics.median(values)


def latencies(calls: list[tuple[float, float | str]], start: float, end: float) -> tuple[list[float], list[str]]:
    """Latencies of the calls started in [start, end], and the errors of all of them."""
    errors = [r for _, r in calls if isinstance(r, str)]
    return [r for t, r in calls if start <= t <= end and not isinstance(r, str)], errors


def twice(measure: Callable[[], str | None]) -> None:
    """A timing measurement, taken once more if it misses on a shared machine (COMMON.md)."""
    miss = measure()
    if miss is not None:
        miss2 = measure()
        assert miss2 is None, f"missed twice: {miss}; then {miss2}"


# -- native door: uids --------------------------------------------------------------------------


@pytest.mark.parametrize("others", [[NOBODY], [NOBODY, OTHER]], ids=["two-callers", "three-callers"])
def test_a_map_does_not_starve_single_calls_of_other_uids(start_daemon: Callable[..., Daemon], others: list[int]) -> None:
    d = open_to_all(start_daemon(fair_config()))
    s = d.session(pool="p")
    assert s.call(work, 1) == 1  # imports and registration done before any fork

    def measure() -> str | None:
        t = time.monotonic()
        assert list(s.map(work, range(600))) == list(range(600))
        alone = time.monotonic() - t
        callers = [Child(every(native_caller(d.socket)), uid) for uid in others]
        t0 = time.monotonic()
        assert list(s.map(work, range(600))) == list(range(600))
        t1 = time.monotonic()
        shared = t1 - t0
        extra = 0.0
        for c in callers:
            calls = c.result()
            lat, errors = latencies(calls, t0, t1)
            assert not errors, f"a call of another caller was refused: {errors}"
            assert len(lat) >= 0.6 * shared / PERIOD, "it kept calling throughout the map"
            extra += len(lat) * CALL_S / 2  # their work, on 2 workers
            print(f"uid {c.uid}: {len(lat)} calls, p50 {p50(lat) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms")
            if p50(lat) > 0.025 or max(lat) > 0.050:
                return f"other caller: p50 {p50(lat) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms over {len(lat)} calls"
        # with one other caller, the bound: within 15% of alone (B's calls are 10% of the pool);
        # with more, the pool must stay as busy: within 15% of alone plus the others' share of the work
        bound = 1.15 * alone if len(others) == 1 else 1.15 * (alone + extra)
        print(f"map alone {alone:.2f}s, shared {shared:.2f}s, bound {bound:.2f}s")
        if shared > bound:
            return f"map alone {alone:.2f}s, shared {shared:.2f}s (bound {bound:.2f}s)"
        return None

    twice(measure)
    counts = requests_by_caller(d)
    maps = counts.get(("root", "ok"), 0)
    assert maps % 600 == 1 and maps >= 1201, "each map call reached the daemon exactly once (1 + 600 a map)"
    assert counts.get(("root", "rejected"), 0) == 0 and counts.get(("nobody", "rejected"), 0) == 0
    st = d.status()["pools"]["p"]
    assert st["fairness"]["reserved"] == 0 and st["fairness"]["credit"] == [], "every map gave its credit back"
    s.close()


def test_weights_split_the_pool_3_to_1_while_both_map(start_daemon: Callable[..., Daemon]) -> None:
    d = open_to_all(start_daemon(fair_config(shares={"root": 3, "nobody": 1})))
    s = d.session(pool="p")
    assert s.call(work, 1) == 1

    def mapper(n: int) -> Callable[[Connection], list[float]]:
        def body(conn: Connection) -> list[float]:
            b = cruised.session(socket=d.socket, pool="p")
            b.call(work, 0)
            conn.send("ready")
            done = []
            for _ in b.map(work, range(n)):
                done.append(time.monotonic())
            return done

        return body

    def measure() -> str | None:
        b = Child(mapper(400), NOBODY)
        a_done = [time.monotonic() for _ in s.map(work, range(600))]
        b_done = b.result(stop=False)
        # both backlogged: from the later first answer to the earlier last one, edges trimmed
        start = max(a_done[0], b_done[0]) + 0.2
        end = min(a_done[-1], b_done[-1]) - 0.2
        assert end - start > 1.0, "the two maps overlapped long enough to measure"
        n_a = sum(1 for t in a_done if start <= t <= end)
        n_b = sum(1 for t in b_done if start <= t <= end)
        ratio = n_a / max(1, n_b)
        print(f"both backlogged for {end - start:.2f}s: root {n_a}, nobody {n_b}, ratio {ratio:.2f}")
        if not 2.7 <= ratio <= 3.3:
            return f"root:nobody = {n_a}:{n_b} = {ratio:.2f}, not within 10% of 3"
        return None

    twice(measure)
    counts = requests_by_caller(d)
    assert counts.get(("root", "rejected"), 0) == 0 and counts.get(("nobody", "rejected"), 0) == 0
    s.close()


def test_status_and_metrics_show_waiting_calls_by_caller(start_daemon: Callable[..., Daemon]) -> None:
    d = open_to_all(start_daemon(fair_config(max=1, min=1, cruise=1)))
    s = d.session(pool="p")
    futures = [s.submit(hold, i) for i in range(8)]  # one runs, seven wait

    def shown() -> dict[str, Any] | None:
        fair = d.status()["pools"]["p"]["fairness"]
        return fair if fair["waiting"] and fair["waiting"][0]["waiting"] >= 5 else None

    fair = wait_for(shown, 10, what="root's waiting calls in the status")
    assert fair["mode"] == "caller" and fair["waiting"][0]["caller"] == "root"
    with d.session() as m:
        text = m.metrics()
    assert 'cruised_caller_queue_depth{caller="root",pool="p"}' in text
    out = d.cli("status", "--socket", d.socket)
    assert out.returncode == 0 and "waiting by caller (caller): root" in out.stdout, out.stdout
    assert [f.result(30) for f in futures] == list(range(8))
    s.close()


# -- HTTP door: two API keys; q door: two q users ------------------------------------------------

EPS = """
import time


def nap(x=0):
    time.sleep(0.01)
    return x
"""


@pytest.fixture
def doors(tmp_path: Path, start_daemon: Callable[..., Daemon]) -> Daemon:
    code = write(tmp_path / "eps.py", EPS)
    cfg = fair_config()
    cfg.update(
        {
            "http": {"listen": "127.0.0.1:0"},
            "qipc": {"listen": "127.0.0.1:0", "remote_pool": "p"},
            "services": {"t": {"api_keys": ["alice:key-a", "bob:key-b"], "endpoints": {"nap": {"code": code, "function": "nap", "pool": "p"}}}},
        }
    )
    return start_daemon(cfg, env={"PYKX_UNLICENSED": "true"})


def flood(one_factory: Callable[[], Callable[[], Any]], threads: int, total: int) -> tuple[float, int]:
    """``total`` calls from ``threads`` clients at once (each its own connection); (seconds, refusals)."""
    left = [total]
    refused = [0]
    lock = threading.Lock()

    def run() -> None:
        one = one_factory()
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            try:
                one()
            except Exception:  # noqa: BLE001 - counted: the flooding caller may be refused its excess
                with lock:
                    refused[0] += 1

    t = time.monotonic()
    ts = [threading.Thread(target=run) for _ in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join(120)
    return time.monotonic() - t, refused[0]


def door_scenario(d: Daemon, a_factory: Callable[[], Callable[[], Any]], b_factory: Callable[[], Callable[[], Any]]) -> None:
    """A floods from 6 clients (enough to keep both workers busy, under its share), B calls every 50 ms."""
    a_factory()()

    def measure() -> str | None:
        alone, _ = flood(a_factory, 6, 300)
        b = Child(every(b_factory()))
        t0 = time.monotonic()
        shared, _ = flood(a_factory, 6, 300)
        t1 = time.monotonic()
        lat, errors = latencies(b.result(), t0, t1)
        assert not errors, f"B was refused: {errors}"
        print(f"A alone {alone:.2f}s, shared {shared:.2f}s; B {len(lat)} calls, p50 {p50(lat) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms")
        if p50(lat) > 0.025 or max(lat) > 0.050:
            return f"B: p50 {p50(lat) * 1e3:.1f} ms, max {max(lat) * 1e3:.1f} ms over {len(lat)} calls"
        if shared > 1.15 * alone:
            return f"A alone {alone:.2f}s, shared {shared:.2f}s"
        return None

    twice(measure)


def test_the_http_door_shares_by_api_key_name(doors: Daemon) -> None:
    def caller(key: str) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            target = tcp(doors, api_key=key)

            def one() -> Any:
                resp = http_call(target, "t/nap", {"x": 1})
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status}")
                return resp

            return one

        return factory

    door_scenario(doors, caller("key-a"), caller("key-b"))
    counts = requests_by_caller(doors)
    assert counts.get(("bob", "rejected"), 0) == 0 and counts.get(("bob", "ok"), 0) > 20
    assert counts.get(("alice", "ok"), 0) >= 601


def test_the_http_unix_socket_names_its_peer_user_on_every_request_of_a_connection(doors: Daemon) -> None:
    """The fast path asks a connection's peer who it is once (a connected socket's credentials never
    change): every request on a keep-alive connection is still the peer user's."""
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    conn = persistent(unix(doors))
    try:
        for i in range(5):
            conn.request("POST", run_path("t", "nap"), body=b'{"x": %d}' % i, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            resp.read()
    finally:
        conn.close()
    assert requests_by_caller(doors).get((me, "ok"), 0) == 5


def test_the_q_door_shares_by_q_user(doors: Daemon) -> None:
    from support.qraw import RawQ, sym

    port = doors.status()["qipc"]["port"]

    def caller(user: bytes) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            q = RawQ(port, creds=user + b":")
            return lambda: q.call([sym("t/nap"), 1])

        return factory

    door_scenario(doors, caller(b"alice"), caller(b"bob"))
    counts = requests_by_caller(doors)
    assert counts.get(("bob", "rejected"), 0) == 0 and counts.get(("bob", "ok"), 0) > 20
    assert counts.get(("alice", "ok"), 0) >= 601


def test_a_map_keeps_its_credit_across_a_reload(start_daemon: Callable[..., Daemon]) -> None:
    """The reload swaps the pool's dispatcher in the middle of the map: the map's unspent credit
    moves to the new one, so no call is refused and each reaches the daemon once."""
    d = open_to_all(start_daemon(fair_config(min=1, cruise=1, max=1, queue_size=4)))
    s = d.session(pool="p")
    got: list[int] = []
    mapping = threading.Thread(target=lambda: got.extend(s.map(work, range(300))))
    mapping.start()
    wait_for(lambda: len(got) >= 50, 30, what="the map under way")
    with d.session() as r:
        ok, message = r.reload()
    assert ok, message
    mapping.join(60)
    assert got == list(range(300))
    counts = requests_by_caller(d)
    assert counts.get(("root", "ok"), 0) == 300 and counts.get(("root", "rejected"), 0) == 0, counts
    s.close()


# -- asyncio: amap spends credit as map does ------------------------------------------------------

#: items of an amap: 10x the pool's queue (fair_config: 16)
MANY = 160


def settled(d: Daemon) -> bool:
    """Pool p is at rest: nothing queued or running, no credit reserved or held by any connection."""
    st = d.status()["pools"]["p"]
    fair = st["fairness"]
    return st["queue"]["depth"] == 0 and st["workers"].get("busy", 0) == 0 and fair["reserved"] == 0 and fair["credit"] == []


async def test_an_amap_over_ten_queues_is_never_refused_and_sends_each_call_once(start_daemon: Callable[..., Daemon]) -> None:
    """A window (64) far beyond the queue (16): without credit the calls past the queue would be
    refused and sent again; with it each goes out once, when its place is reserved."""
    d = start_daemon(fair_config())
    s = d.session(pool="p")
    try:
        assert await s.acall(work, -1) == -1
        assert [r async for r in s.amap(work, range(MANY), window=64)] == list(range(MANY))
        await asyncio.to_thread(wait_for, lambda: settled(d), what="the amap's credit given back")
    finally:
        s.close()
    counts = requests_by_caller(d)
    assert counts.get(("root", "ok"), 0) == 1 + MANY and counts.get(("root", "rejected"), 0) == 0, counts


async def test_amaps_and_a_map_share_the_pool(start_daemon: Callable[..., Daemon]) -> None:
    """The session's asyncio and synchronous connections each hold an account on the caller's
    share, and two amaps on the one asyncio connection share its gate: all complete, none is
    refused, each call reaches the daemon once."""
    d = start_daemon(fair_config())
    s = d.session(pool="p")

    async def amapped(offset: int) -> list[int]:
        return [r async for r in s.amap(work, range(offset, offset + MANY), window=64)]

    try:
        assert await s.acall(work, -1) == -1
        mapping = asyncio.ensure_future(asyncio.to_thread(lambda: list(s.map(work, range(MANY), window=64))))
        first, second = await asyncio.wait_for(asyncio.gather(amapped(0), amapped(MANY)), 60)
        assert first == list(range(MANY)) and second == list(range(MANY, 2 * MANY))
        assert await asyncio.wait_for(mapping, 60) == list(range(MANY))
        await asyncio.to_thread(wait_for, lambda: settled(d), what="every map's credit given back")
    finally:
        s.close()
    counts = requests_by_caller(d)
    assert counts.get(("root", "ok"), 0) == 1 + 3 * MANY and counts.get(("root", "rejected"), 0) == 0, counts


@pytest.mark.parametrize("stop", ["break", "cancel"])
async def test_an_amap_left_early_withdraws_its_calls_and_gives_its_credit_back(start_daemon: Callable[..., Daemon], stop: str) -> None:
    """``break`` out of the ``async for`` (then ``aclose``), or the consuming task cancelled while
    it awaits the next result: the calls in flight are withdrawn and the connection's unspent
    credit is released (the pool reserves none for it any more)."""
    d = start_daemon(fair_config())
    s = d.session(pool="p")
    window = 16
    try:
        assert await s.acall(hold, -1) == -1
        got: list[int] = []
        accounts: list[str] = []  # the pool's credit accounts while the amap runs
        first = asyncio.Event()
        gen = s.amap(hold, range(MANY), window=window)

        async def consume() -> None:
            async for r in gen:
                if not got:  # (a blocking status call: the loop has nothing else to do meanwhile)
                    accounts.extend(c["caller"] for c in d.status()["pools"]["p"]["fairness"]["credit"])
                got.append(r)
                first.set()
                if stop == "break":
                    break
            await gen.aclose()

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(first.wait(), 30)
        assert accounts == ["root"], "the amap runs on credit"
        if stop == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await asyncio.wait_for(task, 30)
        await asyncio.to_thread(wait_for, lambda: settled(d), 30, what="calls withdrawn and credit given back")
        assert await s.acall(work, 7) == 7, "the connection is still in step"
    finally:
        s.close()
    counts = requests_by_caller(d)
    ok, cancelled = counts.get(("root", "ok"), 0) - 2, counts.get(("root", "cancelled"), 0)
    assert counts.get(("root", "rejected"), 0) == 0, counts
    # what was in flight at the stop (the credit's worth, max_queued_per_caller) is withdrawn:
    # at most the 2 running calls may have finished first, unseen
    assert cancelled >= 1, f"the calls in flight were withdrawn: {counts}"
    assert ok <= len(got) + 2 and ok + cancelled <= len(got) + window, f"no call ran for nobody: {counts}"


async def test_an_amap_on_a_pool_without_credit_raises_the_refusal(start_daemon: Callable[..., Daemon]) -> None:
    """The daemon refuses the CREDIT request (here: no such pool): amap goes on without flow
    control and raises what its calls are answered, as map does."""
    d = start_daemon(fair_config())
    s = d.session(pool="nowhere")
    try:
        with pytest.raises(errors.NoSuchPool, match="nowhere"):
            _ = [r async for r in s.amap(work, range(4))]
    finally:
        s.close()


def test_eight_threads_mapping_on_one_session_all_finish(start_daemon: Callable[..., Daemon]) -> None:
    """The maps of 8 threads share one connection's credit gate; each that runs out waits for the
    next grant, and every one of them must be woken by it (bench's threads8 row hung before)."""
    d = start_daemon(fair_config(queue_size=16))
    s = d.session(pool="p")
    results: list[list[int]] = [[] for _ in range(8)]

    def one(i: int) -> None:
        results[i].extend(s.map(work, range(i * 1000, i * 1000 + 150), window=32))

    for _ in range(2):  # the lost wakeup needed two maps waiting at once: a few rounds make it likely
        for r in results:
            r.clear()
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in threads), f"maps still waiting: {[len(r) for r in results]}"
        assert all(r == list(range(i * 1000, i * 1000 + 150)) for i, r in enumerate(results))
    s.close()
