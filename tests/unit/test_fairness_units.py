"""Fair sharing (daemon/core/fairness.py) under the fake clock: order, shares, per-caller limits, credit.

The queue alone first (``FairQueue``: the order of start-time fair queueing),
then the dispatcher with it: who runs next, who is refused, what credit a
pipelined connection gets and when, and that the per-flow counts always
match the jobs that wait.
"""

from __future__ import annotations

from typing import Any

import pytest

from cruised.config import ConfigErrors, parse
from cruised.core.dispatch import Dispatcher, Job
from cruised.core.fairness import FairQueue
from cruised.pool.wire.frames import Status
from support.fakes import Sink, job, make, ready_all, reply


def fifo_job(caller: str, admitted: float, client: Any = None) -> Job:
    j = job(Sink(), client=client, caller=caller)
    j.admitted = admitted
    return j


def queue_up(q: FairQueue, jobs: list[Job], cost: float = 0.01) -> None:
    for j in jobs:
        j.flow = q.flow_of(j.caller, j.client, cost)
        q.append(j)


def pop_all(q: FairQueue) -> list[Job]:
    out = []
    while (j := q.pop()) is not None:
        out.append(j)
    return out


def test_fifo_within_a_caller_and_turns_between_callers() -> None:
    q = FairQueue()
    a = [fifo_job("a", t) for t in range(4)]
    b = [fifo_job("b", 10 + t) for t in range(2)]
    queue_up(q, a + b)
    assert len(q) == 6 and q.oldest() is a[0]
    order = pop_all(q)
    assert [j.caller for j in order] == ["b", "a", "b", "a", "a", "a"], "turns; a tie goes to the shorter flow"
    assert [j for j in order if j.caller == "a"] == a, "FIFO within a caller"
    assert not q and q.oldest() is None and q.active == []


def test_a_caller_that_starts_waiting_goes_next_even_behind_a_long_backlog() -> None:
    q = FairQueue()
    queue_up(q, [fifo_job("a", t) for t in range(100)])
    for _ in range(50):  # a's backlog has been running for a while
        q.pop()
    b = fifo_job("b", 200)
    queue_up(q, [b])
    assert q.pop() is b, "a newly waiting caller is served at the virtual time, ahead of the backlog"


def test_an_idle_spell_banks_no_credit() -> None:
    q = FairQueue()
    queue_up(q, [fifo_job("b", 0)])
    q.pop()  # b ran once, then went away
    queue_up(q, [fifo_job("a", t) for t in range(1, 101)])
    for _ in range(100):
        q.pop()
    late = [fifo_job("b", 200 + t) for t in range(10)]
    queue_up(q, late + [fifo_job("a", 300 + t) for t in range(10)])
    first_ten = [j.caller for j in pop_all(q)[:10]]
    assert first_ten.count("b") <= 6, f"b took its turns, not the 100 it was away for: {first_ten}"


def test_weights_split_the_calls_3_to_1_while_both_wait() -> None:
    q = FairQueue(shares={"a": 3.0})
    queue_up(q, [fifo_job("a", t) for t in range(400)] + [fifo_job("b", t) for t in range(400)])
    first = [q.pop() for _ in range(400)]
    n_a = sum(1 for j in first if j is not None and j.caller == "a")
    assert n_a == 300, n_a


def run(q: FairQueue, n: int, cost: dict[str, float]) -> list[str]:
    """Pop ``n`` jobs, each finishing at once after ``cost[its caller]`` seconds; the callers in order."""
    out = []
    for _ in range(n):
        j = q.pop()
        assert j is not None
        q.learn(j, cost[j.caller])
        out.append(j.caller)
    return out


def test_costs_are_worker_time_so_long_calls_get_fewer_turns() -> None:
    q = FairQueue()
    queue_up(q, [fifo_job("slow", t) for t in range(300)] + [fifo_job("fast", t) for t in range(300)], cost=1.0)
    order = run(q, 202, {"slow": 1.0, "fast": 0.01})  # slow's calls take 100x longer than fast's
    n_slow = order.count("slow")
    assert 2 <= n_slow <= 4, f"equal worker time: about one slow call per hundred fast ones, got {n_slow}"


