"""The dispatcher's policy under a fake clock and a fake launcher: no processes, no sleeps."""

from __future__ import annotations

from typing import Any

import pytest

from cruised.core.dispatch import Dispatcher, WorkerState
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status
from support.fakes import (
    FakeClock,
    FakeLauncher,
    Sink,
    job,
    make,
    ready_all,
    reply,
)


def test_starts_cruise_workers_and_is_ready_at_min() -> None:
    d, _, launcher = make(min=1, cruise=2, max=4)
    assert len(launcher.spawned) == 2 and not d.ready()
    d.on_worker_ready(launcher.spawned[0], {})
    assert d.ready()


def test_call_goes_to_an_idle_worker_with_its_code_once() -> None:
    d, _, launcher = make()
    ready_all(d)
    sink = Sink()
    d.submit(job(sink))
    ((w, parts),) = launcher.sent
    assert len(parts) == 2  # DEFINE then CALL, one write
    reply(d, w)
    d.submit(job(sink))
    assert len(launcher.sent[1][1]) == 1  # code already there
    reply(d, w)
    assert [s for _, s, _ in sink.replies] == [Status.OK, Status.OK]
    assert d.counters.requests == {"ok": 2}


def test_overflow_rejects_at_once_and_never_runs() -> None:
    d, _, launcher = make(max=1, queue_size=2)
    ready_all(d)
    sink = Sink()
    jobs = [job(sink) for _ in range(10)]
    for j in jobs:
        d.submit(j)
    assert len(launcher.sent) == 1 and len(d.queue) == 2
    rejected = [r for r in sink.replies if r[1] == Status.QUEUE_FULL]
    assert len(rejected) == 7 and "queue 2/2" in rejected[0][2]
    w = launcher.sent[0][0]
    for _ in range(3):
        reply(d, w)
    assert len(launcher.sent) == 3
    assert d.counters.requests == {"rejected": 7, "ok": 3}


def test_queue_timeout_answers_and_the_job_never_runs_later() -> None:
    d, clock, launcher = make(queue_timeout=5.0)
    ready_all(d)
    sink = Sink()
    d.submit(job(sink))  # runs
    queued = job(sink)
    d.submit(queued)
    clock.advance(5.01)
    assert sink.replies[-1][1] == Status.QUEUE_TIMEOUT and "queue_timeout 5s" in sink.replies[-1][2]
    reply(d, launcher.sent[0][0])
    assert len(launcher.sent) == 1, "a timed-out request must not run"
    assert d.counters.requests == {"queue_timeout": 1, "ok": 1}


def test_exec_timeout_kills_and_replaces_the_worker_and_late_replies_are_ignored() -> None:
    d, clock, launcher = make(exec_timeout=2.0)
    ready_all(d)
    sink = Sink()
    d.submit(job(sink))
    w = launcher.sent[0][0]
    clock.advance(2.0)
    assert sink.replies == [(sink.replies[0][0], Status.EXEC_TIMEOUT, sink.replies[0][2])]
    assert launcher.killed == [w] and w.state == WorkerState.KILLING
    assert len(launcher.spawned) == 2, "a replacement starts at once"
    d.on_worker_reply(w, bytearray(frames.frame(Kind.REPLY, 0)), Status.OK, 0)  # late: ignored
    d.on_worker_exit(w, -15)
    assert len(sink.replies) == 1, "exactly one reply"
    assert d.counters.exits == {"exec_timeout": 1}


def test_per_call_timeout_below_the_pool_limit_wins() -> None:
    d, clock, _ = make(exec_timeout=60.0)
    ready_all(d)
    sink = Sink()
    d.submit(job(sink, timeout=0.5))
    clock.advance(0.5)
    assert sink.replies[0][1] == Status.EXEC_TIMEOUT and "0.5s" in sink.replies[0][2]


def test_crash_answers_only_the_running_call_with_the_signal() -> None:
    d, _, launcher = make(queue_size=4)
    ready_all(d)
    sink = Sink()
    running, waiting = job(sink), job(sink)
    d.submit(running)
    d.submit(waiting)
    w = launcher.sent[0][0]
    d.on_worker_exit(w, -11)
    assert [(r[1]) for r in sink.replies] == [Status.WORKER_CRASHED]
    assert "SIGSEGV" in sink.replies[0][2]
    new = launcher.spawned[-1]
    assert new is not w and new.state == WorkerState.STARTING
    d.on_worker_ready(new, {})
    assert launcher.sent[-1][0] is new, "the queued call runs on the replacement"
    reply(d, new)
    assert [r[1] for r in sink.replies] == [Status.WORKER_CRASHED, Status.OK]


