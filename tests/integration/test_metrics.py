"""Prometheus metrics: exact counts after known traffic, scrape-time gauges, label rules.

The integration test drives a real daemon with traffic whose every outcome is
known in advance and then parses ``cruised metrics`` (the METRICS frame; the
HTTP door serves the same bytes at GET /metrics) with prometheus_client's own
parser, so every number is checked the way Prometheus would read it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import cruised
from cruised.config import PoolConfig
from cruised.core.dispatch import Dispatcher, Job
from cruised.ops.metrics import BUCKETS, EXIT_REASONS, MAX_ENDPOINTS, OUTCOMES, Metrics
from cruised.pool.wire.frames import Kind
from support.daemon import Daemon, pool_config, wait_for
from support.fakes import FakeClock, FakeLauncher, observe_one

ROOT = Path(__file__).resolve().parents[2]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no sample {name}{labels}; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def scrape(d: Daemon) -> Samples:
    with d.session() as s:
        return parse(s.metrics())


# -- functions shipped to the workers ------------------------------------------------


def add(x: int, y: int) -> int:
    return x + y


def boom() -> None:
    raise ValueError("expected failure")


def wait_for_file(path: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.005)
    return "released"


def sleep_long() -> None:
    time.sleep(60)


def crash() -> None:
    os._exit(7)


def imported_modules() -> list[str]:
    return sorted(m for m in sys.modules if m.split(".")[0] in ("prometheus_client", "cruised"))


# -- the exact-count test ----------------------------------------------------------------


def test_exact_counts_after_known_traffic(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(
        {
            "pools": {
                "default": pool_config(min=1, cruise=1, max=1, queue_size=2, queue_timeout="30s"),
                "slow": pool_config(min=1, cruise=1, max=1, queue_size=4, queue_timeout="300ms"),
            }
        }
    )
    gate, slow_gate = str(tmp_path / "gate"), str(tmp_path / "slow-gate")
    n_ok, m_rejected, k_exec_timeouts = 5, 3, 2

    with d.session() as s, d.session(timeout=0.3) as short, d.session(pool="slow") as slow:
        for i in range(n_ok):
            assert s.call(add, i, 1) == i + 1
        with pytest.raises(ValueError, match="expected failure"):
            s.call(boom)

        # one call holds the only worker, two fill the queue: the next m are rejected at the door
        held = [s.submit(wait_for_file, gate)]
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, what="the gated call to run")
        held += [s.submit(wait_for_file, gate) for _ in range(2)]
        wait_for(lambda: d.status()["pools"]["default"]["queue"]["depth"] == 2, what="two queued calls")

        busy = scrape(d)  # gauges are computed at scrape time
        assert value(busy, "cruised_queue_depth", pool="default") == 2
        assert value(busy, "cruised_queue_capacity", pool="default") == 2
        assert value(busy, "cruised_workers", pool="default", state="busy") == 1
        assert value(busy, "cruised_workers", pool="default", state="idle") == 0
        assert value(busy, "cruised_oldest_queued_seconds", pool="default") > 0

        for _ in range(m_rejected):
            with pytest.raises(cruised.QueueFull):
                s.call(add, 1, 1)
        Path(gate).touch()
        assert [f.result(timeout=30) for f in held] == ["released"] * 3

        for _ in range(k_exec_timeouts):
            with pytest.raises(cruised.ExecutionTimeout):
                short.call(sleep_long)
        with pytest.raises(cruised.WorkerCrashed):
            s.call(crash)

        # the slow pool: one call holds its worker, the next waits past queue_timeout
        slow_held = slow.submit(wait_for_file, slow_gate)
        wait_for(lambda: d.status()["pools"]["slow"]["workers"]["busy"] == 1, what="the slow pool's gated call")
        with pytest.raises(cruised.QueueTimeout):
            slow.call(add, 1, 2)
        Path(slow_gate).touch()
        assert slow_held.result(timeout=30) == "released"

    def settled() -> Samples | None:
        m = scrape(d)
        exits_done = value(m, "cruised_worker_exits_total", pool="default", reason="exec_timeout") == k_exec_timeouts
        refilled = value(m, "cruised_workers", pool="default", state="idle") == 1
        return m if exits_done and refilled else None

    m = wait_for(settled, what="the killed workers to be replaced")

    expected = {
        "default": {"ok": n_ok + 3, "error": 1, "rejected": m_rejected, "queue_timeout": 0, "exec_timeout": k_exec_timeouts, "crashed": 1},
        "slow": {"ok": 1, "error": 0, "rejected": 0, "queue_timeout": 1, "exec_timeout": 0, "crashed": 0},
    }
    for pool, outcomes in expected.items():
        for outcome in OUTCOMES:
            want = outcomes.get(outcome, 0)
            got = value(m, "cruised_requests_total", pool=pool, endpoint="function", outcome=outcome, door="native")
            assert got == want, f"{pool} {outcome}: {got} != {want}"
    # only the known label sets exist: no endpoint or outcome we did not send
    requests = {k for k in m if k[0] == "cruised_requests_total"}
    assert len(requests) == 2 * len(OUTCOMES)

    answered = {p: sum(o.values()) for p, o in expected.items()}
    reached_worker = {p: o["ok"] + o["error"] + o["exec_timeout"] + o["crashed"] for p, o in expected.items()}
    queued_or_run = {p: answered[p] - o["rejected"] for p, o in expected.items()}
    for pool in expected:
        assert value(m, "cruised_request_duration_seconds_count", pool=pool, endpoint="function") == answered[pool]
        assert value(m, "cruised_exec_seconds_count", pool=pool, endpoint="function") == reached_worker[pool]
        assert value(m, "cruised_queue_wait_seconds_count", pool=pool) == queued_or_run[pool]
        # buckets are cumulative and end at the count
        for hist, labels in (("cruised_exec_seconds", {"endpoint": "function"}), ("cruised_queue_wait_seconds", {})):
            counts = [value(m, f"{hist}_bucket", pool=pool, le=_le(b), **labels) for b in BUCKETS]
            assert counts == sorted(counts)
            assert value(m, f"{hist}_bucket", pool=pool, le="+Inf", **labels) == value(m, f"{hist}_count", pool=pool, **labels)
    # the two exec timeouts each ran for their whole 0.3 s limit; the queue timeout waited its 0.3 s
    assert value(m, "cruised_exec_seconds_sum", pool="default", endpoint="function") >= 2 * 0.3
    assert value(m, "cruised_queue_wait_seconds_sum", pool="slow") >= 0.3
    # the five quick calls resolve below a second; the two exec timeouts do not resolve below 0.25 s
    assert value(m, "cruised_exec_seconds_bucket", pool="default", endpoint="function", le="0.25") <= reached_worker["default"] - 2

    exits = {r: value(m, "cruised_worker_exits_total", pool="default", reason=r) for r in EXIT_REASONS}
    assert exits == {r: {"exec_timeout": 2, "crash": 1}.get(r, 0) for r in EXIT_REASONS}
    assert all(value(m, "cruised_worker_exits_total", pool="slow", reason=r) == 0 for r in EXIT_REASONS)

    for pool in ("default", "slow"):
        assert value(m, "cruised_queue_depth", pool=pool) == 0
        assert value(m, "cruised_oldest_queued_seconds", pool=pool) == 0
        assert value(m, "cruised_workers", pool=pool, state="busy") == 0
        assert value(m, "cruised_workers", pool=pool, state="starting") == 0
        assert value(m, "cruised_q_connected_workers", pool=pool) == 0
        assert [value(m, "cruised_pool_size_limits", pool=pool, limit=x) for x in ("min", "cruise", "max")] == [1, 1, 1]
    assert value(m, "cruised_queue_capacity", pool="slow") == 4
    assert value(m, "cruised_build_info", version=cruised.__version__, python="{}.{}.{}".format(*sys.version_info[:3])) == 1

    # the CLI prints the same exposition
    out = d.cli("metrics")
    assert out.returncode == 0, out.stderr
    assert value(parse(out.stdout), "cruised_requests_total", pool="default", endpoint="function", outcome="rejected", door="native") == m_rejected


def _le(bound: float) -> str:
    return str(float(bound))


def test_workers_do_not_import_prometheus_client(daemon: Daemon) -> None:
    with daemon.session() as s:
        mods = s.call(imported_modules)
    assert not [m for m in mods if m.startswith("prometheus_client")], mods
    assert "cruised.ops.metrics" not in mods


def test_metrics_cli_without_daemon_fails_clearly(tmp_path: Path) -> None:
    import subprocess

    env = dict(os.environ, CRUISED_SOCKET=str(tmp_path / "none.sock"))
    out = subprocess.run([sys.executable, "-m", "cruised", "metrics"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert "no cruised daemon answers" in out.stderr


# -- unit tests: the observer's label rules, under a fake clock ---------------------------


class Client:
    peer = (1, 2, 3)


def _dispatcher() -> tuple[Dispatcher, FakeClock]:
    clock = FakeClock(now=100.0)  # its timers fire only if a test advances it; these never do
    return Dispatcher("p", PoolConfig(min=0, cruise=1, max=1, queue_size=1), clock, FakeLauncher()), clock


def _job(endpoint: str = "function") -> Job:
    return Job(id=1, kind=Kind.CALL, frame=bytearray(64), sink=None, client=Client(), client_reqid=1, endpoint=endpoint)  # type: ignore[arg-type]  # a test Client stands in for a door's sink


def test_outcome_aliases_and_histogram_membership() -> None:
    disp, clock = _dispatcher()
    metrics = Metrics(lambda: {"p": disp}, process=False)
    metrics.attach(disp)

    refused = _job()  # refused at the door: no queue wait observed
    refused.admitted = clock.now
    observe_one(metrics, "p", refused, "rejected", 0.0, None)

    ran = _job("svc/predict")
    ran.admitted, ran.deadline, ran.started = 100.0, 110.0, 100.5
    observe_one(metrics, "p", ran, "ok", 0.5, 0.25)

    resent = _job()  # the worker lacked the code: not run, counted as rejected
    resent.admitted, resent.started = 100.0, 100.0
    observe_one(metrics, "p", resent, "unknown_function", 0.0, 0.001)

    m = parse(metrics.render().decode())
    assert value(m, "cruised_requests_total", pool="p", endpoint="function", outcome="rejected", door="native") == 2
    assert value(m, "cruised_requests_total", pool="p", endpoint="svc/predict", outcome="ok", door="native") == 1
    assert not any(dict(k[1]).get("outcome") == "unknown_function" for k in m)
    assert value(m, "cruised_queue_wait_seconds_count", pool="p") == 2
    assert value(m, "cruised_queue_wait_seconds_sum", pool="p") == 0.5
    assert value(m, "cruised_request_duration_seconds_sum", pool="p", endpoint="svc/predict") == 0.75
    assert value(m, "cruised_exec_seconds_bucket", pool="p", endpoint="svc/predict", le="0.25") == 1
    assert value(m, "cruised_exec_seconds_bucket", pool="p", endpoint="svc/predict", le="0.1") == 0


def test_histograms_expose_what_prometheus_client_would() -> None:
    """The lock-free request series render exactly as prometheus_client's own Histogram."""
    import random

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    disp, _ = _dispatcher()
    metrics = Metrics(lambda: {"p": disp}, process=False)
    registry = CollectorRegistry()
    reference = Histogram("cruised_exec_seconds", "x", ["pool", "endpoint"], buckets=BUCKETS, registry=registry)
    rng = random.Random(7)
    values = list(BUCKETS) + [0.0, 1e-7, 3600.0] + [rng.uniform(0, 2) ** 6 for _ in range(500)]  # every bound exactly, too
    for v in values:
        observe_one(metrics, "p", _job("svc/e"), "ok", 0.0, v)
        reference.labels("p", "svc/e").observe(v)
    ours = {k: v for k, v in parse(metrics.render().decode()).items() if k[0].startswith("cruised_exec_seconds")}
    theirs = {k: v for k, v in parse(generate_latest(registry).decode()).items() if k[0].startswith("cruised_exec_seconds")}
    assert ours.keys() == theirs.keys() and len(ours) == len(BUCKETS) + 3
    for k in ours:
        assert ours[k] == pytest.approx(theirs[k]), k


