"""The exec-deadline timer is armed lazily (one per worker), yet a call is killed exactly at its deadline.

Driven under a fake clock with a fake launcher: no processes, no sleeping.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable

from cruised.config import PoolConfig
from cruised.dispatch import Dispatcher, Job, Worker, WorkerState
from cruised.pool import frames
from cruised.pool.frames import Kind, Status


class FakeTimer:
    def __init__(self, clock: "FakeClock", when: float, cb: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when, self.cb, self.args, self.cancelled = when, cb, args, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.heap: list[tuple[float, int, FakeTimer]] = []
        self.seq = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, cb: Callable[..., Any], *args: Any) -> FakeTimer:
        t = FakeTimer(self, when, cb, args)
        heapq.heappush(self.heap, (when, next(self.seq), t))
        return t

    def live_timers(self) -> int:
        return sum(1 for _, _, t in self.heap if not t.cancelled)

    def advance(self, to: float) -> None:
        while self.heap and self.heap[0][0] <= to:
            when, _, t = heapq.heappop(self.heap)
            self.now = max(self.now, when)
            if not t.cancelled:
                t.cb(*t.args)
        self.now = to


class FakeLauncher:
    def __init__(self) -> None:
        self.sent: list[tuple[Worker, list[Any]]] = []
        self.killed: list[Worker] = []

    def spawn(self, worker: Worker) -> None:
        pass

    def send(self, worker: Worker, parts: list[Any], fd: int | None = None) -> None:
        self.sent.append((worker, parts))

    def kill(self, worker: Worker) -> None:
        self.killed.append(worker)

    def retire(self, worker: Worker) -> None:
        pass


class Sink:
    def __init__(self) -> None:
        self.answers: list[tuple[int, int]] = []

    def forward(self, job: Job, buf: bytearray, status: int) -> None:
        self.answers.append((job.client_reqid, status))

    def refuse(self, job: Job, status: int, message: str) -> None:
        self.answers.append((job.client_reqid, status))


KEY = b"k" * 16


def setup(exec_timeout: float = 10.0) -> tuple[Dispatcher, FakeClock, FakeLauncher, Sink, Worker]:
    clock, launcher, sink = FakeClock(), FakeLauncher(), Sink()
    d = Dispatcher("p", PoolConfig(min=1, cruise=1, max=1, exec_timeout=exec_timeout, queue_timeout=100.0, start_timeout=5.0), clock, launcher)
    d.register(KEY, bytearray(frames.frame(Kind.DEFINE, 0, b"code")))
    d.manage()
    (w,) = d.workers.values()
    d.on_worker_ready(w, {"pid": 1, "python": "3.11"})
    return d, clock, launcher, sink, w


def submit(d: Dispatcher, sink: Sink, reqid: int, timeout: float | None = None) -> Job:
    frame = bytearray(frames.frame(Kind.CALL, reqid, frames.call_head("p", 0, KEY)))
    job = Job(reqid * 100, Kind.CALL, frame, sink, sink, reqid, key=KEY, timeout=timeout)
    d.submit(job)
    return job


def reply(d: Dispatcher, w: Worker) -> None:
    assert w.job is not None
    d.on_worker_reply(w, bytearray(frames.frame(Kind.REPLY, w.job.id)), Status.OK, w.job.id)


def test_second_call_killed_at_its_own_deadline_not_the_first_calls() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)  # t=0: deadline 10
    clock.advance(1.0)
    reply(d, w)
    clock.advance(2.0)
    submit(d, sink, 2)  # t=2: deadline 12; the timer armed for 10 is kept
    assert clock.live_timers() == 1
    clock.advance(11.999)
    assert launcher.killed == [] and sink.answers == [(1, Status.OK)]
    clock.advance(12.0)
    assert launcher.killed == [w] and sink.answers[-1] == (2, Status.EXEC_TIMEOUT)
    assert w.state is WorkerState.KILLING


def test_calls_within_deadline_create_no_timer_per_call() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    for i in range(1, 200):
        submit(d, sink, i)
        clock.advance(clock.now + 0.01)
        reply(d, w)
    assert clock.live_timers() == 1  # the original, lazily re-armed one
    assert len(clock.heap) <= 2 and launcher.killed == []
    assert sink.answers == [(i, Status.OK) for i in range(1, 200)]


def test_shorter_per_call_timeout_rearms_earlier() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)
    reply(d, w)
    clock.advance(1.0)
    submit(d, sink, 2, timeout=0.5)  # deadline 1.5, earlier than the armed 10
    clock.advance(1.49)
    assert launcher.killed == []
    clock.advance(1.5)
    assert launcher.killed == [w] and sink.answers[-1] == (2, Status.EXEC_TIMEOUT)


def test_timer_firing_on_an_idle_worker_does_nothing_and_next_call_is_timed() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)
    reply(d, w)
    clock.advance(50.0)  # the old timer fires while idle
    assert launcher.killed == [] and clock.live_timers() == 0
    submit(d, sink, 2)  # t=50: deadline 60
    clock.advance(59.9)
    assert launcher.killed == []
    clock.advance(60.0)
    assert launcher.killed == [w] and sink.answers[-1] == (2, Status.EXEC_TIMEOUT)


def test_worker_exit_drops_its_exec_timer() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)
    d.on_worker_exit(w, -9)
    assert sink.answers == [(1, Status.WORKER_CRASHED)]
    assert w.exec_timer is None
    clock.advance(100.0)  # nothing left to fire against the gone worker (its replacement may time out starting)
    assert w not in launcher.killed