def test_scales_up_to_max_while_requests_wait_then_back_to_cruise_when_idle() -> None:
    d, clock, launcher = make(cruise=1, max=3, queue_size=10, idle_timeout=30.0)
    ready_all(d)
    sink = Sink()
    for _ in range(5):
        d.submit(job(sink))
    assert len(launcher.spawned) == 3, "grows to max, not beyond"
    ready_all(d)
    assert d.counts[WorkerState.BUSY] == 3
    for _ in range(5):
        busy = next(w for w in d.workers.values() if w.state == WorkerState.BUSY)
        reply(d, busy)
    assert d.counts[WorkerState.IDLE] == 3
    clock.advance(29.0)
    assert not launcher.retired
    clock.advance(1.1)
    assert len(launcher.retired) == 2 and d.live() == 1
    assert d.counters.exits == {}  # retire is reported when the process exits
    for w in launcher.retired:
        d.on_worker_exit(w, 0)
    assert d.counters.exits == {"idle": 2}


def test_recycles_after_max_requests() -> None:
    d, _, launcher = make(max_requests=2)
    ready_all(d)
    sink = Sink()
    w = launcher.spawned[0]
    for _ in range(2):
        d.submit(job(sink))
        reply(d, w)
    assert launcher.retired == [w]
    d.on_worker_exit(w, 0)
    assert d.counters.exits == {"recycled": 1} and len(launcher.spawned) == 2


def test_recycles_a_worker_over_max_rss_after_its_call() -> None:
    d, _, launcher = make(max_rss=100 << 20)
    ready_all(d)
    w = launcher.spawned[0]
    sink = Sink()
    launcher.rss_value = 50 << 20
    d.submit(job(sink))
    reply(d, w)
    assert not launcher.retired
    launcher.rss_value = 200 << 20
    d.submit(job(sink))
    reply(d, w)
    assert launcher.retired == [w] and [r[1] for r in sink.replies] == [Status.OK, Status.OK]


def test_disconnected_client_queued_jobs_are_dropped_and_running_reply_discarded() -> None:
    d, _, launcher = make(queue_size=4)
    ready_all(d)
    gone, other = Sink(), Sink()
    d.submit(job(gone, client="gone"))
    d.submit(job(gone, client="gone"))
    d.submit(job(other, client="other"))
    d.drop_client("gone")
    w = launcher.sent[0][0]
    reply(d, w)  # the running one finished: discarded
    assert gone.replies == []
    assert launcher.sent[-1][1][-1] is not None and len(launcher.sent) == 2
    reply(d, w)
    assert [r[1] for r in other.replies] == [Status.OK]


def test_preload_failure_backs_off_and_probes_one_worker_at_a_time() -> None:
    d, clock, launcher = make(cruise=2, max=2)
    first, second = launcher.spawned
    d.on_worker_preload_failed(first, "ImportError: no module named nope")
    d.on_worker_exit(first, 3)
    assert d.last_error == "ImportError: no module named nope"
    clock.advance(0.6)
    assert len(launcher.spawned) == 2, "no new spawn while another worker is still starting"
    d.on_worker_exit(second, 3)  # failures = 2: next try after 1s
    clock.advance(0.9)
    assert len(launcher.spawned) == 2, "backoff doubles"
    clock.advance(0.2)
    assert len(launcher.spawned) == 3, "one probe, not a burst"
    d.on_worker_ready(launcher.spawned[2], {})
    assert d.failures == 0 and d.last_error is None
    assert len(launcher.spawned) == 4, "after a success the pool fills up to cruise"


def test_start_timeout_kills_a_worker_that_never_gets_ready() -> None:
    _d, clock, launcher = make(start_timeout=5.0)
    w = launcher.spawned[0]
    clock.advance(5.0)
    assert launcher.killed == [w] and "start_timeout" in (w.error or "")


