"""One pool's status document, and the q connection state its workers report.

``PoolStatus.document()`` is the pool's section of ``cruised status``,
``GET /status`` and the STATUS frame (and what ``.cruised.stats`` and the
systemd STATUS= line summarise). It reads the dispatcher at the moment it is
asked, so it cannot drift from the state the dispatcher owns.

q connection (pools with ``q:``): each worker reports its q state in READY
and in STATE frames when it changes; ``note_q`` keeps the latest report on
the worker (``Worker.q``), logs the transitions and remembers the last error.
``q_connected`` counts the warm workers whose connection is up: the status
document and metrics show it, and with ``q.required`` the dispatcher's
readiness depends on it.

Nothing here changes a queue, a worker's state or a deadline: those stay the
dispatcher's alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cruised.core.dispatch import WorkerState

if TYPE_CHECKING:
    from cruised.core.dispatch import Dispatcher, Worker

log = logging.getLogger("cruised.dispatch")  # the dispatcher's events, under its logger as before

#: callers shown by name in the status's ``fairness.waiting`` (the rest are summed)
TOP_CALLERS = 10


class PoolStatus:
    """The status and q reports of ``dispatcher``'s pool."""

    __slots__ = ("dispatcher", "q_last_error")

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.q_last_error: str | None = None  # the latest q connection error any worker reported

    def note_q(self, worker: Worker, q: Any) -> bool:
        """Keep ``worker``'s q report ``q`` (a READY or STATE frame's ``q``); True if it changed."""
        if not isinstance(q, dict):
            return False
        before = worker.q
        worker.q = {"connected": bool(q.get("connected")), "error": q.get("error")}
        if worker.q["error"]:
            self.q_last_error = str(worker.q["error"])
        was = bool(before and before["connected"])
        name = self.dispatcher.name
        if worker.q["connected"] and not was:
            log.info("worker=%s pool=%s q connected", worker.id, name)
        elif not worker.q["connected"] and (was or before is None):
            log.warning("worker=%s pool=%s q not connected: %s", worker.id, name, worker.q["error"])
        return worker.q != before

    def q_connected(self) -> int:
        """Ready workers (idle or busy) whose q connection is up; 0 in a pool without q."""
        return sum(1 for w in self.dispatcher.workers.values() if w.state in (WorkerState.IDLE, WorkerState.BUSY) and w.q is not None and w.q["connected"])

    def document(self) -> dict[str, Any]:
        """The pool's status: workers by state, queue, limits, readiness, counts, q, every worker."""
        d = self.dispatcher
        cfg = d.config
        states = {WorkerState.name(s): n for s, n in d.counts.items() if s != WorkerState.GONE}
        now = d.clock.time()
        first = d.queue.oldest()
        oldest = now - first.admitted if first is not None else 0.0
        return {
            "workers": states,
            "queue": {
                "depth": d.queue.n + d.held_count,
                "held": d.held_count,
                "capacity": cfg.queue_size,
                "oldest_s": round(oldest, 6),
            },
            "fairness": self.fairness_document(),
            "limits": {"min": cfg.min, "cruise": cfg.cruise, "max": cfg.max},
            "ready": d.ready(),
            "python": d.python,
            "last_error": d.last_error,
            "requests": dict(d.counters.requests),
            "held_total": d.counters.held,
            "exits": dict(d.counters.exits),
            "q": self.q_document(),
            "env": d.env.status() if d.env is not None else None,
            "worker_list": [
                {"id": w.id, "pid": w.pid, "state": WorkerState.name(w.state), "requests": w.requests, "error": w.error, "q": w.q} for w in d.workers.values()
            ],
        }

    def fairness_document(self) -> dict[str, Any]:
        """How the pool is shared now: the callers with the most calls waiting (queued or held), the
        rest summed, and the credit granted to pipelined callers (daemon/core/fairness.py)."""
        d = self.dispatcher
        top, rest = d.queue.top(TOP_CALLERS)
        return {
            "mode": d.config.fairness,
            "max_queued_per_caller": d.caller_limit,
            "waiting": [{"caller": name, "waiting": n} for name, n in top],
            "waiting_others": rest,
            "reserved": d.reserved,
            "credit": sorted(({"caller": a.flow.name, "unspent": a.unused} for a in d.accounts.values()), key=lambda c: str(c["caller"])),
        }

    def q_document(self) -> dict[str, Any] | None:
        """The ``q`` section of the status; None for a pool without q."""
        d = self.dispatcher
        q = d.config.q
        if q is None:
            return None
        return {
            "endpoint": q.endpoint,
            "user": q.username,
            "required": q.required,
            "connected": self.q_connected(),
            "workers": d.counts[WorkerState.IDLE] + d.counts[WorkerState.BUSY],
            "last_error": self.q_last_error,
        }
