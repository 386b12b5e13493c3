"""A real HAProxy (the OS package) in front of three real daemons, through all three doors.

The daemons listen on 127.0.0.2, .3 and .4 (the same ports on each, as on
real hosts); HAProxy runs deploy/haproxy/cruised.cfg itself, with only its
addresses and ports rewritten (bench/lbfront.py). Steady, bounded load goes
through HAProxy on the HTTP door (per-request balancing), the q door and the
mutual-TLS native door (per-connection balancing); each call answers with
the id of the daemon that ran it. Then: the spread, a drain and ``cruised
ready``, a SIGKILL and a restart, and a remote session whose ``map`` uses
every host. Skipped, with the reason, only when there is no haproxy binary
(.ci/run installs it).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cruised
from bench import lbfront
from cruised.client.http import run_path
from support.certs import Pki
from support.daemon import Daemon, pool_config, wait_for

HAPROXY = lbfront.haproxy_binary()
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="no haproxy binary (.ci/run installs Debian's haproxy package; apt-get install haproxy)")

WORKERS = 2  # per pool, per daemon
DELAY = 0.02  # seconds each call sleeps: the daemons' capacity, not the test machine's cores, sets the pace
LINGER = 2.0  # cruised drain --linger, as docs/scaling.md asks behind deploy/haproxy/cruised.cfg: above its 1 s check and agent intervals
IDS = ("d1", "d2", "d3")

ENDPOINT = """
import os
import time


def who(delay=0.0):
    time.sleep(float(delay))
    return os.environ["DAEMON_ID"]