def test_unregistered_function_is_refused_without_queueing() -> None:
    d, _, launcher = make()
    ready_all(d)
    sink = Sink()
    d.submit(job(sink, key=b"Z" * 16))
    assert sink.replies[0][1] == Status.UNKNOWN_FUNCTION and not launcher.sent


def test_shutdown_refuses_new_work() -> None:
    d, _, _ = make()
    ready_all(d)
    d.stop_accepting()
    sink = Sink()
    d.submit(job(sink))
    assert sink.replies[0][1] == Status.SHUTTING_DOWN


def test_a_drain_refuses_new_calls_lets_admitted_ones_finish_and_is_undone_by_ready() -> None:
    d, _, launcher = make(max=1, queue_size=4)
    ready_all(d)
    sink = Sink()
    d.submit(job(sink))  # runs
    d.submit(job(sink))  # queued
    assert d.in_flight() == (1, 1)
    d.set_draining(True)
    d.submit(job(sink))
    assert sink.replies[-1][1] == Status.DRAINING and "cruised ready" in sink.replies[-1][2]
    w = launcher.sent[0][0]
    reply(d, w)  # the running call answers; the queued one starts on the same worker
    assert d.in_flight() == (0, 1)
    reply(d, w)
    assert d.in_flight() == (0, 0)
    assert [s for _, s, _ in sink.replies] == [Status.DRAINING, Status.OK, Status.OK]
    assert d.live() == 1, "a drain keeps the workers warm"
    d.set_draining(False)
    d.submit(job(sink))
    reply(d, w)
    assert sink.replies[-1][1] == Status.OK


def test_a_shutdown_outranks_a_drain_and_ready_cannot_undo_it() -> None:
    d, _, _ = make()
    ready_all(d)
    d.set_draining(True)
    d.stop_accepting()
    d.set_draining(False)
    sink = Sink()
    d.submit(job(sink))
    assert sink.replies[0][1] == Status.SHUTTING_DOWN


@pytest.mark.parametrize("n", [1, 7, 50])
def test_every_accepted_job_gets_exactly_one_reply_under_mixed_events(n: int) -> None:
    d, clock, _launcher = make(cruise=2, max=3, queue_size=5, queue_timeout=1.0, exec_timeout=2.0)
    ready_all(d)
    sinks = [Sink() for _ in range(n)]
    for i, s in enumerate(sinks):
        d.submit(job(s))
        clock.advance(0.3)
        ready_all(d)
        for w in list(d.workers.values()):
            if w.state == WorkerState.BUSY and i % 3 == 0:
                reply(d, w)
            elif w.state == WorkerState.BUSY and i % 5 == 0:
                d.on_worker_exit(w, -9)
    for _ in range(20):
        clock.advance(1.0)
        ready_all(d)
        for w in list(d.workers.values()):
            if w.state == WorkerState.BUSY:
                reply(d, w)
            elif w.state == WorkerState.KILLING:
                d.on_worker_exit(w, -15)
    assert all(len(s.replies) == 1 for s in sinks), [s.replies for s in sinks]


# -- the q connection state (pools with q:) ---------------------------------------


def q_pool(**q: Any) -> tuple[Dispatcher, FakeClock, FakeLauncher]:
    from cruised.config import QConfig

    return make(min=2, cruise=2, max=2, q=QConfig(port=5010, username="alice", **q))


def test_q_state_from_ready_and_state_frames_drives_status() -> None:
    d, _, _ = q_pool()
    changes: list[None] = []
    d.on_change = lambda: changes.append(None)
    w1, w2 = list(d.workers.values())
    d.on_worker_ready(w1, {"pid": 1, "q": {"connected": True, "error": None}})
    d.on_worker_ready(w2, {"pid": 2, "q": {"connected": False, "error": "cannot connect to q at 127.0.0.1:5010"}})
    assert d.q_connected() == 1 and d.ready()  # q not required: readiness ignores it
    st = d.status()["q"]
    assert st == {
        "endpoint": "127.0.0.1:5010",
        "user": "alice",
        "required": False,
        "connected": 1,
        "workers": 2,
        "last_error": "cannot connect to q at 127.0.0.1:5010",
    }
    n = len(changes)
    d.on_worker_state(w2, {"q": {"connected": True, "error": None}})
    assert d.q_connected() == 2 and len(changes) == n + 1
    d.on_worker_state(w2, {"q": {"connected": True, "error": None}})  # no change: no notification
    assert len(changes) == n + 1
    assert d.status()["q"]["last_error"] == "cannot connect to q at 127.0.0.1:5010"  # the last one seen stays
    d.on_worker_state(w1, {"unrelated": 1})
    assert d.q_connected() == 2


