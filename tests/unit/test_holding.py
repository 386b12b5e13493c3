"""Holding (prefetch): busy workers get queued jobs to hold behind their running one.

The dispatcher's claims (daemon/core/dispatch.py, "Holding") are checked two ways:
scenarios under the fake clock, and a randomized model of worker processes
that run their channel strictly in order, send each reply before starting the
next call, check a HELD deadline against the same clock, and die at any point.
The model's ledger of what actually ran is compared with what every caller
was told.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from cruised.core.dispatch import PREFETCH_BELOW, Dispatcher, Job, Worker, WorkerState
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status
from support.fakes import FakeClock, FakeLauncher, Sink, job, make, ready_all, reply


def short_calls(d: Dispatcher) -> None:
    """The pool's recent calls were short (what a stream of fast replies does to the average)."""
    d.exec_avg = PREFETCH_BELOW / 10


def sent_kinds(parts: list[Any]) -> list[tuple[int, int]]:
    return [frames.parse_header(bytes(p[: frames.HEADER_SIZE]), 1 << 30)[1:4:2] for p in parts]


def busy_pool(**cfg: Any) -> tuple[Dispatcher, FakeClock, FakeLauncher, Sink, list[Job]]:
    base: dict[str, Any] = dict(min=2, cruise=2, max=2, queue_size=10, prefetch=2)
    base.update(cfg)
    d, clock, launcher = make(**base)
    ready_all(d)
    short_calls(d)
    sink = Sink()
    jobs = [job(sink) for _ in range(7)]
    for j in jobs:
        d.submit(j)
    return d, clock, launcher, sink, jobs


def test_busy_workers_hold_queued_jobs_behind_a_held_deadline_frame() -> None:
    d, clock, launcher, sink, jobs = busy_pool()
    running = [j for j in jobs if j.started is not None]
    held = [j for j in jobs if j.held]
    assert len(running) == 2 and len(held) == 4 and len(d.queue) == 1  # 2 per worker, round robin
    assert d.status()["queue"] == {"depth": 5, "held": 4, "capacity": 10, "oldest_s": 0.0}
    (w, parts) = next((w, p) for w, p in launcher.sent if any(k == Kind.HELD for k, _ in sent_kinds(p)))
    kinds = sent_kinds(parts)
    assert [k for k, _ in kinds][-2:] == [Kind.HELD, Kind.CALL] and kinds[-1][1] == kinds[-2][1]  # HELD names its call
    j = next(j for j in held if j.id == kinds[-1][1])
    assert frames.HELD_DEADLINE.unpack_from(parts[-2], frames.HEADER_SIZE)[0] == int(j.deadline * 1e9)
    assert j.deadline == j.admitted + d.config.queue_timeout

    first = w.job
    clock.advance(0.0005)  # a short call
    reply(d, w)
    nxt = w.job
    assert nxt is not first  # the next held job is running now...
    assert nxt is not None and not nxt.held and nxt.started == clock.now  # ...with its exec deadline from now
    assert len(w.held) == 2, "the reply made room: the queued job is held at once"
    assert not d.queue
    assert [s for _, s, _ in sink.replies] == [Status.OK]


def test_no_holding_unless_calls_are_short_and_the_pool_is_at_max() -> None:
    d, _clock, _launcher = make(min=2, cruise=2, max=2, queue_size=10)
    ready_all(d)  # exec_avg starts pessimistic: nothing is known about the calls yet
    sink = Sink()
    for _ in range(5):
        d.submit(job(sink))
    assert d.held_count == 0 and len(d.queue) == 3

    d, _clock, _launcher = make(min=1, cruise=1, max=3, queue_size=10)
    ready_all(d)
    short_calls(d)
    for _ in range(5):
        d.submit(job(sink))
    assert d.held_count == 0, "below max a new worker takes queued jobs sooner"

    d, *_ = make(min=2, cruise=2, max=2, queue_size=10, prefetch=0)
    ready_all(d)
    short_calls(d)
    for _ in range(5):
        d.submit(job(sink))
    assert d.held_count == 0, "prefetch: 0 turns holding off"


def test_admission_counts_held_jobs_as_queued() -> None:
    d, _, _, sink, _jobs = busy_pool(queue_size=4)
    assert d.held_count == 4 and not d.queue
    assert sum(1 for _, s, _ in sink.replies if s == Status.QUEUE_FULL) == 1  # the 7th of 2 running + 4 waiting


