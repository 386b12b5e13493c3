"""The exec-deadline timer is armed lazily (one per worker), yet a call is killed exactly at its deadline.

Driven under a fake clock with a fake launcher: no processes, no sleeping.
"""

from __future__ import annotations

from cruised.config import PoolConfig
from cruised.core.dispatch import Dispatcher, Job, Worker, WorkerState
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status
from support.fakes import FakeClock, FakeLauncher, Sink


def answers(sink: Sink) -> list[tuple[int, int]]:
    """(client reqid, status) of every answer so far."""
    return [(reqid, status) for reqid, status, _ in sink.replies]


KEY = b"k" * 16


def setup(exec_timeout: float = 10.0) -> tuple[Dispatcher, FakeClock, FakeLauncher, Sink, Worker]:
    clock, launcher, sink = FakeClock(now=0.0), FakeLauncher(), Sink()
    d = Dispatcher("p", PoolConfig(min=1, cruise=1, max=1, exec_timeout=exec_timeout, queue_timeout=100.0, start_timeout=5.0), clock, launcher)
    d.register(KEY, bytearray(frames.frame(Kind.DEFINE, 0, b"code")))
    d.manage()
    (w,) = d.workers.values()
    d.on_worker_ready(w, {"pid": 1, "python": "3.11"})
    return d, clock, launcher, sink, w


def submit(d: Dispatcher, sink: Sink, reqid: int, timeout: float | None = None) -> Job:
    frame = bytearray(frames.frame(Kind.CALL, reqid, frames.call_head("p", 0, KEY)))
    job = Job(id=reqid * 100, kind=Kind.CALL, frame=frame, sink=sink, client=sink, client_reqid=reqid, key=KEY, timeout=timeout)
    d.submit(job)
    return job


def reply(d: Dispatcher, w: Worker) -> None:
    assert w.job is not None
    d.on_worker_reply(w, bytearray(frames.frame(Kind.REPLY, w.job.id)), Status.OK, w.job.id)


def test_second_call_killed_at_its_own_deadline_not_the_first_calls() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)  # t=0: deadline 10
    clock.advance_to(1.0)
    reply(d, w)
    clock.advance_to(2.0)
    submit(d, sink, 2)  # t=2: deadline 12; the timer armed for 10 is kept
    assert clock.live_timers() == 1
    clock.advance_to(11.999)
    assert launcher.killed == [] and answers(sink) == [(1, Status.OK)]
    clock.advance_to(12.0)
    assert launcher.killed == [w] and answers(sink)[-1] == (2, Status.EXEC_TIMEOUT)
    assert w.state == WorkerState.KILLING


def test_calls_within_deadline_create_no_timer_per_call() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    for i in range(1, 200):
        submit(d, sink, i)
        clock.advance_to(clock.now + 0.01)
        reply(d, w)
    assert clock.live_timers() == 1  # the original, lazily re-armed one
    assert len(clock.heap) <= 2 and launcher.killed == []
    assert answers(sink) == [(i, Status.OK) for i in range(1, 200)]


def test_shorter_per_call_timeout_rearms_earlier() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)
    reply(d, w)
    clock.advance_to(1.0)
    submit(d, sink, 2, timeout=0.5)  # deadline 1.5, earlier than the armed 10
    clock.advance_to(1.49)
    assert launcher.killed == []
    clock.advance_to(1.5)
    assert launcher.killed == [w] and answers(sink)[-1] == (2, Status.EXEC_TIMEOUT)


def test_timer_firing_on_an_idle_worker_does_nothing_and_next_call_is_timed() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)
    reply(d, w)
    clock.advance_to(50.0)  # the old timer fires while idle
    assert launcher.killed == [] and clock.live_timers() == 0
    submit(d, sink, 2)  # t=50: deadline 60
    clock.advance_to(59.9)
    assert launcher.killed == []
    clock.advance_to(60.0)
    assert launcher.killed == [w] and answers(sink)[-1] == (2, Status.EXEC_TIMEOUT)


def test_worker_exit_drops_its_exec_timer() -> None:
    d, clock, launcher, sink, w = setup(10.0)
    submit(d, sink, 1)
    d.on_worker_exit(w, -9)
    assert answers(sink) == [(1, Status.WORKER_CRASHED)]
    assert w.exec_timer is None
    clock.advance_to(100.0)  # nothing left to fire against the gone worker (its replacement may time out starting)
    assert w not in launcher.killed


def test_a_reply_already_sent_when_the_deadline_fires_answers_the_call() -> None:
    # under load the loop may run the timer before reading a reply that is already in the socket
    d, clock, launcher, sink, w = setup(2.0)
    submit(d, sink, 1)
    pending = [w]
    launcher.drain = lambda worker: reply(d, pending.pop()) if pending and worker is w else None  # type: ignore[method-assign]  # the reply waiting in the channel
    clock.advance_to(2.0)
    assert answers(sink) == [(1, Status.OK)] and launcher.killed == []
    assert w.state == WorkerState.IDLE
    submit(d, sink, 2)  # and the next call still has its own deadline
    clock.advance_to(4.0)
    assert launcher.killed == [w] and answers(sink)[-1] == (2, Status.EXEC_TIMEOUT)