def test_a_wrong_first_estimate_is_corrected_when_the_call_finishes() -> None:
    q = FairQueue()
    queue_up(q, [fifo_job("a", t) for t in range(200)], cost=0.01)
    queue_up(q, [fifo_job("b", t) for t in range(200)], cost=5.0)  # b's flow started with a pessimistic pool average
    order = run(q, 200, {"a": 0.01, "b": 0.01})
    assert 90 <= order.count("b") <= 110, f"b gets its half once its real cost is known: {order.count('b')}"


def test_connection_mode_makes_each_connection_its_own_flow_and_none_one_for_all() -> None:
    c1, c2 = object(), object()
    q = FairQueue("connection")
    queue_up(q, [fifo_job("etl", 0, c1), fifo_job("etl", 1, c1), fifo_job("etl", 2, c2)])
    assert sorted(f.name for f in q.flows.values()) == ["etl#1", "etl#2"]
    assert [j.client for j in pop_all(q)] == [c2, c1, c1]
    q = FairQueue("none", shares={"a": 5.0})
    jobs = [fifo_job("a", 0), fifo_job("b", 1), fifo_job("a", 2)]
    queue_up(q, jobs)
    assert pop_all(q) == jobs and list(q.flows) == ["*"], "plain FIFO, weights ignored"


def test_requeued_jobs_go_back_to_the_front_of_their_flows_in_order() -> None:
    q = FairQueue()
    a = [fifo_job("a", t) for t in range(3)]
    queue_up(q, a)
    took = [q.pop(), q.pop()]
    q.requeue([j for j in took if j is not None])
    assert list(q) == a and q.oldest() is a[0]


def test_top_callers_fold_the_rest() -> None:
    q = FairQueue()
    for name, n in (("a", 3), ("b", 1), ("c", 2)):
        q.flow_of(name, None, 0.01).waiting = n
    assert q.top(2) == ([("a", 3), ("c", 2)], 1)


# -- the dispatcher with it -------------------------------------------------------------------


def pool(**cfg: Any) -> Dispatcher:
    base: dict[str, Any] = dict(min=1, cruise=1, max=1, queue_size=16, queue_timeout=10.0)
    base.update(cfg)
    d, _, _ = make(**base)
    ready_all(d)
    return d


def consistent(d: Dispatcher) -> None:
    """Every flow's count is the number of its jobs queued or held; reserved is the credit not spent."""
    held = [j for w in d.workers.values() for j in w.held if j.waits]
    for flow in d.queue.flows.values():
        waiting = sum(1 for j in flow.jobs if j.waits) + sum(1 for j in held if j.flow is flow)
        assert flow.waiting == waiting, (flow.name, flow.waiting, waiting)
        assert flow.unused == sum(a.unused for a in d.accounts.values() if a.flow is flow)
    assert d.reserved == sum(a.unused for a in d.accounts.values())
    assert d.queue.n + d.held_count + d.reserved <= d.config.queue_size


def test_a_single_call_goes_ahead_of_a_backlog_of_another_caller() -> None:
    d = pool()
    a_sink, b_sink = Sink(), Sink()
    a_jobs = [job(a_sink, caller="alice") for _ in range(10)]
    for j in a_jobs:
        d.submit(j)  # alice alone: her calls may fill the queue, nobody else waits
    b = job(b_sink, caller="bob")
    d.submit(b)
    (w,) = d.workers.values()
    reply(d, w)
    assert w.job is b, "bob's call runs next, not behind alice's nine"
    consistent(d)
    reply(d, w)
    assert w.job is a_jobs[1], "then alice's, in her order"


def test_a_caller_over_its_share_is_refused_while_another_waits() -> None:
    d = pool(queue_size=8)  # max_queued_per_caller defaults to 4
    a_sink, b_sink = Sink(), Sink()
    d.submit(job(a_sink, caller="alice"))  # runs
    for _ in range(6):
        d.submit(job(a_sink, caller="alice"))  # alone: 6 of 8 waiting is fine
    assert not [r for r in a_sink.replies if r[1] == Status.QUEUE_FULL]
    d.submit(job(b_sink, caller="bob"))
    d.submit(job(a_sink, caller="alice"))
    ((_, status, message),) = a_sink.replies
    assert status == Status.QUEUE_FULL and "'alice' already has 6" in message and "max_queued_per_caller 4" in message
    d.submit(job(b_sink, caller="bob"))
    assert not b_sink.replies, "bob is under his share"
    consistent(d)