def test_required_q_gates_readiness_on_every_warm_worker() -> None:
    d, _, _ = q_pool(required=True)
    w1, w2 = list(d.workers.values())
    d.on_worker_ready(w1, {"pid": 1, "q": {"connected": True, "error": None}})
    assert not d.ready()  # only one warm worker; min is 2
    d.on_worker_ready(w2, {"pid": 2, "q": {"connected": False, "error": "down"}})
    assert not d.ready()
    d.on_worker_state(w2, {"q": {"connected": True, "error": None}})
    assert d.ready()
    d.on_worker_state(w1, {"q": {"connected": False, "error": "q closed the connection"}})
    assert not d.ready()


def test_a_q_unavailable_reply_is_counted_and_the_worker_stays() -> None:
    d, _, launcher = q_pool()
    ready_all(d)
    sink = Sink()
    j = job(sink)
    d.submit(j)
    w = j.worker
    assert w is not None
    d.on_worker_reply(w, bytearray(), Status.Q_UNAVAILABLE, j.id)
    assert sink.replies == [(j.client_reqid, Status.Q_UNAVAILABLE, "forwarded")]
    assert d.counters.requests == {"q_unavailable": 1}
    assert w.state == WorkerState.IDLE and not launcher.killed


def test_pool_without_q_reports_none() -> None:
    d, _, _ = make()
    ready_all(d)
    assert d.status()["q"] is None and d.q_connected() == 0 and d.ready()


class BatchRecorder:
    """An Observer that keeps the batches it is shown."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    def requests_done(self, pool: str, batch: list[Any]) -> None:
        self.batches.append(list(batch))

    def worker_exit(self, pool: str, reason: str) -> None:
        pass


def test_observers_see_answered_requests_in_batches() -> None:
    """Counts for `status` are kept at once; observers get a batch of 64, or after 20 ms, or on a
    flush (a scrape, shutdown), with every field the record promises."""
    from cruised.core.observers import ANSWERED_BATCH, ANSWERED_EVERY

    d, clock, launcher = make(queue_size=ANSWERED_BATCH + 8)
    rec = BatchRecorder()
    d.observers.append(rec)
    ready_all(d)
    sink = Sink()
    d.submit(job(sink))
    clock.advance(0.004)
    reply(d, launcher.sent[-1][0])
    assert d.counters.requests == {"ok": 1} and rec.batches == []  # counted, not yet shown
    clock.advance(ANSWERED_EVERY)
    ((first,),) = rec.batches
    endpoint, door, client, waited, outcome, queue_s, exec_s, at = first
    assert (endpoint, door, client, waited, outcome) == ("function", "native", sink, True, "ok")
    assert queue_s == 0.0 and exec_s == pytest.approx(0.004) and at > 0
    for _ in range(ANSWERED_BATCH):  # a full batch goes at once, without the timer
        d.submit(job(sink))
        reply(d, launcher.sent[-1][0])
    assert [len(b) for b in rec.batches] == [1, ANSWERED_BATCH]
    d.submit(job(sink))
    reply(d, launcher.sent[-1][0])
    d.flush_answered()  # what a scrape does first
    assert [len(b) for b in rec.batches] == [1, ANSWERED_BATCH, 1]
    clock.advance(1.0)
    assert len(rec.batches) == 3  # nothing left, and no empty batch shown


def test_status_names_worker_states_in_the_words_it_always_used() -> None:
    """status() (and `cruised status`, and the HTTP status page) print states as words, in this order."""
    d, _, launcher = make(min=1, cruise=2, max=4)
    d.on_worker_ready(launcher.spawned[0], {})
    d.submit(job(Sink()))
    st = d.status()
    assert st["workers"] == {"starting": 1, "idle": 0, "busy": 1, "draining": 0, "killing": 0}
    assert sorted(w["state"] for w in st["worker_list"]) == ["busy", "starting"]
    assert [WorkerState.name(s) for s in WorkerState] == ["starting", "idle", "busy", "draining", "killing", "gone"]
