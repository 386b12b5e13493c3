"""Prometheus metrics, exported by the supervisor alone.

Workers never import prometheus_client and keep no metrics: the supervisor
already sees every admission, dispatch, reply, timeout and exit, so it counts
them itself. That avoids prometheus_client's multiprocess mode (a directory of
mmap files, no custom collectors, ``mark_process_dead``) entirely.

Data flow::

    Dispatcher -> AnsweredFeed (daemon/core/observers.py) -> a batch of Answered records
        ──Observer port──> Metrics.requests_done
        -> plain per-label-set counts and bucket arrays (RequestCollector), resolved once
           per label set: a few integer additions per request, no locks
    Dispatcher.on_worker_exit, door auth checks -> prometheus_client Counters (rare events)

    GET /metrics (HTTP door), METRICS frame (`cruised metrics`)
        -> Supervisor.render_metrics() -> Metrics.render() -> generate_latest(own registry)
              RequestCollector: the request counter and histograms above
              counters above, cruised_draining (set by Supervisor.set_draining)
              + PoolCollector: queue depth, worker states, limits... read from each
                dispatcher at scrape time (nothing to keep in sync)
              + ProcessCollector: the supervisor's own fds, memory, CPU

Why not prometheus_client's Counter and Histogram for requests
    Each ``inc``/``observe`` takes a lock and a Python-level call chain: four of
    them cost ~9 µs per request, a tenth of the supervisor's CPU per call. The
    supervisor is single-threaded, so the per-request series are plain Python
    numbers that the collector turns into the same exposition at scrape time.

Invariants
    One ``CollectorRegistry`` per Metrics, never the global one: a test or an
    embedding program can create several daemons' metrics side by side, and
    nothing a library registers globally leaks into /metrics.
    Label values are bounded: ``pool`` (configured), ``endpoint`` (``function``
    for shipped functions, ``check`` for library checks, ``<service>/<endpoint>``
    for named endpoints; at most ``MAX_ENDPOINTS`` per pool, the rest count as
    ``other``), ``outcome`` (``OUTCOMES``), ``reason`` (``EXIT_REASONS``),
    ``state`` and ``limit`` (fixed sets), ``caller`` (the first
    ``metrics.top_callers`` callers of a pool on the requests counter, only
    with ``metrics.caller_labels``; the top ``metrics.top_callers`` by queue
    depth in ``cruised_caller_queue_depth``, at each scrape; the rest are
    ``other`` in both).
    Counts are exact: each answered request is counted once, by the dispatcher's
    ``AnsweredFeed.observe`` (which runs once per job, guarded by ``Job.answered``).

Histograms
    ``cruised_request_duration_seconds``: admission to reply, every answered
    request (a rejection counts as ~0 s; filter those with the counter).
    ``cruised_queue_wait_seconds``: admission to dispatch (or to giving up), for
    every request that was queued or started, i.e. all but the ones refused at
    the door. ``cruised_exec_seconds``: dispatch to reply, for every request
    that reached a worker (an exec timeout observes its limit, a crash the time
    until the worker died).
"""

from __future__ import annotations

import logging
import sys
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Info,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from cruised import __version__
from cruised.core.dispatch import WorkerState
from cruised.core.observers import Answered

if TYPE_CHECKING:
    from cruised.core.dispatch import Dispatcher

log = logging.getLogger("cruised.metrics")

#: the Content-Type for GET /metrics (text exposition format 0.0.4)
CONTENT_TYPE = CONTENT_TYPE_LATEST

