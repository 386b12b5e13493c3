"""Cancelling under the fake clock (daemon/core/dispatch.py "Cancelling") and the worker's
cancel board and SIGINT handler (pool/interrupt.py). The real daemon, Ctrl-C included, is
tests/integration/test_cancel.py."""

from __future__ import annotations

import pytest
from unit.test_holding import busy_pool

from cruised import config
from cruised.config import ConfigErrors
from cruised.core.dispatch import NEVER_STARTED, WorkerState
from cruised.pool import interrupt
from cruised.pool.wire.frames import Status
from support.fakes import Sink, job, make, ready_all, reply


def test_a_queued_call_is_answered_cancelled_at_once_and_never_sent() -> None:
    d, _, launcher = make(queue_size=4)
    ready_all(d)
    sink = Sink()
    running, queued = job(sink), job(sink)
    d.submit(running)
    d.submit(queued)
    assert d.cancel(sink, queued.client_reqid)
    assert sink.replies == [(queued.client_reqid, Status.CANCELLED, "cancelled while queued; it never ran")]
    assert not d.queue and d.counters.requests == {"cancelled": 1}
    w = running.worker
    assert w is not None
    reply(d, w)
    assert len(launcher.sent) == 1, "the cancelled call never reached a worker"
    assert not d.cancel(sink, queued.client_reqid), "answered: a second cancel finds nothing"


def test_a_held_call_is_posted_then_answered_and_its_not_run_pairs_it() -> None:
    d, _, launcher, sink, jobs = busy_pool()
    held = next(j for j in jobs if j.held)
    w = held.worker
    assert w is not None
    assert d.cancel(sink, held.client_reqid)
    assert (w, held.id) in launcher.posted and w not in launcher.interrupted
    assert (held.client_reqid, Status.CANCELLED, NEVER_STARTED) in sink.replies
    reply(d, w)  # the running one
    assert w.job is held
    reply(d, w, Status.NOT_RUN)  # the worker found it on its board
    assert [r for r in sink.replies if r[0] == held.client_reqid] == [(held.client_reqid, Status.CANCELLED, NEVER_STARTED)]


def test_a_held_call_that_starts_while_the_replies_are_read_is_still_never_run() -> None:
    """Posted first, then the worker's replies read: one of them makes the held call the
    running one. The worker checks its board before it starts a held call, so it answers
    NOT_RUN; the caller hears CANCELLED (never ran), not a queue timeout."""
    d, _, launcher, sink, jobs = busy_pool()
    w = next(j.worker for j in jobs if j.held and j.worker is not None)
    held = w.held[0]
    launcher.drain = lambda worker: reply(d, worker) if worker.job is not held else None  # type: ignore[method-assign]
    assert d.cancel(sink, held.client_reqid)
    assert w.job is held and not held.answered and w in launcher.interrupted
    reply(d, w, Status.NOT_RUN)
    assert [r for r in sink.replies if r[0] == held.client_reqid] == [(held.client_reqid, Status.CANCELLED, NEVER_STARTED)]


def test_a_running_call_is_interrupted_and_its_worker_stays() -> None:
    d, clock, launcher = make(cancel_grace=2.0)
    ready_all(d)
    sink = Sink()
    j = job(sink)
    d.submit(j)
    w = j.worker
    assert w is not None and d.cancel(sink, j.client_reqid)
    assert launcher.interrupted == [w] and (w, j.id) in launcher.posted and sink.replies == []
    assert not d.cancel(sink, j.client_reqid) or launcher.interrupted == [w], "one interrupt per call"
    reply(d, w, Status.CANCELLED)
    assert sink.replies == [(j.client_reqid, Status.CANCELLED, "forwarded")]
    clock.advance(5)
    assert w.state == WorkerState.IDLE and launcher.killed == [] and d.counters.requests == {"cancelled": 1}