def test_a_dead_worker_crashes_its_running_job_and_requeues_the_held_ones() -> None:
    d, _, _launcher, sink, jobs = busy_pool()
    w = jobs[0].worker
    assert w is not None
    running, held = w.job, list(w.held)
    d.on_worker_exit(w, -9)
    assert running is not None and running.answered
    crashed = [r for r in sink.replies if r[1] == Status.WORKER_CRASHED]
    assert len(crashed) == 1 and crashed[0][0] == running.client_reqid
    assert list(d.queue)[: len(held)] == held, "back at the front, in their order"
    assert all(not j.held and not j.answered for j in held)
    assert d.held_count == 2  # the other worker's


def test_a_reply_read_before_the_exit_makes_the_next_held_job_the_crashed_one() -> None:
    d, _, _launcher, sink, jobs = busy_pool()
    w = jobs[0].worker
    assert w is not None
    first_held, second_held = w.held
    d.on_worker_lost(w)  # its channel ended...
    reply(d, w)  # ...and what it sent before is delivered before the exit report
    d.on_worker_exit(w, -11)
    assert [r[0] for r in sink.replies if r[1] == Status.WORKER_CRASHED] == [first_held.client_reqid]
    assert second_held in d.queue and not second_held.answered


def test_held_deadline_reads_the_worker_first_then_answers_queue_timeout() -> None:
    d, clock, launcher, sink, jobs = busy_pool(queue_timeout=5.0)
    w = jobs[0].worker
    assert w is not None
    a, b = w.held
    drained: list[Worker] = []
    launcher.drain = lambda worker: drained.append(worker)  # type: ignore[method-assign]  # nothing was sent
    clock.advance(5.0)
    assert w in drained
    timed_out = {r[0] for r in sink.replies if r[1] == Status.QUEUE_TIMEOUT}
    assert a.client_reqid in timed_out and b.client_reqid in timed_out
    # later the worker reaches them, finds the deadline passed and says NOT_RUN: no second answer
    reply(d, w)  # the running job
    assert w.job is a
    reply(d, w, Status.NOT_RUN)
    reply(d, w, Status.NOT_RUN)
    assert w.job is None and w.state == WorkerState.IDLE
    other = next(x for x in d.workers.values() if x is not w).job  # still running: unanswered
    assert [len([r for r in sink.replies if r[0] == j.client_reqid]) for j in jobs if j is not other] == [1] * 6


def test_a_reply_found_by_the_drain_means_the_held_job_started_in_time() -> None:
    d, clock, launcher, sink, jobs = busy_pool(queue_timeout=5.0)
    w = jobs[0].worker
    assert w is not None
    a, b = w.held
    launcher.drain = lambda worker: reply(d, worker) if worker is w and w.job is not a else None  # type: ignore[method-assign]  # a test double in place of the launcher's method
    clock.advance(5.0)
    assert w.job is a and not a.answered, "it started before its deadline: it runs"
    assert b.answered and any(r == (b.client_reqid, Status.QUEUE_TIMEOUT) for r in ((x[0], x[1]) for x in sink.replies))


def test_not_run_from_the_worker_answers_queue_timeout() -> None:
    d, _clock, _launcher, sink, jobs = busy_pool()
    w = jobs[0].worker
    assert w is not None
    a = w.held[0]
    reply(d, w)
    reply(d, w, Status.NOT_RUN)  # the worker saw the deadline first
    answer = [r for r in sink.replies if r[0] == a.client_reqid]
    assert len(answer) == 1 and answer[0][1] == Status.QUEUE_TIMEOUT and "not run" in answer[0][2]
    assert d.counters.requests.get("queue_timeout") == 1


def test_holding_respects_max_requests() -> None:
    d, _clock, _launcher, _sink, _jobs = busy_pool(max_requests=2)
    # each worker may run 2 calls: the running one plus at most one held
    assert all(len(w.held) <= 1 for w in d.workers.values())
    for w in list(d.workers.values()):
        reply(d, w)
        reply(d, w)
        assert w.state == WorkerState.DRAINING and w.requests == 2


def test_exec_timeout_keeps_held_jobs_until_the_worker_is_gone() -> None:
    d, clock, _launcher, _sink, jobs = busy_pool(exec_timeout=2.0, queue_timeout=30.0)
    w = jobs[0].worker
    assert w is not None
    held = list(w.held)
    clock.advance(2.0)
    assert w.state == WorkerState.KILLING and all(j.held for j in held), "still on its channel: not yet known unstarted"
    d.on_worker_exit(w, -15)
    assert all(j in d.queue or j.started is not None for j in held) and not any(j.answered for j in held)