"""


def who_native(delay: float) -> str:
    import os
    import time

    time.sleep(delay)
    return os.environ["DAEMON_ID"]


def daemon_config(n: int, host: str, ports: lbfront.Ports, pki: Pki, code: str) -> dict[str, Any]:
    """Daemon ``n``: pool ``web`` serves the HTTP door only (so its in-flight count is HAProxy's to bound), ``default`` the q and native doors."""
    env = {"DAEMON_ID": IDS[n]}
    fixed = {"min": WORKERS, "cruise": WORKERS, "max": WORKERS, "env": env}
    return {
        "daemon": {"max_message_bytes": "256MiB"},
        "pools": {"web": pool_config(**fixed), "default": pool_config(**fixed)},
        "services": {"svc": {"endpoints": {"who": {"code": code, "function": "who", "pool": "web"}, "whoq": {"code": code, "function": "who"}}}},
        "http": {"listen": f"{host}:{ports.http}"},
        "qipc": {"listen": f"{host}:{ports.q}", "unix": False},  # the same port on every host: no abstract socket to clash
        "remote": pki.remote_section(f"{host}:{ports.remote}", ["alice"]),
        "health": {"agent": f"{host}:{ports.agent}", "pools": ["web"]},
    }


@dataclass
class Farm:
    daemons: list[Daemon]
    haproxy: lbfront.Haproxy
    ports: lbfront.Ports
    pki: Pki

    def servers_up(self) -> bool:
        rows = self.haproxy.stat()
        return all(r["status"] == "UP" for r in rows if r["pxname"] in ("cruised_http", "cruised_q", "cruised_native") and r["svname"].startswith("cruised"))

    def status(self, backend: str, n: int) -> str:
        return lbfront.status_of(self.haproxy.server(backend, f"cruised{n + 1}"))

    def session(self, **kw: Any) -> cruised.Session:
        alice = self.pki.client("alice")
        return cruised.session(host="127.0.0.1", port=self.ports.front_remote, tls=alice.tls(self.pki.ca_file), **kw)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    assert HAPROXY is not None
    root = tmp_path_factory.mktemp("farm")
    pki = Pki(root / "pki")
    code = root / "who.py"
    code.write_text(ENDPOINT)
    ports = lbfront.Ports.pick()
    daemons = []
    for n, host in enumerate(lbfront.HOSTS):
        (root / IDS[n]).mkdir()
        daemons.append(Daemon(daemon_config(n, host, ports, pki, str(code)), root / IDS[n]))
    front = None
    try:
        for d in daemons:
            d.start(wait_ready=False)
        for d in daemons:
            d.wait_ready()
        front = lbfront.launch(HAPROXY, ports, root)
        farm = Farm(daemons, front, ports, pki)
        wait_for(farm.servers_up, 30, 0.1, "every server UP in HAProxy")
        yield farm
    finally:
        if front is not None:
            front.stop()
        for d in daemons:
            d.cleanup_or_fail()


# -- load ----------------------------------------------------------------------------------------


@dataclass
class Outcome:
    door: str
    start: float
    end: float
    daemon: str | None
    error: str | None


def http_caller(farm: Farm) -> tuple[Callable[[], str], Callable[[], None]]:
    conn = http.client.HTTPConnection("127.0.0.1", farm.ports.front_http, timeout=30)
    body = json.dumps({"delay": DELAY}).encode()

    def call() -> str:
        conn.request("POST", run_path("svc", "who"), body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            conn.close()  # HAProxy answers an error on a fresh connection next time
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
        return str(json.loads(data)["response"])

    return call, conn.close


def q_caller(farm: Farm) -> tuple[Callable[[], str], Callable[[], None]]:
    """A q client as a gateway runs one: one handle, reopened when it breaks or its daemon says draining."""
    from support.qraw import kx, sym

    handle: list[Any] = []

    def close() -> None:
        while handle:
            handle.pop().close()

    def call() -> str:
        for attempt in range(100):
            if not handle:
                handle.append(kx.SyncQConnection("127.0.0.1", farm.ports.front_q, no_ctx=True, timeout=30))
            try:
                return bytes(handle[0](sym("svc/whoq"), DELAY).py()).decode()
            except kx.QError as exc:
                if "draining" not in str(exc) or attempt == 99:
                    raise
                close()  # it never ran: reconnect, and HAProxy picks a daemon that is not draining
                time.sleep(min(0.2, 0.01 * 2**attempt))
            except Exception:
                close()  # a broken handle (its daemon died): this call failed, the next one reconnects
                raise
        raise AssertionError("unreachable")

    return call, close


def native_caller(session: cruised.Session) -> Callable[[], tuple[Callable[[], str], Callable[[], None]]]:
    def make() -> tuple[Callable[[], str], Callable[[], None]]:
        return (lambda: str(session.call(who_native, DELAY))), (lambda: None)

    return make


@dataclass
class Load:
    """Closed-loop callers on one door: ``threads`` threads, each at most ``limit`` calls, until ``stop``."""

    door: str
    make: Callable[[], tuple[Callable[[], str], Callable[[], None]]]
    threads: int
    limit: int
    outcomes: list[Outcome] = field(default_factory=list)
    halt: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"load-{self.door}-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def _run(self) -> None:
        call, close = self.make()
        try:
            for _ in range(self.limit):
                if self.halt.is_set():
                    break
                start = time.monotonic()
                try:
                    who, err = call(), None
                except Exception as exc:  # noqa: BLE001 - every failure is an outcome the test judges
                    who, err = None, f"{type(exc).__name__}: {exc}"
                self.outcomes.append(Outcome(self.door, start, time.monotonic(), who, err))
        finally:
            close()

    def stop(self, timeout: float = 60.0) -> Load:
        self.halt.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), f"{self.door} load did not stop"
        return self

    def join(self, timeout: float = 60.0) -> Load:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), f"{self.door} load did not finish"
        return self

    def served(self, since: float = 0.0) -> Counter[str]:
        return Counter(o.daemon for o in list(self.outcomes) if o.daemon is not None and o.start >= since)

    def errors(self) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.error is not None]


def loads(farm: Farm, session: cruised.Session, limit: int) -> list[Load]:
    return [
        Load("http", lambda: http_caller(farm), 6, limit),
        Load("q", lambda: q_caller(farm), 3, limit),  # one handle each: leastconn puts them on three daemons
        Load("native", native_caller(session), 3, limit),
    ]


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- the tests -------------------------------------------------------------------------------------


