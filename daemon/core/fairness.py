r"""Fair sharing of one pool's queue between its callers: in which order they run, how many may wait.

Callers
    Every job names its caller (``Job.caller``), set by the door that admitted
    it: the native door the peer's user (``SO_PEERCRED`` uid, as a user name),
    the HTTP door the API key's name (or the peer's user on its Unix socket),
    the q door the q user. ``pools.<name>.fairness`` says what a *flow* (one
    share of the pool) is: ``caller`` (the default: one flow per caller),
    ``connection`` (one per connection, for one service account with many
    clients; on the HTTP door every request is its own) or ``none`` (one flow
    for everybody: plain FIFO, as before). ``pools.<name>.shares`` weights
    callers (default 1; with ``connection``, each connection of the caller).

Order: start-time fair queueing (SFQ), not deficit round robin
    Each flow has a virtual start tag; the next call is the head of the
    waiting flow with the smallest tag (FIFO within a flow). Dispatching a
    call advances its flow's tag by the call's expected cost divided by the
    flow's weight, and the pool's virtual time to the tag of the call that
    started. A flow that starts waiting takes ``max(its tag, virtual time)``:
    it is served next (its tag is never above a backlogged flow's), but an
    idle spell banks no credit.

    Why SFQ: the cost of a call is unknown when it is picked (DRR needs it to
    charge the quantum), while SFQ can charge an estimate (the flow's moving
    average execution time) and correct the tag by the real time once the
    call finishes (``learn``), so a caller of 1 s queries and one of 10 ms
    calls get equal *worker time*, not equal call counts, and a wrong first
    estimate costs nothing lasting. It needs no quantum to tune, and a newly waiting flow's first
    call goes ahead of a backlogged flow at once, whatever the weights (DRR
    would let the backlogged flow finish its round first). The pool has few
    flows at a time, so the smallest tag is found by a scan of the waiting
    ones, and a pool with one waiting flow pays nothing for it.

How many may wait
    ``queue_size`` keeps its DSS meaning: calls waiting in the pool (queued,
    or held by a busy worker) never exceed it. On top of that a flow may hold
    at most ``max_queued_per_caller`` of them while another flow has calls
    waiting (``Dispatcher.submit``). A flow's *holding* is its waiting calls
    plus the credit its connections hold.

Credit (flow control for pipelined submitters, ``map``)
    A connection that asks (a CREDIT request, pool/wire/frames.py) gets an
    ``Account``: the daemon grants it credit, each credit a place reserved in
    the queue, and sends more as its calls leave the queue. A CALL flagged
    ``CREDITED`` spends one and is never refused QueueFull: its place was
    reserved when the credit was granted. Unspent credit counts against the
    queue (``reserved``) so nobody else can take those places, and against
    the flow's holding, so a flow's credit never exceeds its
    ``max_queued_per_caller``: a ``map`` keeps the workers busy while the
    rest of the queue stays open to the other callers. A reload hands each
    connection's unspent credit to the new generation's pool
    (``Dispatcher.adopt_credit``), so a map running across a reload keeps
    its promise (even if the new ``queue_size`` is smaller, until spent).

Nothing here runs, times or answers a call: ``FairQueue`` only orders the
dispatcher's waiting jobs and keeps per-flow counts; the dispatcher owns
every state change (daemon/core/dispatch.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cruised.core.dispatch import Job

#: the flow of every job in a pool with ``fairness: none``
EVERYONE = "*"
#: weight of the newest call in a flow's cost average
COST_EWMA = 0.2
#: flows kept with nothing waiting (their tags and cost estimates) before idle ones are forgotten:
#: caller names can come from clients (a q user), so the table must not grow without bound
MAX_IDLE_FLOWS = 1024


class Flow:
    """One share of the pool: a caller (or a connection), its waiting jobs and its place in the order."""

    __slots__ = ("accounts", "active", "cost", "jobs", "key", "learned", "name", "tag", "unused", "waiting", "weight")

    def __init__(self, key: Any, name: str, weight: float, cost: float) -> None:
        self.key = key
        self.name = name  # what status and metrics show
        self.weight = weight
        self.jobs: deque[Job] = deque()  # queued, FIFO; held ones are on their worker
        self.tag = 0.0  # virtual start tag of its next call
        self.cost = cost  # moving average of its calls' execution time (s): what a call is charged when it starts
        self.learned = False  # cost is its own (a call of it finished), not the pool's average it started with
        self.waiting = 0  # its jobs queued or held (not started, not answered)
        self.unused = 0  # credit its connections hold and have not spent
        self.accounts = 0  # credit accounts of its connections: while there are any, it is kept
        self.active = False  # in FairQueue.active: it has queued jobs


class Account:
    """A connection's credit in one pool (see "Credit" above)."""

    __slots__ = ("caller", "client", "flow", "unused")

    def __init__(self, client: Any, caller: str, flow: Flow) -> None:
        self.client = client  # has ``credit(pool, n)``: sends a CREDIT frame
        self.caller = caller
        self.flow = flow
        self.unused = 0