def test_shutdown_answers_held_jobs_of_workers_that_end_after_the_queue_was_aborted() -> None:
    d, _clock, _launcher, sink, jobs = busy_pool()
    d.stop_accepting()
    d.abort_queue("shutting down")
    d.terminate_all()
    for w in list(d.workers.values()):
        d.on_worker_exit(w, -15)
    assert sorted(len([r for r in sink.replies if r[0] == j.client_reqid]) for j in jobs) == [1] * 7
    assert sum(1 for r in sink.replies if r[1] == Status.SHUTTING_DOWN) >= 4


# -- the randomized model ----------------------------------------------------------------


@dataclass
class Proc:
    """A worker process as the model sees it: its channel in order, and replies not yet read."""

    worker: Worker
    inbox: deque[tuple[int, int | None]] = field(default_factory=deque)  # (reqid, HELD deadline ns)
    running: int | None = None
    outbox: deque[tuple[int, int]] = field(default_factory=deque)  # (reqid, status) sent, unread
    alive: bool = True
    doomed: bool = False  # the supervisor killed it: it dies at the next step


class Model:
    def __init__(self, d: Dispatcher, clock: FakeClock, launcher: FakeLauncher) -> None:
        self.d, self.clock, self.launcher = d, clock, launcher
        self.procs: dict[str, Proc] = {}
        self.ran: list[int] = []  # job ids, each time a call started
        launcher.send = self.on_send  # type: ignore[method-assign]  # a test double in place of the launcher's method
        launcher.kill = self.on_kill  # type: ignore[method-assign]  # a test double in place of the launcher's method
        launcher.drain = self.deliver  # type: ignore[method-assign]  # a test double in place of the launcher's method

    def proc(self, w: Worker) -> Proc:
        return self.procs.setdefault(w.id, Proc(w))

    def on_send(self, w: Worker, parts: list[Any], fd: int | None = None) -> None:
        p = self.proc(w)
        deadline = None
        for part in parts:
            _, kind, _, reqid = frames.parse_header(bytes(part[: frames.HEADER_SIZE]), 1 << 30)
            if kind == Kind.HELD:
                deadline = frames.HELD_DEADLINE.unpack_from(bytes(part), frames.HEADER_SIZE)[0]
            elif kind == Kind.CALL:
                p.inbox.append((reqid, deadline))
                deadline = None

    def on_kill(self, w: Worker) -> None:
        self.launcher.killed.append(w)
        self.proc(w).doomed = True

    def deliver(self, w: Worker) -> None:
        p = self.proc(w)
        while p.outbox:
            reqid, status = p.outbox.popleft()
            self.d.on_worker_reply(w, bytearray(frames.frame(Kind.REPLY, reqid, b"", status)), status, reqid)

    def die(self, p: Proc) -> None:
        p.alive = False
        self.d.on_worker_lost(p.worker)
        self.deliver(p.worker)  # what the launcher does before reporting the exit
        self.d.on_worker_exit(p.worker, -9)

    def step(self, rng: random.Random) -> None:
        live = [p for p in self.procs.values() if p.alive]
        doomed = [p for p in live if p.doomed]
        if doomed and rng.random() < 0.5:
            self.die(doomed[0])
            return
        r = rng.random()
        if r < 0.25 and live:
            p = rng.choice(live)
            if p.running is None and p.inbox:  # the worker reads its next call
                reqid, deadline = p.inbox.popleft()
                if deadline is not None and self.clock.now * 1e9 >= deadline:
                    p.outbox.append((reqid, Status.NOT_RUN))
                else:
                    p.running = reqid
                    self.ran.append(reqid)
        elif r < 0.5 and live:
            p = rng.choice(live)
            if p.running is not None:  # the call returns; its reply is sent (not yet read)
                p.outbox.append((p.running, Status.OK))
                p.running = None
        elif r < 0.7 and live:
            self.deliver(rng.choice(live).worker)  # the supervisor's loop reads a channel
        elif r < 0.73 and live:
            self.die(rng.choice(live))  # a crash, anywhere
        else:
            self.clock.advance(rng.choice([0.0001, 0.001, 0.01, 0.3]))
        ready_all(self.d)
        for w in self.d.workers.values():
            self.proc(w)