def test_shipped_config_passes_haproxy_check(tmp_path: Path) -> None:
    assert HAPROXY is not None
    shipped = lbfront.check(HAPROXY, lbfront.SHIPPED)
    assert shipped.returncode == 0, shipped.stdout + shipped.stderr
    rewritten = tmp_path / "cruised.cfg"
    rewritten.write_text(lbfront.rewrite(lbfront.SHIPPED.read_text(), lbfront.Ports.pick(), str(tmp_path / "s.sock")))
    result = lbfront.check(HAPROXY, rewritten)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_daemon_serves_and_none_holds_more_calls_than_workers(farm: Farm) -> None:
    before = [d.session().metrics() for d in farm.daemons]
    with farm.session(connections=3) as s:
        running = [load.start() for load in loads(farm, s, limit=40)]
        for load in running:
            load.join()
    for load in running:
        assert not load.errors(), load.errors()[:3]
        assert set(load.served()) == set(IDS), f"{load.door}: {load.served()}"
    servers = farm.haproxy.servers("cruised_http")
    after = [d.session().metrics() for d in farm.daemons]
    for n in range(len(farm.daemons)):
        row = servers[f"cruised{n + 1}"]
        # HAProxy's high-water mark of requests on each daemon: never above its workers (the agent's maxconn)
        assert 1 <= int(row["smax"]) <= WORKERS, row
        sent = int(row["stot"])
        answered = metric(after[n], "cruised_requests_total", pool="web", door="http") - metric(before[n], "cruised_requests_total", pool="web", door="http")
        # ...and the daemon agrees: it answered each request HAProxy sent it (stot counts the whole run)
        assert answered <= sent and answered == running[0].served()[IDS[n]], (answered, sent, running[0].served())
        # nothing waited in its queue for a worker: HAProxy held the surplus (bucket le=0.05: under 50 ms)
        waited = metric(after[n], "cruised_queue_wait_seconds_count", pool="web") - metric(before[n], "cruised_queue_wait_seconds_count", pool="web")
        quick = metric(after[n], "cruised_queue_wait_seconds_bucket", pool="web", le="0.05") - metric(
            before[n], "cruised_queue_wait_seconds_bucket", pool="web", le="0.05"
        )
        assert waited == answered and quick >= 0.95 * waited, (quick, waited)
    # HAProxy's own Prometheus exporter (the stats frontend) shows the same servers
    conn = http.client.HTTPConnection("127.0.0.1", farm.ports.front_stats, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        exposed = resp.read().decode()
    finally:
        conn.close()
    assert resp.status == 200
    for n in range(len(farm.daemons)):
        assert metric(exposed, "haproxy_server_status", proxy="cruised_http", server=f"cruised{n + 1}", state="UP") == 1
    assert 'haproxy_server_max_sessions{proxy="cruised_http",server="cruised1"}' in exposed


def test_drain_one_no_failures_no_new_work_and_ready_brings_it_back(farm: Farm) -> None:
    d2 = farm.daemons[1]
    with farm.session(connections=3) as s:
        running = [load.start() for load in loads(farm, s, limit=400)]
        wait_for(lambda: all(len(load.served()) == 3 for load in running), 20, 0.05, "every door served by every daemon")
        drained = d2.cli("drain", "--linger", str(LINGER))
        t_drained = time.monotonic()  # the drain began before this (the CLI is a new interpreter: it takes a while)
        assert drained.returncode == 0, drained.stderr
        wait_for(
            lambda: farm.status("cruised_http", 1) in ("DRAIN", "DOWN") or farm.status("cruised_http", 1).startswith("DOWN"),
            5,
            0.02,
            "HAProxy to see the drain",
        )
        t_seen = time.monotonic()
        assert t_seen - t_drained < LINGER  # the agent (agent-inter 1s) or /readyz (inter 1s, fall 1) told it within the linger
        wait_for(lambda: farm.status("cruised_q", 1).startswith("DOWN") and farm.status("cruised_native", 1).startswith("DOWN"), LINGER, 0.02, "the TCP doors")
        t_refusing = t_drained + LINGER + 0.5  # d2 refuses new calls from here on: its open connections' callers go elsewhere
        wait_for(lambda: all(sum(load.served(t_refusing).values()) >= 20 for load in running), 30, 0.05, "load to go on without d2")
        for load in running:
            assert not load.errors(), f"{load.door}: {load.errors()[:3]}"
            # HTTP balances per request: nothing new once HAProxy saw the drain; the TCP doors per connection:
            # no new connection went there, and the calls on the open ones moved away once d2 refused them
            since = t_seen + 0.05 if load.door == "http" else t_refusing
            assert "d2" not in load.served(since=since), f"{load.door} sent d2 new work after the drain: {load.served(since)}"
        report = d2.session().drain()
        assert report["state"] == "drained" and report["queued"] == report["running"] == 0

        ready = d2.cli("ready")
        assert ready.returncode == 0, ready.stderr
        t_ready = time.monotonic()
        wait_for(lambda: farm.status("cruised_http", 1).startswith("UP"), 10, 0.05, "d2 UP again")
        wait_for(lambda: running[0].served(t_ready)["d2"] >= 5, 20, 0.05, "HTTP calls on d2 again (under slowstart)")
        for load in running:
            load.stop()
            assert not load.errors(), f"{load.door}: {load.errors()[:3]}"
    wait_for(farm.servers_up, 10, 0.1, "every server UP")
    with farm.session(connections=3) as s:  # new connections: the TCP doors reach d2 again too
        assert set(s.map(who_native, [0.005] * 60)) == set(IDS)


def test_remote_session_through_haproxy_ships_a_large_array_and_maps_over_every_daemon(farm: Farm) -> None:
    with farm.session(connections=3) as s:
        s.add_library("numpy")

        def checksum(arr: Any) -> tuple[int, float]:
            return int(arr.nbytes), float(numpy.sum(arr))  # type: ignore[name-defined]  # noqa: F821 - imported by add_library in the worker

        big = np.arange(8 << 20, dtype=np.float64)  # 64 MiB
        assert s.call(checksum, big) == (64 << 20, float(big.sum()))
        t0 = time.monotonic()
        served = Counter(s.map(who_native, [0.0] * 10_000, window=32))
        elapsed = time.monotonic() - t0
    assert sum(served.values()) == 10_000
    assert set(served) == set(IDS), served
    assert min(served.values()) >= 1000, served  # each daemon ran a real share of the one map
    print(f"map of 10,000 calls through HAProxy over 3 daemons: {elapsed:.2f}s, {served}")


def test_sigkill_one_only_its_calls_fail_haproxy_stops_within_its_interval_and_it_rejoins(farm: Farm) -> None:
    d3 = farm.daemons[2]
    with farm.session(connections=3) as s:
        running = [load.start() for load in loads(farm, s, limit=400)]
        wait_for(lambda: all(len(load.served()) == 3 for load in running), 20, 0.05, "every door served by every daemon")
        t_kill = time.monotonic()
        os.killpg(d3.pgid, signal.SIGKILL)
        wait_for(lambda: farm.status("cruised_http", 2).startswith("DOWN"), 5, 0.02, "HAProxy to mark d3 down")
        t_down = time.monotonic()
        assert t_down - t_kill < 3.0  # inter 1s, fall 1
        t_after = t_down + 1.0
        wait_for(lambda: all(sum(load.served(t_after).values()) >= 20 for load in running), 30, 0.05, "load to go on without d3")
        for load in running:
            load.stop()
        failed = [o for load in running for o in load.errors()]
        # only what d3 held: calls started before it died (plus what was already on its way), each with a clear error
        assert len(failed) <= WORKERS + 3 + 3, failed  # HTTP: maxconn; q and native: a call per connection
        for o in failed:
            assert o.start < t_kill + 0.5, o
            # HTTP 502 from HAProxy; a session's "connection ... lost"; a q handle closed (pykx words one closed
            # in its handshake "Authentication error": it reconnected as d3 died, into d3's dying backlog)
            clear = ("502", "lost", "closed", "reset", "Connection", "EOF", "Authentication error")
            assert any(word in o.error for word in clear), o  # type: ignore[operator]  # error is set
        for load in running:
            assert "d3" not in load.served(since=t_kill + 0.5), f"{load.door}: {load.served(t_kill + 0.5)}"
            late = [o for o in load.errors() if o.start >= t_down]
            assert not late, late
    d3.stop()
    d3.start()
    wait_for(farm.servers_up, 20, 0.1, "d3 UP again in every backend")
    with farm.session(connections=3) as s:
        assert set(s.map(who_native, [0.005] * 60)) == set(IDS)
    call, close = http_caller(farm)
    try:
        wait_for(lambda: call() == "d3", 20, 0.0, "an HTTP call on the restarted d3")
    finally:
        close()
