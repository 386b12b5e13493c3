"""What a pool tells its observers (metrics, the access log) about answered requests and worker exits.

Data flow::

    Dispatcher._finish / on_worker_reply ──> AnsweredFeed.observe(job, outcome)
        counts it at once (Counters: ``cruised status``)
        appends an ``Answered`` record to the batch
    batch full (ANSWERED_BATCH) or ANSWERED_EVERY after its first record,
    or a reader's flush ──> every Observer.requests_done(pool, batch)

    Dispatcher.on_worker_exit ──> AnsweredFeed.worker_exit ──> Observer.worker_exit

Why batches
    A call per observer per request cost the supervisor 10-14 us of CPU per
    call (metrics and the access log). Whoever reads what observers keep
    flushes first (Supervisor.render_metrics, shutdown, a retired pool's last
    step), so a scrape still counts every request answered before it; the
    access log writes its lines later anyway.

Invariants
    Each answered request is observed exactly once: ``observe`` is called
    only by the dispatcher, after ``Job.settle`` returned True. Records reach
    the observers in answer order. ``Counters`` and ``observers`` are created
    once and never replaced (the dispatcher and Metrics.attach hold them).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

if TYPE_CHECKING:
    from cruised.core.dispatch import Clock, Job

#: answered requests reach the observers in batches (AnsweredFeed.flush): of this many,
ANSWERED_BATCH = 64
#: or this long (seconds) after the first of a batch, whichever comes first
ANSWERED_EVERY = 0.02


class Answered(NamedTuple):
    """One answered request, as observers see it (one is built for every request)."""

    endpoint: str
    door: str  # the front door that admitted it (native, http, qipc)
    client: Any  # the job's client: the access log's peer
    waited: bool  # it got a worker or a place in the queue (not refused at the door)
    outcome: str
    queue_s: float
    exec_s: float | None  # None if it never ran
    at: float  # wall-clock time of the answer, for log lines
    caller: str  # who sent it (daemon/core/fairness.py "Callers")


# tuple.__new__ straight, not Answered(...): the generated __new__ is a Python frame, 0.4 us a request
_answered = tuple.__new__


def answer_record(job: Job, outcome: str, queue_s: float, exec_s: float | None) -> Answered:
    """What observers are told of ``job``, answered with ``outcome`` now."""
    waited = job.started is not None or bool(job.deadline)
    return _answered(Answered, (job.endpoint, job.door, job.client, waited, outcome, queue_s, exec_s, time.time(), job.caller))


class Observer(Protocol):
    def requests_done(self, pool: str, batch: list[Answered]) -> None:
        """Requests answered since the last batch, in answer order (see AnsweredFeed.flush)."""

    def worker_exit(self, pool: str, reason: str) -> None: ...


class Counters:
    """Plain counts for ``cruised status``, kept as events happen; the metrics module observes the same events."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.exits: dict[str, int] = {}
        self.held = 0  # jobs handed to a busy worker to hold (see "Holding" in dispatch.py)

    def worker_exit(self, pool: str, reason: str) -> None:
        self.exits[reason] = self.exits.get(reason, 0) + 1


class AnsweredFeed:
    """One pool's answered requests on their way to its observers: counted at once, shown in batches."""

    __slots__ = ("_call_at", "_requests", "_time", "_timer", "counters", "observers", "pool", "to_observe")

    def __init__(self, pool: str, clock: Clock, observer: Observer | None = None) -> None:
        self.pool = pool
        self.counters = Counters()
        self.observers: list[Observer] = [observer] if observer else []
        #: answered requests the observers have not seen yet (see flush)
        self.to_observe: list[Answered] = []
        self._timer: Any = None
        # bound once: observe runs for every request
        self._time = clock.time
        self._call_at = clock.call_at
        self._requests = self.counters.requests

    def observe(self, job: Job, outcome: str) -> None:
        """Count ``job``, answered with ``outcome``, and queue its record for the observers."""
        end = job.finished if job.finished is not None else self._time()
        start = job.started if job.started is not None else end
        requests = self._requests
        requests[outcome] = requests.get(outcome, 0) + 1
        if not self.observers:
            return
        batch = self.to_observe
        # answer_record, inline (a call less per request pays for the NamedTuple)
        waited = job.started is not None or bool(job.deadline)
        exec_s = end - job.started if job.started is not None else None
        batch.append(_answered(Answered, (job.endpoint, job.door, job.client, waited, outcome, start - job.admitted, exec_s, time.time(), job.caller)))
        if len(batch) >= ANSWERED_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = self._call_at(end + ANSWERED_EVERY, self.flush)

    def flush(self) -> None:
        """Show the observers every request answered since the last flush (see "Why batches")."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.to_observe:
            return
        batch, self.to_observe = self.to_observe, []
        for o in self.observers:
            o.requests_done(self.pool, batch)

    def worker_exit(self, reason: str) -> None:
        """A worker of the pool is gone, for ``reason`` (counted, and told to every observer)."""
        self.counters.worker_exit(self.pool, reason)
        for o in self.observers:
            o.worker_exit(self.pool, reason)