OUTCOMES = ("ok", "error", "rejected", "queue_timeout", "exec_timeout", "crashed", "q_unavailable", "cancelled")
#: dispatcher outcomes outside OUTCOMES, folded into one that says the same to an operator
OUTCOME_ALIASES = {
    # the worker did not have the code (a cache mismatch): not run, the client registers and retries
    "unknown_function": "rejected",
}
#: the front doors, the ``door`` label of requests and of auth failures
DOORS = ("native", "http", "qipc", "remote")
EXIT_REASONS = ("crash", "exec_timeout", "cancelled", "recycled", "idle", "reload", "shutdown", "preload_failed")
WORKER_STATES = ("starting", "idle", "busy", "draining")
LIMITS = ("min", "cruise", "max")
#: distinct endpoint label values per pool (each costs ~40 series); more is a cardinality bug upstream
MAX_ENDPOINTS = 128
OTHER_ENDPOINT = "other"
#: the ``caller`` label of the callers beyond metrics.top_callers
OTHER_CALLER = "other"

#: 100 µs .. 60 s, roughly 1-2.5-5 per decade: enough to read a p99 of a 1 ms call and of a 30 s one
BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class _Count:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class _Hist:
    """One histogram series: per-bucket counts (not cumulative; the last is +Inf) and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1  # first bound >= value: Prometheus' le
        self.sum += value


_LE = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]


class RequestCollector:
    """The per-request series, kept as plain numbers (see the module docstring), exposed at scrape time."""

    def __init__(self, caller_labels: bool = False) -> None:
        self.caller_labels = caller_labels
        #: pool, endpoint, outcome, door (and caller, with caller_labels)
        self.requests: dict[tuple[str, ...], _Count] = {}
        self.duration: dict[tuple[str, str], _Hist] = {}  # pool, endpoint
        self.queue_wait: dict[tuple[str], _Hist] = {}  # pool
        self.exec: dict[tuple[str, str], _Hist] = {}  # pool, endpoint

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        requests, duration, queue_wait, exec_ = families = self._families()
        for key, c in self.requests.items():
            requests.add_metric(list(key), c.value)
        for family, series in ((duration, self.duration.items()), (queue_wait, self.queue_wait.items()), (exec_, self.exec.items())):
            for labels, h in series:
                total = 0
                buckets = []
                for le, n in zip(_LE, h.counts, strict=True):  # one bound per count, +Inf last
                    total += n
                    buckets.append((le, total))
                family.add_metric(list(labels), buckets, h.sum)
        return families

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily, HistogramMetricFamily, HistogramMetricFamily]:
        labels = ["pool", "endpoint", "outcome", "door"] + (["caller"] if self.caller_labels else [])
        return (
            CounterMetricFamily("cruised_requests", "Answered requests by pool, endpoint, outcome and front door (and caller, if configured).", labels=labels),
            HistogramMetricFamily("cruised_request_duration_seconds", "Admission to reply.", labels=["pool", "endpoint"]),
            HistogramMetricFamily("cruised_queue_wait_seconds", "Admission to dispatch to a worker (or to giving up).", labels=["pool"]),
            HistogramMetricFamily("cruised_exec_seconds", "Dispatch to a worker until its reply (or timeout, or death).", labels=["pool", "endpoint"]),
        )


@dataclass(slots=True)
class _Children:
    """The series one (pool, endpoint, outcome, door) updates, resolved once."""

    count: _Count
    duration: _Hist
    queue_wait: _Hist
    exec: _Hist


class Metrics:
    """The Observer behind /metrics. One per supervisor; ``attach`` it to each pool's dispatcher."""

    def __init__(
        self, dispatchers: Callable[[], Mapping[str, Dispatcher]], process: bool = True, *, caller_labels: bool = False, top_callers: int = 10
    ) -> None:
        # *_created series would double the exposition for a timestamp Prometheus (text format) ignores.
        # The switch is process-wide; only the supervisor process uses prometheus_client.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        r = self.registry
        self.series = RequestCollector(caller_labels)
        self.caller_labels = caller_labels
        self.top_callers = top_callers
        self._callers: dict[str, set[str]] = {}  # per pool: the callers with a label of their own
        r.register(self.series)
        self.exits = Counter("cruised_worker_exits", "Worker processes gone, by reason.", ["pool", "reason"], registry=r)
        self.auth_failures = Counter(
            "cruised_auth_failures",
            "Refused logins and keys by front door (native: peer not allowed; http: missing or wrong API key; qipc: bad credentials; "
            "remote: a TLS handshake refused, or a certificate not in remote.allowed_clients).",
            ["door"],
            registry=r,
        )
        for door in DOORS:
            self.auth_failures.labels(door)
        Info("cruised_build", "Version of cruised and of the supervisor's Python.", registry=r).info(
            {"version": __version__, "python": "{}.{}.{}".format(*sys.version_info[:3])}
        )
        #: 1 while the daemon drains (``cruised drain``: new calls refused, /readyz 503, the agent says ``drain``), else 0
        self.draining = Gauge("cruised_draining", "1 while the daemon is draining (cruised drain): new calls are refused until cruised ready.", registry=r)
        r.register(PoolCollector(dispatchers, top_callers))
        if process:
            ProcessCollector(namespace="cruised", registry=r)
        self._children: dict[tuple[str, ...], _Children] = {}
        self._endpoints: dict[str, set[str]] = {}
        self._capped: set[str] = set()  # pools that hit MAX_ENDPOINTS (warned once)

    def attach(self, dispatcher: Dispatcher) -> None:
        """Observe this dispatcher; its pool's fixed label sets appear at once, as zeros."""
        if self not in dispatcher.observers:
            dispatcher.observers.append(self)
        pool = dispatcher.name
        if not self.caller_labels:
            for outcome in OUTCOMES:
                self.series.requests.setdefault((pool, "function", outcome, "native"), _Count())
        for reason in EXIT_REASONS:
            self.exits.labels(pool, reason)
        self.series.queue_wait.setdefault((pool,), _Hist())

    # -- Observer ------------------------------------------------------------------

    def requests_done(self, pool: str, batch: list[Answered]) -> None:
        children = self._children
        # each Answered unpacked in its field order: one step, not eight attribute reads a request
        with_caller = self.caller_labels
        for endpoint, door, _, waited, outcome, queue_s, exec_s, _, caller in batch:
            key: tuple[str, ...] = (pool, endpoint, outcome, door, caller) if with_caller else (pool, endpoint, outcome, door)
            c = children.get(key)
            if c is None:
                c = self._resolve(key)
            c.count.value += 1
            # _Hist.observe, inline: three per request
            total = queue_s if exec_s is None else queue_s + exec_s
            h = c.duration
            h.counts[bisect_left(BUCKETS, total)] += 1
            h.sum += total
            if waited:  # it got a worker or a place in the queue
                h = c.queue_wait
                h.counts[bisect_left(BUCKETS, queue_s)] += 1
                h.sum += queue_s
            if exec_s is not None:
                h = c.exec
                h.counts[bisect_left(BUCKETS, exec_s)] += 1
                h.sum += exec_s

    def worker_exit(self, pool: str, reason: str) -> None:
        self.exits.labels(pool, reason).inc()

    def auth_failed(self, door: str) -> None:
        """A refused login, key or peer (brute-force attempts show up here)."""
        self.auth_failures.labels(door).inc()

    def _resolve(self, key: tuple[str, ...]) -> _Children:
        pool, endpoint, outcome, door = key[:4]
        outcome = OUTCOME_ALIASES.get(outcome, outcome)
        if outcome not in OUTCOMES:
            log.warning("pool=%s unexpected request outcome %r counted as error", pool, outcome)
            outcome = "error"
        seen = self._endpoints.setdefault(pool, set())
        cache = True
        if endpoint not in seen:
            if len(seen) >= MAX_ENDPOINTS:
                if pool not in self._capped:
                    self._capped.add(pool)
                    log.warning("pool=%s has more than %d endpoints: %r and later ones count as %r", pool, MAX_ENDPOINTS, endpoint, OTHER_ENDPOINT)
                endpoint, cache = OTHER_ENDPOINT, False  # do not let the cache grow with them either
            else:
                seen.add(endpoint)
        labels: tuple[str, ...] = (pool, endpoint, outcome, door)
        if self.caller_labels:
            callers = self._callers.setdefault(pool, set())
            caller = key[4]
            if caller not in callers:
                if len(callers) >= self.top_callers:
                    caller, cache = OTHER_CALLER, False  # bounded: later callers share one series
                else:
                    callers.add(caller)
            labels += (caller,)
        series = self.series
        c = _Children(
            series.requests.setdefault(labels, _Count()),
            series.duration.setdefault((pool, endpoint), _Hist()),
            series.queue_wait.setdefault((pool,), _Hist()),
            series.exec.setdefault((pool, endpoint), _Hist()),
        )
        if cache:
            self._children[key] = c
        return c

    # -- exposition --------------------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition of everything above, gauges computed now."""
        return generate_latest(self.registry)