class Conn:
    """A connection's credit frames, as the native door would send them."""

    def __init__(self) -> None:
        self.grants: list[int] = []

    def credit(self, pool: str, n: int) -> None:
        self.grants.append(n)


def test_credit_is_the_callers_share_and_credited_calls_are_never_refused() -> None:
    d = pool(queue_size=16)
    conn = Conn()
    assert d.open_credit(conn, "alice") == 8, "half the queue"
    assert d.status()["fairness"]["reserved"] == 8
    sink = Sink()
    jobs = [job(sink, client=conn, caller="alice", credited=True) for _ in range(8)]
    for j in jobs:
        d.submit(j)
    assert not sink.replies and d.reserved == 0
    consistent(d)
    # others may use the rest of the queue, no more
    bob = Sink()
    for _ in range(9):
        d.submit(job(bob, caller="bob"))
    assert [r[1] for r in bob.replies] == [Status.QUEUE_FULL], "bob's 9th finds alice's share + his own 8 = 16"
    (w,) = d.workers.values()
    reply(d, w)  # alice's first ran; bob's next one runs (fair order): a place frees, below a batch of 4
    consistent(d)
    assert conn.grants == []
    for _ in range(5):
        reply(d, w)
    assert conn.grants and sum(conn.grants) <= 8
    consistent(d)
    granted = sum(conn.grants)
    extra = [job(sink, client=conn, caller="alice", credited=True) for _ in range(granted)]
    for j in extra:
        d.submit(j)
    assert not [r for r in sink.replies if r[1] != Status.OK], "every credited call got a place"
    consistent(d)


def test_a_credited_call_without_credit_left_is_admitted_like_any_other() -> None:
    d = pool(queue_size=2)
    conn, sink = Conn(), Sink()
    assert d.open_credit(conn, "alice") == 1
    for _ in range(4):
        d.submit(job(sink, client=conn, caller="alice", credited=True))
    assert [r[1] for r in sink.replies] == [Status.QUEUE_FULL]
    consistent(d)


def test_closing_or_leaving_gives_unspent_credit_back() -> None:
    d = pool(queue_size=16)
    a, b = Conn(), Conn()
    assert d.open_credit(a, "alice") == 8
    assert d.open_credit(b, "bob") == 8
    carol = Conn()
    assert d.open_credit(carol, "carol") == 0, "the queue is all reserved"
    d.close_credit(a)
    assert carol.grants == [8] and d.reserved == 16, "what alice gave back went to the one waiting for credit"
    d.close_credit(carol)
    assert d.reserved == 8
    sink = Sink()
    d.submit(job(sink, client=b, caller="bob"))  # runs at once: no credit spent
    d.submit(job(sink, client=b, caller="bob", credited=True))
    d.drop_client(b)
    assert d.reserved == 0 and not d.accounts and d.queue.n == 0
    consistent(d)


def test_queue_deadlines_go_by_admission_across_callers() -> None:
    d, clock, _ = make(min=1, cruise=1, max=1, queue_size=16, queue_timeout=1.0)
    ready_all(d)
    a, b = Sink(), Sink()
    d.submit(job(a, caller="alice"))  # runs, and never replies
    d.submit(job(a, caller="alice"))
    clock.advance(0.5)
    d.submit(job(b, caller="bob"))
    clock.advance(0.6)
    assert [r[1] for r in a.replies] == [Status.QUEUE_TIMEOUT] and not b.replies
    clock.advance(0.5)
    assert [r[1] for r in b.replies] == [Status.QUEUE_TIMEOUT]
    consistent(d)


def test_held_calls_are_taken_in_the_fair_order() -> None:
    d, _, _ = make(min=2, cruise=2, max=2, queue_size=16, prefetch=4)
    ready_all(d)
    d.exec_avg = 0.0001  # short calls: busy workers hold
    a, b = Sink(), Sink()
    for _ in range(2):
        d.submit(job(a, caller="alice"))  # both workers busy
    for _ in range(6):
        d.submit(job(a, caller="alice"))
    d.submit(job(b, caller="bob"))
    held = [j.caller for w in d.workers.values() for j in w.held]
    assert "bob" in held, f"bob's call was held among the first, not after alice's six: {held}"
    consistent(d)