def test_endpoint_label_is_bounded(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert MAX_ENDPOINTS >= 64  # room for real deployments
    cap = 8
    monkeypatch.setattr("cruised.ops.metrics.MAX_ENDPOINTS", cap)
    disp, _ = _dispatcher()
    metrics = Metrics(lambda: {"p": disp}, process=False)
    for i in range(cap + 50):
        observe_one(metrics, "p", _job(f"svc/e{i}"), "ok", 0.0, 0.001)
    m = parse(metrics.render().decode())
    endpoints = {dict(k[1])["endpoint"] for k in m if k[0] == "cruised_requests_total"}
    assert len(endpoints) == cap + 1
    assert value(m, "cruised_requests_total", pool="p", endpoint="other", outcome="ok", door="native") == 50
    assert len(metrics._children) == cap  # the overflow does not grow the cache either
    assert len([r for r in caplog.records if "more than" in r.getMessage()]) == 1


def test_gauges_follow_the_dispatcher_and_q_connected_hook() -> None:
    disp, clock = _dispatcher()
    metrics = Metrics(lambda: {"p": disp}, process=False)
    m = parse(metrics.render().decode())
    assert value(m, "cruised_q_connected_workers", pool="p") == 0
    disp.q_connected = lambda: 3  # type: ignore[attr-defined]  # the q-connection feature's hook
    job = _job()
    job.admitted = clock.now
    job.flow = disp.queue.flow_of("alice", job.client, 0.01)
    job.flow.waiting += 1
    disp.queue.append(job)
    clock.now += 2.5
    m = parse(metrics.render().decode())
    assert value(m, "cruised_q_connected_workers", pool="p") == 3
    assert value(m, "cruised_queue_depth", pool="p") == 1
    assert value(m, "cruised_oldest_queued_seconds", pool="p") == 2.5
    assert value(m, "cruised_caller_queue_depth", pool="p", caller="alice") == 1


def test_callers_beyond_the_top_fold_into_other() -> None:
    disp, _ = _dispatcher()
    metrics = Metrics(lambda: {"p": disp}, process=False, caller_labels=True, top_callers=2)
    for caller, waiting in (("a", 5), ("b", 3), ("c", 2), ("d", 1)):
        disp.queue.flow_of(caller, None, 0.01).waiting = waiting
    for caller in ("a", "b", "c", "d", "a"):
        job = _job()
        job.caller = caller
        observe_one(metrics, "p", job, "ok", 0.0, 0.001)
    m = parse(metrics.render().decode())
    depth = {dict(k[1])["caller"]: v for k, v in m.items() if k[0] == "cruised_caller_queue_depth"}
    assert depth == {"a": 5, "b": 3, "other": 3}
    requests = {dict(k[1])["caller"]: v for k, v in m.items() if k[0] == "cruised_requests_total"}
    assert requests == {"a": 2, "b": 1, "other": 2}, "the first top_callers callers by name, later ones as other"


def test_registries_are_private() -> None:
    from prometheus_client import REGISTRY

    disp, _ = _dispatcher()
    Metrics(lambda: {"p": disp}, process=False)
    assert REGISTRY.get_sample_value("cruised_requests_total", {"pool": "p", "endpoint": "function", "outcome": "ok"}) is None


# -- the docs and the dashboard name only metrics that exist -------------------------------


def test_docs_and_dashboard_reference_real_metrics() -> None:
    disp, _ = _dispatcher()
    metrics = Metrics(lambda: {"p": disp}, process=True)
    metrics.attach(disp)
    observe_one(metrics, "p", _job(), "ok", 0.0, 0.001)
    text = metrics.render().decode()
    exposed = {name for name, _ in parse(text)} | {f.name for f in text_string_to_metric_families(text)}

    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs, "dashboard has no queries"
    doc = (ROOT / "docs" / "operations.md").read_text()
    for where, text in [("dashboard", "\n".join(exprs)), ("operations.md", doc)]:
        used = set(re.findall(r"\bcruised_[a-z_]+\b", text))
        assert used, where
        unknown = {u for u in used if u not in exposed and f"{u}_total" not in exposed and not u.endswith("_created")}
        unknown -= {"cruised_process"}  # prose prefix of the process_* family
        assert not unknown, f"{where} names metrics that are not exported: {sorted(unknown)}"
    for needle in ("rate(cruised_requests_total[1m])", "histogram_quantile(0.99"):
        assert needle in doc


def test_door_label_and_auth_failures_are_counted(start_daemon, tmp_path) -> None:
    """Requests carry the door they came through; refused API keys are counted (brute force shows)."""
    import socket as _socket

    from support.httphelp import basic, call, tcp, unix, write

    with _socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = write(tmp_path / "ep.py", "def ping():\n    return 'pong'\n")
    d = start_daemon(
        {
            "pools": {"default": pool_config()},
            "http": {"listen": f"127.0.0.1:{port}"},
            "services": {"s": {"api_keys": ["k-1"], "endpoints": {"ping": {"code": code, "function": "ping"}}}},
        }
    )
    assert call(unix(d), "s/ping").status == 200
    for _ in range(3):
        assert call(tcp(d), "s/ping", headers=basic("wrong")).status == 401
    assert call(tcp(d, api_key="k-1"), "s/ping").status == 200
    with d.session() as s:
        s.call(add, 1, 2)
        m = parse(s.metrics())
    assert value(m, "cruised_requests_total", pool="default", endpoint="s/ping", outcome="ok", door="http") == 2
    assert value(m, "cruised_requests_total", pool="default", endpoint="function", outcome="ok", door="native") == 1
    assert value(m, "cruised_auth_failures_total", door="http") == 3
    assert value(m, "cruised_auth_failures_total", door="qipc") == 0