def test_a_call_that_ignores_its_interrupt_is_answered_at_cancel_grace_and_its_worker_replaced() -> None:
    d, clock, launcher = make(cancel_grace=2.0, max=2)
    ready_all(d)
    sink = Sink()
    j, nxt = job(sink), job(sink)
    d.submit(j)
    w = j.worker
    assert w is not None
    d.cancel(sink, j.client_reqid)
    clock.advance(1.9)
    assert sink.replies == [] and launcher.killed == []
    clock.advance(0.2)
    assert sink.replies[0][:2] == (j.client_reqid, Status.CANCELLED) and "cancel_grace (2s)" in sink.replies[0][2]
    assert launcher.killed == [w] and w.exit_reason == "cancelled"
    d.on_worker_exit(w, -15)
    assert d.counters.exits == {"cancelled": 1} and len(sink.replies) == 1, "the kill answers nothing twice"
    d.submit(nxt)
    ready_all(d)
    assert nxt.started is not None


@pytest.mark.parametrize("policy", ["cancel", "finish"])
def test_on_disconnect_cancels_or_finishes_a_gone_clients_running_call(policy: str) -> None:
    d, _, launcher = make(on_disconnect=policy, queue_size=4)
    ready_all(d)
    gone = Sink()
    running, queued = job(gone, client="gone"), job(gone, client="gone")
    d.submit(running)
    d.submit(queued)
    d.drop_client("gone")
    w = running.worker
    assert w is not None
    assert launcher.interrupted == ([w] if policy == "cancel" else [])
    reply(d, w, Status.CANCELLED if policy == "cancel" else Status.OK)
    assert gone.replies == [], "nobody to answer"
    assert d.counters.requests == ({"cancelled": 2} if policy == "cancel" else {"cancelled": 1, "ok": 1})


def test_the_board_carries_ids_from_the_supervisor_to_the_worker() -> None:
    board, fd = interrupt.Board.create("test-board")
    worker_side = interrupt.Board.open(fd)
    assert worker_side.pull() == []
    board.post(7)
    board.post(9)
    assert worker_side.pull() == [7, 9] and worker_side.pull() == []
    for i in range(interrupt.SLOTS + 5):
        board.post(100 + i)
    got = worker_side.pull()
    assert len(got) == interrupt.SLOTS and got[-1] == 100 + interrupt.SLOTS + 4, "the newest SLOTS survive a wrap"
    board.close()
    worker_side.close()


def test_sigint_raises_only_into_the_users_code_of_the_cancelled_call() -> None:
    board, fd = interrupt.Board.create("test-board")
    state = interrupt.Interrupts(interrupt.Board.open(fd))
    state.begin(5)
    board.post(4)  # another call's cancel (one that finished): ignored
    state._on_sigint(2, None)
    assert not state.hit
    board.post(5)
    state._on_sigint(2, None)  # not in user code: remembered, not raised
    assert state.hit and state.end() and not state.hit
    state.begin(6)
    board.post(6)
    with pytest.raises(KeyboardInterrupt):
        state.run_user(lambda: state._on_sigint(2, None))
    assert state.end()
    state.begin(5)  # an id pulled earlier: cancelled before it started
    with pytest.raises(KeyboardInterrupt):
        state.run_user(lambda: pytest.fail("must not run"))
    state.end()
    board.close()


def test_cancel_settings_default_and_errors_name_their_key() -> None:
    pool = config.parse({}).pools["default"]
    assert pool.cancel_grace == 2.0 and pool.on_disconnect == "cancel"
    assert config.parse({"pools": {"p": {"cancel_grace": "500ms", "on_disconnect": "finish"}}}).pools["p"].cancel_grace == 0.5
    with pytest.raises(ConfigErrors) as info:
        config.parse({"pools": {"p": {"cancel_grace": "0s", "on_disconnect": "ignore"}}})
    assert sorted(str(e) for e in info.value.errors) == [
        "pools.p.cancel_grace: must be positive, got 0.0",
        "pools.p.on_disconnect: must be one of cancel, finish, got 'ignore'",
    ]
