"""Dispatcher fakes: a clock that moves only when told, a launcher that records, a reply sink.

The dispatcher's ports (Clock, Launcher, ReplySink) made of plain lists, so unit
tests drive its policy with no processes and no sleeps. ``observe_one`` shows
an observer (metrics, the access log) one answered request without a dispatcher.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

from cruised.config import PoolConfig
from cruised.core.dispatch import Dispatcher, Job, Worker, WorkerState
from cruised.core.observers import Observer, answer_record
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status

KEY = b"K" * 16


class FakeClock:
    """The dispatcher's Clock port: time moves only when a test says so, and timers fire in order."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.heap: list[tuple[float, int, Handle]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, cb: Callable[..., Any], *args: Any) -> Handle:
        h = Handle(cb, args)
        heapq.heappush(self.heap, (when, next(self._seq), h))
        return h

    def advance(self, dt: float) -> None:
        self.advance_to(self.now + dt)

    def advance_to(self, end: float) -> None:
        """Fire every timer due by ``end``, each at its own time, then stop at ``end``."""
        while self.heap and self.heap[0][0] <= end:
            when, _, h = heapq.heappop(self.heap)
            self.now = max(self.now, when)
            if not h.cancelled:
                h.cb(*h.args)
        self.now = end

    def live_timers(self) -> int:
        return sum(1 for _, _, h in self.heap if not h.cancelled)


class Handle:
    def __init__(self, cb: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.cb, self.args, self.cancelled = cb, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLauncher:
    def __init__(self) -> None:
        self.spawned: list[Worker] = []
        self.sent: list[tuple[Worker, list[Any]]] = []
        self.killed: list[Worker] = []
        self.retired: list[Worker] = []
        self.posted: list[tuple[Worker, int]] = []  # (worker, job id) posted on its cancel board
        self.interrupted: list[Worker] = []

    def spawn(self, worker: Worker) -> None:
        self.spawned.append(worker)

    def send(self, worker: Worker, parts: list[Any], fd: int | None = None) -> None:
        self.sent.append((worker, parts))

    def kill(self, worker: Worker) -> None:
        self.killed.append(worker)

    def retire(self, worker: Worker) -> None:
        self.retired.append(worker)

    def rss(self, worker: Worker) -> int | None:
        return self.rss_value

    def drain(self, worker: Worker) -> None:
        pass  # nothing sent and unread: the fake workers answer through the test

    def cancel(self, worker: Worker, job_id: int) -> None:
        self.posted.append((worker, job_id))

    def interrupt(self, worker: Worker) -> None:
        self.interrupted.append(worker)

    rss_value: int | None = None


class Sink:
    def __init__(self) -> None:
        self.replies: list[tuple[int, int, str]] = []  # (client reqid, status, message)

    def forward(self, job: Job, buf: bytearray, status: int) -> None:
        self.replies.append((job.client_reqid, status, "forwarded"))

    def refuse(self, job: Job, status: int, message: str) -> None:
        self.replies.append((job.client_reqid, status, message))


_ids = itertools.count(1)


def make(**cfg: Any) -> tuple[Dispatcher, FakeClock, FakeLauncher]:
    base = dict(min=1, cruise=1, max=1, queue_size=2, queue_timeout=10.0, exec_timeout=60.0, idle_timeout=30.0)
    base.update(cfg)
    clock, launcher = FakeClock(), FakeLauncher()
    d = Dispatcher("p", PoolConfig(**base), clock, launcher)
    d.register(KEY, bytearray(frames.frame(Kind.DEFINE, 0, frames.register_head("p", KEY, b"{}"))))
    d.manage()
    return d, clock, launcher


def ready_all(d: Dispatcher) -> None:
    for w in list(d.workers.values()):
        if w.state == WorkerState.STARTING:
            d.on_worker_ready(w, {"pid": 1, "python": "3.11"})


def job(sink: Sink, client: Any = None, timeout: float | None = None, key: bytes = KEY, caller: str = "", credited: bool = False) -> Job:
    reqid = next(_ids)
    frame = bytearray(frames.frame(Kind.CALL, reqid, frames.call_head("p", 0, key)))
    return Job(
        id=next(_ids),
        kind=Kind.CALL,
        frame=frame,
        sink=sink,
        client=client or sink,
        client_reqid=reqid,
        key=key,
        timeout=timeout,
        caller=caller,
        credited=credited,
    )


def reply(d: Dispatcher, w: Worker, status: int = Status.OK) -> None:
    assert w.job is not None
    d.on_worker_reply(w, bytearray(frames.frame(Kind.REPLY, w.job.id, b"", status)), status, w.job.id)


def observe_one(observer: Observer, pool: str, job: Job, outcome: str, queue_s: float, exec_s: float | None) -> None:
    """Show ``observer`` one answered request now, as the dispatcher's batches would."""
    observer.requests_done(pool, [answer_record(job, outcome, queue_s, exec_s)])