@pytest.mark.parametrize("seed", range(60))
def test_model_every_job_answered_once_and_never_run_twice(seed: int) -> None:
    rng = random.Random(seed)
    fairness = rng.choice(["caller", "connection", "none"])  # every invariant holds whatever the order (daemon/core/fairness.py)
    d, clock, launcher = make(
        min=2, cruise=2, max=3, queue_size=8, queue_timeout=1.0, exec_timeout=2.0, prefetch=rng.choice([1, 2, 4]), fairness=fairness, shares={"a": 3.0}
    )
    model = Model(d, clock, launcher)
    ready_all(d)
    for w in d.workers.values():
        model.proc(w)
    sinks: list[Sink] = []
    jobs: list[Job] = []
    for _ in range(400):
        if rng.random() < 0.3:
            if rng.random() < 0.9:
                short_calls(d)
            s = Sink()
            j = job(s, caller=rng.choice("abc"))
            sinks.append(s)
            jobs.append(j)
            d.submit(j)
        model.step(rng)
    # let everything finish: workers run what they have, the supervisor reads it, time passes
    for _ in range(5000):
        if all(len(s.replies) == 1 for s in sinks):
            break
        for p in list(model.procs.values()):
            if not p.alive:
                continue
            if p.doomed:
                model.die(p)
                continue
            if p.running is not None:
                p.outbox.append((p.running, Status.OK))
                p.running = None
            elif p.inbox:
                reqid, deadline = p.inbox.popleft()
                if deadline is not None and clock.now * 1e9 >= deadline:
                    p.outbox.append((reqid, Status.NOT_RUN))
                else:
                    p.running = reqid
                    model.ran.append(reqid)
            model.deliver(p.worker)
        clock.advance(0.05)
        ready_all(d)
        for w in d.workers.values():
            model.proc(w)
    assert all(len(s.replies) == 1 for s in sinks), [s.replies for s in sinks if len(s.replies) != 1]
    assert len(model.ran) == len(set(model.ran)), "a job ran twice"
    ran = set(model.ran)
    for j, s in zip(jobs, sinks, strict=True):  # one sink per job
        status = s.replies[0][1]
        if status == Status.OK:
            assert j.id in ran
        elif status in (Status.QUEUE_TIMEOUT, Status.QUEUE_FULL, Status.SHUTTING_DOWN):
            assert j.id not in ran, f"job {j.id} answered {Status.name(status)} but ran"
    assert d.held_count == sum(len(w.held) for w in d.workers.values())
    assert d.queue.n == 0 and all(f.waiting == 0 and not f.jobs for f in d.queue.flows.values()), "every flow's count came back to 0"


def test_a_requeued_held_job_is_sent_again_with_its_shared_file() -> None:
    """The supervisor keeps a call's shared file until the call is answered: a held call whose
    worker died goes to the next worker with the same descriptor (pool/wire/sharedfile.py)."""
    import os

    from cruised.pool.wire import sharedfile

    d, _, launcher = make(min=2, cruise=2, max=2, queue_size=10, prefetch=2)
    ready_all(d)
    short_calls(d)
    sink = Sink()
    sent: list[tuple[Worker, int | None, list[int]]] = []  # (worker, fd, reqids of the CALLs sent)
    plain_send = launcher.send

    def send(worker: Worker, parts: list[Any], fd: int | None = None) -> None:
        sent.append((worker, fd, [r for k, r in sent_kinds(parts) if k == Kind.CALL]))
        plain_send(worker, parts, fd)

    launcher.send = send  # type: ignore[method-assign]  # a test double in place of the launcher's method
    jobs = []
    try:
        for _ in range(4):
            j = job(sink)
            j.shared = sharedfile.Owned(os.memfd_create("test-shared"))
            jobs.append(j)
            d.submit(j)
        assert all(fd == j.shared.fd for j in jobs for _, fd, ids in sent if j.id in ids), "each CALL goes with its own file"
        held = next(j for j in jobs if j.held)
        w = held.worker
        assert w is not None and w.job is not None
        running, running_fd = w.job, w.job.shared.fd
        d.on_worker_exit(w, -9)
        assert held in d.queue and held.shared.fd >= 0, "requeued, its file still open"
        assert running.answered and running.shared is None, "answered (crashed): its file released at once"
        with pytest.raises(OSError):
            os.fstat(running_fd)
        ready_all(d)  # the replacement worker takes the queue
        again = [(wk, fd) for wk, fd, ids in sent if held.id in ids]
        assert len(again) == 2 and again[1][0] is not w and again[1][1] == held.shared.fd
    finally:
        for j in jobs:
            if j.shared is not None:
                j.shared.close()