def test_fairness_settings_are_checked_with_their_key_paths() -> None:
    with pytest.raises(ConfigErrors) as e:
        parse({"pools": {"p": {"fairness": "fifo", "shares": {"a": 0}, "max_queued_per_caller": 99}}})
    assert str(e.value).splitlines() == [
        "pools.p.fairness: must be one of caller, connection, none, got 'fifo'",
        "pools.p.shares.a: a weight must be above 0 and at most 1000, got 0",
        "pools.p.max_queued_per_caller: must be at most queue_size (16), got 99",
    ]
    with pytest.raises(ConfigErrors, match=r"metrics\.top_callers: must be between 1 and 1000"):
        parse({"metrics": {"top_callers": 0}})
    cfg = parse({"pools": {"p": {"queue_size": 1}, "q": {"fairness": "none"}}})
    assert cfg.pools["p"].caller_limit() == 1 and cfg.pools["q"].caller_limit() == 16


def test_idle_flows_are_forgotten_per_connection_at_once_and_per_caller_beyond_a_bound() -> None:
    d = pool(fairness="connection")
    sink = Sink()
    for _ in range(3):
        d.submit(job(Sink(), caller="web"))  # one runs, two wait: each request its own flow
    assert len(d.queue.flows) == 2
    (w,) = d.workers.values()
    for _ in range(3):
        reply(d, w)
    assert d.queue.flows == {}, "nothing waits: no flow is kept"
    q = FairQueue()
    from cruised.core.fairness import MAX_IDLE_FLOWS

    for i in range(MAX_IDLE_FLOWS + 5):
        q.flow_of(f"user{i}", sink, 0.01)
    assert len(q.flows) <= MAX_IDLE_FLOWS


def test_a_connection_with_credit_keeps_its_flow() -> None:
    d = pool(fairness="connection")
    conn, sink = Conn(), Sink()
    d.open_credit(conn, "etl")
    for _ in range(3):
        d.submit(job(sink, client=conn, caller="etl", credited=True))
    (w,) = d.workers.values()
    for _ in range(3):
        reply(d, w)
    (flow,) = d.queue.flows.values()
    assert flow is d.accounts[conn].flow
    consistent(d)
    d.drop_client(conn)
    assert d.queue.flows == {}


def test_a_reload_hands_unspent_credit_to_the_new_dispatcher() -> None:
    old, new = pool(queue_size=16), pool(queue_size=4)
    conn, sink = Conn(), Sink()
    assert old.open_credit(conn, "alice") == 8
    old.submit(job(sink, client=conn, caller="alice", credited=True))  # runs: 7 left
    new.adopt_credit(old)
    assert old.accounts == {} and old.reserved == 0
    assert new.accounts[conn].unused == 7 and new.reserved == 7, "honoured, though the new queue is smaller"
    for _ in range(5):
        new.submit(job(sink, client=conn, caller="alice", credited=True))  # 1 runs, 4 wait: the queue is full
    assert not [r for r in sink.replies if r[1] == Status.QUEUE_FULL]
    other = Sink()
    new.submit(job(other, caller="bob"))
    assert [r[1] for r in other.replies] == [Status.QUEUE_FULL]
    new.close_credit(conn)
    consistent(new)


def test_a_pool_that_stops_accepting_gives_each_waiting_map_one_last_credit() -> None:
    d = pool(queue_size=2)
    busy, waiting = Conn(), Conn()
    assert d.open_credit(busy, "alice") == 1
    assert d.open_credit(waiting, "bob") == 1
    d.stop_accepting()
    assert busy.grants == [1] and waiting.grants == [1], "each sends one more call and hears why"
    sink = Sink()
    d.submit(job(sink, client=waiting, caller="bob", credited=True))
    assert [r[1] for r in sink.replies] == [Status.SHUTTING_DOWN]


def test_a_withdrawn_queued_call_leaves_its_flows_count_too() -> None:
    d = pool()
    sink = Sink()
    jobs = [job(sink, caller="alice") for _ in range(4)]  # one runs, three wait
    for j in jobs:
        d.submit(j)
    d._dequeue(jobs[2])  # what a cancelled queued call does
    assert list(d.queue) == [jobs[1], jobs[3]] and d.queue.flows["alice"].waiting == 2
    consistent(d)