class PoolCollector:
    """Gauges read from the live dispatchers at each scrape (nothing cached, nothing to drift)."""

    def __init__(self, dispatchers: Callable[[], Mapping[str, Dispatcher]], top_callers: int = 10) -> None:
        self.dispatchers = dispatchers
        self.top_callers = top_callers

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        depth, capacity, workers, limits, q_connected, q_required, oldest, held, callers = families
        for name, d in self.dispatchers().items():
            held.add_metric([name], d.counters.held)
            depth.add_metric([name], len(d.queue) + d.held_count)
            capacity.add_metric([name], d.config.queue_size)
            c = d.counts
            by_state = {
                "starting": c[WorkerState.STARTING],
                "idle": c[WorkerState.IDLE],
                "busy": c[WorkerState.BUSY],
                # a worker being killed is on its way out, like a draining one
                "draining": c[WorkerState.DRAINING] + c[WorkerState.KILLING],
            }
            for state in WORKER_STATES:
                workers.add_metric([name, state], by_state[state])
            for limit in LIMITS:
                limits.add_metric([name, limit], getattr(d.config, limit))
            # the q-connection feature adds Dispatcher.q_connected(); until then no worker holds one
            q = getattr(d, "q_connected", None)
            q_connected.add_metric([name], q() if callable(q) else 0)
            q_required.add_metric([name], 1 if d.config.q is not None and d.config.q.required else 0)
            first = d.queue.oldest()
            oldest.add_metric([name], d.clock.time() - first.admitted if first is not None else 0.0)
            top, rest = d.queue.top(self.top_callers)
            for caller, waiting in top:
                callers.add_metric([name, caller], waiting)
            if rest:
                callers.add_metric([name, OTHER_CALLER], rest)
        return families

    @staticmethod
    def _families() -> tuple[
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        GaugeMetricFamily,
        CounterMetricFamily,
        GaugeMetricFamily,
    ]:
        return (
            GaugeMetricFamily("cruised_queue_depth", "Requests waiting for a worker (in the queue or held by a busy one).", labels=["pool"]),
            GaugeMetricFamily("cruised_queue_capacity", "The pool's queue_size.", labels=["pool"]),
            GaugeMetricFamily("cruised_workers", "Worker processes by state.", labels=["pool", "state"]),
            GaugeMetricFamily("cruised_pool_size_limits", "The pool's min, cruise and max.", labels=["pool", "limit"]),
            GaugeMetricFamily("cruised_q_connected_workers", "Workers holding a live q connection.", labels=["pool"]),
            # what an alert on a lost q connection needs to know: only a required pool stops serving without it
            GaugeMetricFamily(
                "cruised_q_required", "1 if the pool's q connection is required (pools.<name>.q.required): it is ready only while connected.", labels=["pool"]
            ),
            GaugeMetricFamily("cruised_oldest_queued_seconds", "Age of the oldest queued request (0 if none).", labels=["pool"]),
            CounterMetricFamily("cruised_held_calls", "Calls handed to a busy worker to wait behind its running one (prefetch).", labels=["pool"]),
            GaugeMetricFamily(
                "cruised_caller_queue_depth",
                "Calls waiting (queued or held) by caller: the top metrics.top_callers callers by depth, the rest as other.",
                labels=["pool", "caller"],
            ),
        )