class FairQueue:
    """A pool's queued jobs, in flows, popped in SFQ order (see the module docstring).

    ``n`` is the number of queued jobs (held ones are the dispatcher's); the
    hot paths read it instead of ``len()``.
    """

    __slots__ = ("active", "flows", "mode", "n", "shares", "vtime")

    def __init__(self, mode: str = "caller", shares: dict[str, float] | None = None) -> None:
        self.mode = mode
        self.shares = shares or {}
        self.flows: dict[Any, Flow] = {}
        self.active: list[Flow] = []
        self.vtime = 0.0
        self.n = 0

    # -- flows -------------------------------------------------------------------------

    def flow_of(self, caller: str, client: Any, cost: float) -> Flow:
        """The flow of ``caller``'s jobs from ``client``, created on first use (``cost``: the
        pool's average call, the flow's first estimate)."""
        mode = self.mode
        key: Any = caller if mode == "caller" else (client if mode == "connection" else EVERYONE)
        flow = self.flows.get(key)
        if flow is None:
            if len(self.flows) >= MAX_IDLE_FLOWS:
                self._forget_idle()
            if mode == "connection":
                same = sum(1 for f in self.flows.values() if f.name.startswith(caller + "#"))
                name = f"{caller}#{same + 1}"
            else:
                name = str(key)
            weight = self.shares.get(caller, 1.0) if mode != "none" else 1.0
            flow = self.flows[key] = Flow(key, name, weight, cost)
        return flow

    def forget(self, key: Any) -> None:
        """Drop an idle flow (its connection closed): nothing waits in it, no credit is out."""
        flow = self.flows.get(key)
        if flow is not None and not (flow.waiting or flow.accounts or flow.jobs):
            del self.flows[key]

    def idle(self, flow: Flow) -> None:
        """``flow`` has nothing waiting any more: with ``fairness: connection`` (a flow per HTTP
        request or q handle) it is forgotten at once; a caller's is kept (see MAX_IDLE_FLOWS)."""
        if self.mode == "connection" and not (flow.accounts or flow.active) and self.flows.get(flow.key) is flow:
            del self.flows[flow.key]

    def _forget_idle(self) -> None:
        for key in [k for k, f in self.flows.items() if not (f.waiting or f.accounts or f.active)]:
            del self.flows[key]

    # -- the queue -----------------------------------------------------------------------

    def append(self, job: Job) -> None:
        """Queue ``job`` behind its flow's others (``job.flow``, from ``flow_of``)."""
        flow = job.flow
        assert flow is not None
        flow.jobs.append(job)
        self.n += 1
        if not flow.active:
            self.activate(flow)

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs that left the queue but never started (held by a worker that died) back at
        the front of their flows, in their order: each flow stays FIFO by admission."""
        for job in reversed(jobs):
            flow = job.flow
            assert flow is not None
            flow.tag -= job.charge  # charged again when it is taken again
            job.charge = 0.0
            flow.jobs.appendleft(job)
            self.n += 1
            if not flow.active:
                self.activate(flow)

    def activate(self, flow: Flow) -> None:
        """``flow`` has a queued job now (it had none): it joins the flows that take turns."""
        flow.active = True
        if flow.tag < self.vtime:
            flow.tag = self.vtime  # an idle spell banks nothing
        self.active.append(flow)

    def pop(self) -> Job | None:
        """The next job to run: the head of the waiting flow with the smallest tag; None if empty.

        May return a job that was cancelled or answered while queued: the
        caller skips it (as it always did), after ``left`` for it.
        """
        active = self.active
        if not active:
            return None
        if len(active) == 1:
            flow = active[0]
            if len(self.flows) == 1:
                # the pool's only flow (one user, a benchmark): nobody to be fair to, so its calls are
                # not charged (a flow that appears later starts at this virtual time, level with it)
                job = flow.jobs.popleft()
                self.n -= 1
                if not flow.jobs:
                    flow.active = False
                    active.clear()
                return job
        else:
            flow = active[0]
            tag = flow.tag
            for f in active:  # few flows wait at a time; a tie goes to the shorter flow (a newcomer)
                if f.tag < tag or (f.tag == tag and len(f.jobs) < len(flow.jobs)):
                    flow, tag = f, f.tag
        job = flow.jobs.popleft()
        self.n -= 1
        self.vtime = flow.tag
        job.charge = charge = flow.cost / flow.weight
        flow.tag += charge
        if not flow.jobs:
            flow.active = False
            active.remove(flow)
        return job

    def remove_client(self, client: Any) -> list[Job]:
        """Take every queued job of ``client`` out of the queue; they are returned."""
        gone: list[Job] = []
        for flow in list(self.active):
            if any(j.client is client for j in flow.jobs):
                kept: deque[Job] = deque()
                for j in flow.jobs:
                    (gone if j.client is client else kept).append(j)
                flow.jobs = kept
                if not kept:
                    flow.active = False
                    self.active.remove(flow)
        self.n -= len(gone)
        return gone

    def oldest(self) -> Job | None:
        """The queued job admitted first (every flow is FIFO by admission: one of their heads)."""
        first: Job | None = None
        for flow in self.active:
            head = flow.jobs[0]
            if first is None or head.admitted < first.admitted:
                first = head
        return first

    def take(self, job: Job) -> None:
        """Remove queued ``job`` (anywhere in its flow; usually a head, see ``oldest``) from the
        queue, out of the fair order. Its flow still counts it as waiting: the caller says when
        it stops (Dispatcher._left), or uses ``remove``."""
        flow = job.flow
        assert flow is not None
        flow.jobs.remove(job)
        self.n -= 1
        if not flow.jobs:
            flow.active = False
            self.active.remove(flow)

    def learn(self, job: Job, exec_s: float) -> None:
        """``job`` (taken by ``pop``) ran ``exec_s`` seconds: its flow's tag is corrected from the
        estimate it was charged to the real time, and the estimate learns."""
        flow = job.flow
        assert flow is not None
        flow.tag += exec_s / flow.weight - job.charge
        job.charge = 0.0
        if flow.learned:
            flow.cost += COST_EWMA * (exec_s - flow.cost)
        else:  # its first call: the pool's average it started with says nothing about this caller
            flow.cost = exec_s
            flow.learned = True

    def top(self, n: int) -> tuple[list[tuple[str, int]], int]:
        """The ``n`` flows with the most waiting calls, as (name, waiting), and the sum of the rest."""
        waiting = sorted(((f.name, f.waiting) for f in self.flows.values() if f.waiting), key=lambda t: (-t[1], t[0]))
        return waiting[:n], sum(w for _, w in waiting[n:])

    def __len__(self) -> int:
        return self.n

    def __bool__(self) -> bool:
        return self.n > 0

    def __iter__(self) -> Iterator[Job]:
        for flow in self.active:
            yield from flow.jobs

    def clear(self) -> list[Job]:
        """Empty the queue; the jobs that were in it, oldest first."""
        jobs = sorted((j for f in self.active for j in f.jobs), key=lambda j: j.admitted)
        for f in self.active:
            f.jobs.clear()
            f.active = False
        self.active.clear()
        self.n = 0
        return jobs
