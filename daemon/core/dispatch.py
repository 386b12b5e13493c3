r"""One pool's request flow: admission, the bounded fair queue, dispatch, deadlines, sizing.

The dispatcher is the single owner of its pool's queue, worker table and
every deadline. It does no I/O itself: workers are reached through a
``Launcher`` port (spawn, kill, retire) and time through a ``Clock`` port, so
the whole policy runs under a fake clock in unit tests.

Request states::

    submit --> [idle worker] --------------------------> RUNNING --> reply
          \--> [queue has room] --> QUEUED --(worker)--> RUNNING --> reply
          \--> [queue or caller's share full] --> QueueFull    \--> exec deadline: ExecutionTimeout,
                         QUEUED --(queue deadline)--> QueueTimeout    worker killed and replaced
                         QUEUED --(cancel)--> Cancelled               \--> worker died: WorkerCrashed
                                                              \--> cancel: SIGINT, then its answer
                                                                   (Cancelled), or Cancelled and the
                                                                   worker killed after cancel_grace

Invariants:
* every accepted job is answered exactly once (``Job.settle`` is idempotent);
* a job that timed out in the queue, or whose client left, never runs;
* a cancelled job that had not started never runs, held ones included
  (see "Cancelling");
* a job is never re-run (at-most-once): a crash answers it, it does not
  requeue it;
* the queue, the workers' hold lists and the credit granted and not spent
  (``reserved``: places promised to pipelined callers) never add up to more
  than ``queue_size``;
* a CALL that spends credit is never refused QueueFull (its place was reserved).

Fair sharing (daemon/core/fairness.py)
    The queue is a ``FairQueue``: every job belongs to a flow (its caller, its
    connection, or one for all with ``fairness: none``), and ``pump`` and
    ``_prefetch`` take the next job in start-time fair queueing order, FIFO
    within a flow, so held calls follow the same order as the rest. A flow's
    waiting calls (queued or held: ``Flow.waiting``) and unspent credit are
    capped at ``max_queued_per_caller`` while another flow waits. Queue
    deadlines are still admission + queue_timeout: the oldest queued job is
    the oldest of the flows' heads (``FairQueue.oldest``).

Holding (prefetch)
    Under pipelined load a worker idles for one supervisor round trip between
    calls. So when every worker is busy, the pool is at ``max`` and its calls
    are short (moving average under ``PREFETCH_BELOW``), a busy worker is sent
    up to ``prefetch`` queued jobs to hold behind its running one, each behind
    a HELD frame carrying the job's queue deadline. A worker runs its channel
    strictly in order, and writes each reply before reading the next call, so
    the supervisor always knows which held jobs cannot have started: all but
    the first after the running one, and that one too until the running
    one's reply is read. That keeps every guarantee above:

    * a reply makes the next held job the running one (its exec deadline runs
      from then);
    * when a worker dies, its channel is read to the end first; then the
      running job is answered as crashed, and its held jobs, which never
      started, go back to the front of the queue in order;
    * at a held job's queue deadline the worker's channel is read first; if
      the job is still held, its worker has not sent the reply before it and
      will see the deadline passed (same CLOCK_MONOTONIC) and answer NOT_RUN
      instead of starting it, so it is answered QueueTimeout at once;
    * a held job whose client left is withdrawn as on a cancel (below) with
      ``on_disconnect: cancel``; with ``finish`` it runs, its reply dropped.

Cancelling
    A client withdraws a call with Kind.CANCEL (``cancel``), or by leaving
    with ``on_disconnect: cancel`` (``drop_client``). Each worker has a cancel
    board (pool/interrupt.py, posted through the launcher) that it reads
    before it starts a held call and when it gets SIGINT; ``_withdraw`` says
    what happens in each state. The timer that kills a worker whose cancelled
    call ignores its KeyboardInterrupt is armed per cancel (they are rare),
    not kept per worker as the exec deadline is.

q connection (pools with ``q:``): each worker reports its q state in READY
and in STATE frames when it changes; ``worker.q`` keeps the latest
(daemon/core/poolstatus.py). With ``q.required`` the pool is ready only while
its warm workers are connected.

Helpers, each owned by one dispatcher and holding no pool state of its own:
the code cache (daemon/core/codecache.py: registered functions and what each
worker already has), the observer feed (daemon/core/observers.py: counts and
batches of answered requests for metrics and the access log) and the status
report (daemon/core/poolstatus.py). The per-call work stays one call each, as
before the split (see ``Dispatcher.__init__`` for how they are called).

Worker states::

    STARTING --READY--> IDLE <--> BUSY --> DRAINING (recycle/retire) --> gone
        |                          \--> KILLING (exec timeout, shutdown) --> gone
        \-- preload failed / start timeout --> gone, pool backs off before the next spawn
"""

from __future__ import annotations

import itertools
import logging
import signal
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

from cruised.config import PoolConfig
from cruised.core.codecache import CodeCache
from cruised.core.fairness import COST_EWMA, Account, FairQueue, Flow
from cruised.core.observers import AnsweredFeed, Observer
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Status

if TYPE_CHECKING:
    from cruised.core.envbuild import PoolEnv
    from cruised.core.poolstatus import PoolStatus

log = logging.getLogger("cruised.dispatch")

#: hold jobs on busy workers only while the pool's calls average less than this (seconds): a
#: held job waits for the call ahead of it even if another worker frees up first
PREFETCH_BELOW = 0.002
#: weight of the newest call in that moving average
EWMA_WEIGHT = 0.2
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class Clock(Protocol):
    def time(self) -> float: ...

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Any: ...


class ReplySink(Protocol):
    """Where a job's answer goes (a native client connection, an HTTP request, ...)."""

    def forward(self, job: Job, buf: bytearray, status: int) -> None:
        """A worker's REPLY frame for this job (reqid still the job id)."""

    def refuse(self, job: Job, status: int, message: str) -> None:
        """The daemon's own answer (rejections, timeouts, crashes)."""


class FutureReply:
    """A ReplySink that resolves an asyncio future: (status, worker frame or None, refusal message).

    Used by the doors that await their job (HTTP, kdb+ IPC); the native door
    writes replies straight to its connection instead.
    """

    __slots__ = ("future",)

    def __init__(self, loop: Any) -> None:
        self.future = loop.create_future()

    def forward(self, job: Job, buf: bytearray, status: int) -> None:
        if not self.future.done():
            self.future.set_result((status, buf, ""))

    def refuse(self, job: Job, status: int, message: str) -> None:
        if not self.future.done():
            self.future.set_result((status, None, message))


class _WorkerState(frames.Constants):
    """A worker's state (the diagram in this module's docstring): plain ints, compared with ``==``
    and the keys of ``Dispatcher.counts``. ``name(state)`` is the word ``status()`` and the
    metrics print (``"idle"``)."""

    STARTING: Final = 0
    IDLE: Final = 1
    BUSY: Final = 2
    DRAINING: Final = 3
    KILLING: Final = 4
    GONE: Final = 5

    def name(self, value: int) -> str:
        return super().name(value).lower()


WorkerState: Final = _WorkerState()


class Launcher(Protocol):
    def spawn(self, worker: Worker) -> None: ...

    def send(self, worker: Worker, parts: list[Any], fd: int | None = None) -> None:
        """Queue ``parts`` on the worker's channel; ``fd`` (the caller keeps it) goes with them."""

    def kill(self, worker: Worker) -> None:
        """SIGTERM now, SIGKILL after the grace period; report the exit via ``on_worker_exit``."""

    def retire(self, worker: Worker) -> None:
        """Close the channel: the worker finishes its loop and exits 0."""

    def rss(self, worker: Worker) -> int | None:
        """Resident memory of the worker in bytes, if known."""

    def drain(self, worker: Worker) -> None:
        """Read and deliver, now, every frame the worker has already sent (its replies first)."""

    def cancel(self, worker: Worker, job_id: int) -> None:
        """Post ``job_id`` on the worker's cancel board: it will not start that call from now on (pool/interrupt.py)."""

    def interrupt(self, worker: Worker) -> None:
        """SIGINT the worker: a call posted on its board that runs now sees KeyboardInterrupt."""


@dataclass(eq=False, slots=True, kw_only=True)
class Job:
    """One request, from admission to its one answer.

    A door names every field it sets (several are ints, two are often the same
    object: a field added or reordered must not shift a caller's). The fields
    after ``shared`` are the request's life in the dispatcher, never a door's
    input, so they are not constructor arguments at all; that also keeps the
    constructor cheap (every keyword-only default costs a dict lookup per call).
    """

    id: int
    kind: int
    frame: bytearray
    sink: ReplySink
    client: Any  # whoever owns the job; drop_client() matches on identity
    client_reqid: int
    key: bytes | None = None
    timeout: float | None = None  # per-call execution timeout, if the caller set one
    endpoint: str = "function"
    door: str = "native"  # which front door admitted it (native, http, qipc): a metrics label
    caller: str = ""  # who sent it (the door's name for them: daemon/core/fairness.py "Callers")
    credited: bool = False  # the client spends a credit on it (a CALL flagged CREDITED): never QueueFull
    #: the call's shared file (pool/wire/sharedfile.py), sent with the frame to whichever worker runs it;
    #: closed by ``settle``, or when the job is dropped
    shared: Any = None
    # -- set by the dispatcher ---------------------------------------------------------
    admitted: float = field(default=0.0, init=False)
    deadline: float = field(default=0.0, init=False)  # queue deadline
    started: float | None = field(default=None, init=False)
    finished: float | None = field(default=None, init=False)
    worker: Worker | None = field(default=None, init=False)
    held: bool = field(default=False, init=False)  # sent to a busy worker, waiting behind its running job (not started)
    answered: bool = field(default=False, init=False)
    cancelled: bool = field(default=False, init=False)  # client went away: do not run, do not reply
    #: withdrawn (Kind.CANCEL, or its client left with on_disconnect: cancel) once it had reached a
    #: worker (0: not): posted on the worker's cancel board; if it runs, its worker is interrupted
    #: and killed at this time (monotonic) unless it has answered by then
    cancel_by: float = field(default=0.0, init=False)
    exec_limit: float = field(default=0.0, init=False)  # the execution timeout in force once it started (0 = not started)
    flow: Flow | None = field(default=None, init=False)  # its share of the pool, once it had to wait
    waits: bool = field(default=False, init=False)  # counted in ``flow.waiting`` (queued or held; see Dispatcher._left)
    charge: float = field(default=0.0, init=False)  # virtual time its flow was charged when it left the queue (FairQueue.pop)

    def settle(self) -> bool:
        """Mark the job answered; True the first time only, when its answer is to be sent.

        Its shared file is closed here, the one place every answer passes: no worker
        will be sent the job again (a held job requeued after its worker died is not
        answered yet, so it is resent with its file).
        """
        if self.answered:
            return False
        self.answered = True
        if self.shared is not None:
            self.shared.close()
            self.shared = None
        return True


@dataclass(eq=False)
class Worker:
    id: str
    state: int = WorkerState.STARTING
    pid: int | None = None
    python: str | None = None
    job: Job | None = None
    known: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    requests: int = 0
    spawned_at: float = 0.0
    ready_at: float | None = None
    idle_since: float = 0.0
    error: str | None = None  # preload failure text, if any
    exit_reason: str | None = None  # set when we decide it must go
    timer: Any = None  # start deadline handle
    handle: Any = None  # the launcher's own per-worker state
    q: dict[str, Any] | None = None  # {"connected": bool, "error": str | None}, as the worker reported it
    #: the exec-deadline timer, re-armed lazily (see Dispatcher._arm_exec); fires at or before the job's deadline
    exec_timer: Any = None
    exec_timer_at: float = 0.0
    #: jobs sent to wait behind ``job``, in channel order (see "Holding" above)
    held: deque[Job] = field(default_factory=deque)
    recycle_due: bool = False  # over max_rss: take nothing more, retire once done
    dead: bool = False  # the process is gone; its last frames are being delivered before the exit report


class Dispatcher:
    def __init__(
        self,
        name: str,
        config: PoolConfig,
        clock: Clock,
        launcher: Launcher,
        observer: Observer | None = None,
        *,
        worker_ids: Iterator[int] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.clock = clock
        self.launcher = launcher
        # The helpers are called as self.<helper>.<method>(...): on CPython 3.11 that is two
        # specialised lookups (the helpers have __slots__), cheaper than a bound method kept in
        # this instance's dict, which LOAD_METHOD cannot specialise (callgrind, ~250 instructions
        # a call).
        self._answers = AnsweredFeed(name, clock, observer)
        #: counts for ``cruised status``, and who watches this pool (Metrics.attach appends itself)
        self.counters = self._answers.counters
        self.observers: list[Observer] = self._answers.observers
        #: the waiting jobs, in flows (daemon/core/fairness.py); ``queue.n`` is how many
        self.queue = FairQueue(config.fairness, config.shares)
        #: per flow: most waiting calls + unspent credit while another flow waits (PoolConfig.caller_limit)
        self.caller_limit = config.caller_limit()
        self._by_caller = config.fairness == "caller"  # flows are keyed by caller name (FairQueue.flow_of)
        #: credit is granted in batches of this many (fewer CREDIT frames; a map refills in batches anyway)
        self.credit_batch = max(1, self.caller_limit // 2)
        #: connections that asked for credit (a pipelined map), by client
        self.accounts: dict[Any, Account] = {}
        self.reserved = 0  # credit granted and not spent: places in the queue nobody else may take
        self._credit_due = 0  # replies until pump looks for credit to grant again (_top_up)
        #: every held job in the order it left the queue (= deadline order); started ones are skipped lazily
        self.held: deque[Job] = deque()
        self.held_count = 0  # jobs in all workers' hold lists (admission counts them as queued)
        self.exec_avg = 1.0  # moving average of exec time (s): pessimistic until calls show otherwise
        self.workers: dict[str, Worker] = {}
        self.idle: list[Worker] = []  # LIFO: hot workers stay hot, surplus ones age out
        self.code_cache = CodeCache()
        #: registered DEFINE frames by key (the cache's own dict, read-only here): submit tests every keyed call against it
        self.code: OrderedDict[bytes, bytearray] = self.code_cache.frames
        self.accepting = True
        #: (status, message) every new call is refused with, or None: shutdown (SHUTTING_DOWN, for
        #: good) or a drain (DRAINING, until ``set_draining(False)``). One test on the hot path for both.
        self.refusal: tuple[int, str] | None = None
        self.python: str | None = None  # the pool's interpreter version, once a worker said it
        #: the latest READY report of a worker (its endpoints' load results: daemon/core/services.py)
        self.ready_info: dict[str, Any] = {}
        self.failures = 0
        self.last_error: str | None = None
        self.next_spawn_at = 0.0
        #: numbers of this pool's workers (ids ``<pool>-<n>``); a reload's new dispatcher of the same pool
        #: shares its predecessor's, so an id names one process even while both generations run
        self.worker_ids: Iterator[int] = worker_ids if worker_ids is not None else itertools.count(1)
        self._queue_timer: Any = None
        self._queue_timer_at: float | None = None
        self._idle_timer: Any = None
        self._manage_timer: Any = None
        self._aborted: str | None = None  # abort_queue's message, once the queue was given up
        #: workers per state, kept by ``_set_state`` so sizing decisions are O(1) per request
        self.counts: dict[int, int] = {s: 0 for s in WorkerState}
        self.on_change: Callable[[], None] = lambda: None  # readiness/status watchers
        from cruised.core.poolstatus import PoolStatus  # it reads this module's worker states: imported once the module is complete

        #: the pool's code env built by cruised (core/envbuild.py), if it has one: no worker starts before it is ready
        self.env: PoolEnv | None = None

        self._report: PoolStatus = PoolStatus(self)

    def _set_state(self, worker: Worker, state: int) -> None:
        """The only place a worker changes state (the counts depend on it)."""
        self.counts[worker.state] -= 1
        self.counts[state] += 1
        worker.state = state

    # -- admission -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        now = self.clock.time()
        job.admitted = now
        if self.refusal is not None:
            self._finish(job, self.refusal[0], self.refusal[1], "rejected")
            return
        if job.key is not None and job.key not in self.code:
            # the daemon restarted or evicted it: the client registers again and retries
            job.settle()
            job.sink.refuse(job, Status.UNKNOWN_FUNCTION, "function not registered with this daemon")
            return
        if self.idle and not self.queue.n:
            if job.credited and self._spend(job):
                self._start(self.idle.pop(), job)
                self._top_up()  # the place it had reserved is free again
                return
            self._start(self.idle.pop(), job)
            return
        queue = self.queue
        waiting = queue.n + self.held_count
        acct = self.accounts.get(job.client) if job.credited else None
        if acct is not None and acct.unused:
            # _spend, inline (a pipelined map's every call): its place was reserved, it is never refused
            acct.unused -= 1
            flow = acct.flow
            flow.unused -= 1
            self.reserved -= 1
        else:
            # flow_of, its commonest case inline: a known caller's flow
            known = queue.flows.get(job.caller) if self._by_caller else None
            flow = known if known is not None else queue.flow_of(job.caller, job.client, self.exec_avg)
            if waiting + self.reserved >= self.config.queue_size or (flow.waiting + flow.unused >= self.caller_limit and waiting > flow.waiting):
                self._finish(job, Status.QUEUE_FULL, self._refusal(flow, waiting), "rejected")
                return
        job.flow = flow
        job.deadline = now + self.config.queue_timeout
        flow.waiting += 1
        job.waits = True
        # queue.append, inline
        flow.jobs.append(job)
        queue.n += 1
        if not flow.active:
            queue.activate(flow)
        if self._queue_timer is None:  # an armed one fires no later than this newest deadline
            self._arm_queue_timer()
        if not self.idle:
            self._prefetch()
        self.manage()

    def _refusal(self, flow: Flow, waiting: int) -> str:
        """Why a call of ``flow`` that spends no credit found no place (``waiting``: queued + held):
        the queue is full (with the credit reserved), or the caller has its share while others wait."""
        size = self.config.queue_size
        if waiting + self.reserved >= size:
            busy = self.counts[WorkerState.BUSY]
            reserved = f" + {self.reserved} reserved for pipelined callers" if self.reserved else ""
            return f"pool {self.name!r} is full: queue {waiting}{reserved}/{size}, {busy} busy workers"
        holding = flow.waiting + flow.unused
        return (
            f"pool {self.name!r}: caller {flow.name!r} already has {holding} of its queue (max_queued_per_caller {self.caller_limit}) while other callers wait"
        )

    def _left(self, job: Job) -> None:
        """``job`` is no longer waiting (it started, or left the queue unanswered or answered)."""
        if job.waits:
            job.waits = False
            flow = job.flow
            assert flow is not None  # a job that waits has its flow
            flow.waiting -= 1
            if not flow.waiting:
                self.queue.idle(flow)

    # -- credit (see "Credit" in daemon/core/fairness.py) ------------------------------------

    def open_credit(self, client: Any, caller: str) -> int:
        """``client`` (it has ``credit(pool, n)``) asks for credit: the credit it has now (its first grant)."""
        acct = self.accounts.get(client)
        if acct is None:
            acct = self.accounts[client] = Account(client, caller, self.queue.flow_of(caller, client, self.exec_avg))
            acct.flow.accounts += 1
        return self._grant(acct, 1)

    def adopt_credit(self, old: Dispatcher) -> None:
        """A reload made this the pool's serving dispatcher: the connections' unspent credit on
        ``old`` is theirs here (their next calls come here), honoured even beyond this queue's room."""
        for client, acct in list(old.accounts.items()):
            unused = acct.unused
            old.close_credit(client)
            mine = self.accounts.get(client)
            if mine is None:
                mine = self.accounts[client] = Account(client, acct.caller, self.queue.flow_of(acct.caller, client, self.exec_avg))
                mine.flow.accounts += 1
            mine.unused += unused
            mine.flow.unused += unused
            self.reserved += unused

    def close_credit(self, client: Any) -> None:
        """``client`` needs no more credit: what it did not spend is free for everyone again."""
        acct = self.accounts.pop(client, None)
        if acct is None:
            return
        acct.flow.unused -= acct.unused
        acct.flow.accounts -= 1
        self.reserved -= acct.unused
        acct.unused = 0
        self._top_up()

    def _spend(self, job: Job) -> bool:
        """Spend one of ``job``'s connection's credits on it; False if it has none (a call like any other)."""
        acct = self.accounts.get(job.client)
        if acct is None or not acct.unused:
            return False
        acct.unused -= 1
        acct.flow.unused -= 1
        self.reserved -= 1
        return True

    def _grant(self, acct: Account, least: int) -> int:
        """Grant ``acct`` what its flow and the queue have room for, if that is ``least`` or more; the grant."""
        flow = acct.flow
        room = min(
            self.caller_limit - flow.waiting - flow.unused,
            self.config.queue_size - self.queue.n - self.held_count - self.reserved,
        )
        if room < least:
            return 0
        acct.unused += room
        flow.unused += room
        self.reserved += room
        return room

    def _top_up(self) -> None:
        """Send credit to connections whose flows have room for a batch of it (calls left the queue)."""
        batch = self.credit_batch
        self._credit_due = max(1, batch // 4)
        room = self.config.queue_size - self.queue.n - self.held_count - self.reserved
        if room < batch:
            return  # the commonest answer, after every reply of a pipelined pool: nothing to grant yet
        limit = self.caller_limit
        for acct in self.accounts.values():
            flow = acct.flow
            if limit - flow.waiting - flow.unused >= batch:
                granted = self._grant(acct, batch)
                if granted:
                    acct.client.credit(self.name, granted)

    def drop_client(self, client: Any) -> None:
        """The client left: its queued jobs never run (counted ``cancelled``), its unspent credit is
        free again. Its running and held ones are withdrawn as on a cancel with ``on_disconnect:
        cancel`` (``_withdraw``), else they run and finish; either way no reply is sent."""
        now = self.clock.time()
        for j in self.queue.remove_client(client):
            self._left(j)
            j.cancelled = True
            j.finished = now
            self._finish(j, Status.CANCELLED, "", "cancelled")  # counted; nobody to answer
        if client in self.accounts:
            self.close_credit(client)
        if self.queue.mode == "connection":
            self.queue.forget(client)
        withdraw = self.config.on_disconnect == "cancel"
        mine: list[Job] = []
        for w in self.workers.values():
            for on in (w.job, *w.held):
                if on is not None and on.client is client and not on.answered:
                    on.cancelled = True  # no reply: nobody reads it
                    mine.append(on)
        if withdraw:
            for j in mine:  # after the walk: withdrawing reads replies, which may change the workers
                self._withdraw(j)

    # -- cancelling ------------------------------------------------------------------

    def cancel(self, client: Any, client_reqid: int) -> bool:
        """``client`` withdrew its call ``client_reqid`` (Kind.CANCEL); False if this pool has no
        such call unanswered (it was answered already, or is another pool's).

        The call gets its one answer as ever: CANCELLED now if it had not started (it never
        will), or once it stops if it runs (``_withdraw``).
        """
        job = self._find(client, client_reqid)
        if job is None:
            return False
        self._withdraw(job)
        return True

    def _find(self, client: Any, client_reqid: int) -> Job | None:
        """The unanswered job ``client`` knows as ``client_reqid``: queued, held or running.
        A scan: cancels are rare, and an index would cost every call."""
        for j in self.queue:
            if j.client_reqid == client_reqid and j.client is client and not j.answered:
                return j
        for w in self.workers.values():
            for on in (w.job, *w.held):
                if on is not None and on.client_reqid == client_reqid and on.client is client and not on.answered:
                    return on
        return None

    def _dequeue(self, job: Job) -> None:
        """Take a queued job out of the queue and its flow's count (it is answered next: the queue
        holds only live jobs)."""
        self.queue.take(job)
        self._left(job)

    def _withdraw(self, job: Job) -> None:
        """Cancel ``job`` wherever it is; its answer (``CANCELLED``) is sent once, as every answer.

        * queued: taken out and answered now; it never runs;
        * held by a busy worker: posted on the worker's cancel board first, then the worker's
          replies are read. Still held after that, the worker has not started it and will not
          (it answers NOT_RUN when it gets there: pool/interrupt.py), so it is answered now;
        * running (a CALL, ENDPOINT or QCALL): posted, and the worker is sent SIGINT, so the
          function sees KeyboardInterrupt; the worker answers CANCELLED when it stops. If it has not
          within ``cancel_grace``, the call is answered CANCELLED and the worker killed
          (``_cancel_overdue``). A CHECK (a library import) cannot be interrupted and finishes.
        """
        if job.answered or job.cancel_by:
            return
        now = self.clock.time()
        worker = job.worker
        if worker is None:
            self._dequeue(job)
            job.finished = now
            self._finish(job, Status.CANCELLED, "cancelled while queued; it never ran", "cancelled")
            return
        grace = self.config.cancel_grace
        job.cancel_by = now + grace  # withdrawn: never twice, and a NOT_RUN for it means it never started
        self.launcher.cancel(worker, job.id)  # first: from here on the worker will not start it
        if job.held:
            self.launcher.drain(worker)  # a reply already sent may have started it
            if _answered(job):  # (a function: mypy would keep its narrowing of job.answered across the drain)
                return
            if job.held:
                job.finished = now
                self._finish(job, Status.CANCELLED, NEVER_STARTED, "cancelled")
                return
        if worker.job is not job or worker.state != WorkerState.BUSY or job.kind not in INTERRUPTIBLE:
            return  # its worker is being killed (that answers it), or it cannot be interrupted: it finishes
        log.info(
            "worker=%s pool=%s call %s cancelled while running: interrupting it, killing its worker in %gs if it has not stopped",
            worker.id,
            self.name,
            job.id,
            grace,
        )
        self.launcher.interrupt(worker)
        self.clock.call_at(job.cancel_by, self._cancel_overdue, worker, job)

    def _cancel_overdue(self, worker: Worker, job: Job) -> None:
        """``cancel_grace`` after its interrupt: a call still running is answered, its worker killed."""
        if job.answered or worker.job is not job:
            return
        self.launcher.drain(worker)  # it may have answered just in time
        if job.answered or worker.job is not job or worker.state != WorkerState.BUSY:
            return
        grace = self.config.cancel_grace
        log.warning(
            "worker=%s pool=%s call %s did not stop within cancel_grace (%gs) of its interrupt; killing the worker", worker.id, self.name, job.id, grace
        )
        job.finished = self.clock.time()
        self._finish(
            job, Status.CANCELLED, f"cancelled; the call did not stop within cancel_grace ({grace:g}s) of its interrupt, so its worker was killed", "cancelled"
        )
        self._kill(worker, "cancelled")
        self.manage()

    # -- running ---------------------------------------------------------------------

    def _code_gone(self, job: Job) -> None:
        """``job``'s function was evicted before it could be sent: the client registers again and retries."""
        job.settle()
        job.sink.refuse(job, Status.UNKNOWN_FUNCTION, "function not registered with this daemon")

    def _start(self, worker: Worker, job: Job) -> None:
        # a registered function (CALL, or a pykx.remote QCALL): its code first, once per worker
        key = job.key
        parts = [] if key is None else self.code_cache.parts_for(worker.known, key)
        if parts is None:
            self._code_gone(job)
            self._become_idle(worker)
            return
        frames.set_reqid(job.frame, job.id)
        parts.append(job.frame)
        job.worker = worker
        worker.job = job
        self._set_state(worker, WorkerState.BUSY)
        self._begin(worker, job, self.clock.time())
        self.launcher.send(worker, parts, None if job.shared is None else job.shared.fd)

    def _begin(self, worker: Worker, job: Job, now: float) -> None:
        """``job`` is running on ``worker`` from ``now``: its execution deadline starts."""
        job.started = now
        limit: float = self.config.exec_timeout
        if job.timeout is not None and 0 < job.timeout < limit:
            limit = job.timeout
        job.exec_limit = limit
        self._arm_exec(worker, now + limit)

    def _hold(self, worker: Worker, job: Job) -> bool:
        """Send ``job`` to wait behind ``worker``'s running job (see "Holding")."""
        key = job.key
        parts = [] if key is None else self.code_cache.parts_for(worker.known, key)
        if parts is None:
            self._left(job)
            self._code_gone(job)
            return False
        frames.set_reqid(job.frame, job.id)
        # the deadline in CLOCK_MONOTONIC ns: the clock is time.monotonic (LoopClock), as in the worker
        parts.append(frames.held_frame(job.id, int(job.deadline * 1e9)))
        parts.append(job.frame)
        job.worker = worker
        job.held = True
        worker.held.append(job)
        self.held.append(job)
        self.held_count += 1
        self.counters.held += 1
        self.launcher.send(worker, parts, None if job.shared is None else job.shared.fd)
        return True

    def _prefetch(self, only: Worker | None = None) -> None:
        """Give busy workers (or just ``only``, whose hold list shrank) queued jobs to hold, when
        that cannot make anyone wait longer."""
        if not self.queue.n or self.idle:
            return
        k = self.config.prefetch
        counts = self.counts
        busy = counts[WorkerState.BUSY]
        if (
            self.held_count >= k * busy  # every busy worker holds its share (or prefetch is 0)
            or self.exec_avg >= PREFETCH_BELOW
            or counts[WorkerState.STARTING]
            or busy < self.config.max  # below max a new worker would take them sooner
        ):
            return
        limit = self.config.max_requests
        armed = self._queue_timer is not None
        if only is not None:  # after a reply (pump): only that worker's list has room; fill it
            if self._may_hold(only, limit):
                queue = self.queue
                while queue.n and len(only.held) < k:
                    job = queue.pop()
                    assert job is not None
                    if job.cancelled or job.answered:
                        self._left(job)
                    else:
                        self._hold(only, job)
            if not armed:
                self._arm_queue_timer()
            return
        takers = [w for w in self.workers.values() if self._may_hold(w, limit)]
        for depth in range(k):  # round robin: every worker holds one before any holds two
            for w in takers:
                if len(w.held) != depth:
                    continue
                while self.queue.n:
                    job = self.queue.pop()
                    assert job is not None
                    if job.cancelled or job.answered:
                        self._left(job)
                    elif self._hold(w, job):
                        break
                if not self.queue.n:
                    break
            if not self.queue.n:
                break
        if not armed:
            self._arm_queue_timer()

    @staticmethod
    def _may_hold(w: Worker, limit: int) -> bool:
        """Whether ``w`` may be sent jobs to hold now (``limit``: max_requests, 0 for none)."""
        return w.state == WorkerState.BUSY and not w.recycle_due and not w.dead and (not limit or w.requests + 1 + len(w.held) < limit)

    def on_worker_reply(self, worker: Worker, buf: bytearray, status: int, reqid: int) -> None:
        job = worker.job
        if job is None or reqid != job.id or worker.state not in (WorkerState.BUSY, WorkerState.KILLING):
            if worker.state == WorkerState.KILLING:
                return  # a late answer from a worker we already gave up on
            log.error("worker=%s pool=%s protocol violation: reply %s without a matching call; killing it", worker.id, self.name, reqid)
            self._kill(worker, "crash")
            return
        now = self.clock.time()
        self._next_held(worker, now)  # the worker starts its next held job (if any) right after this reply
        if worker.state == WorkerState.KILLING:
            return  # a late answer from a worker we already gave up on (its job was answered then)
        job.finished = now
        if status == Status.NOT_RUN:  # a held job whose queue deadline passed in the worker, or that was withdrawn
            if job.cancel_by:  # it was still held when posted; it became the running one as the worker's replies were read
                self._finish(job, Status.CANCELLED, NEVER_STARTED, "cancelled")
            else:
                self._finish(job, Status.QUEUE_TIMEOUT, self._queue_timeout_message(job, now), "queue_timeout")
        else:
            worker.requests += 1
            if job.started is not None:
                self.exec_avg += EWMA_WEIGHT * (now - job.started - self.exec_avg)
                if job.charge:  # it left the queue: its flow is charged its real time (FairQueue.learn, inline)
                    flow = job.flow
                    assert flow is not None
                    ran = now - job.started
                    flow.tag += ran / flow.weight - job.charge
                    job.charge = 0.0
                    if flow.learned:
                        flow.cost += COST_EWMA * (ran - flow.cost)
                    else:
                        flow.cost, flow.learned = ran, True
            if status == Status.UNKNOWN_FUNCTION and job.key is not None:
                CodeCache.forget(worker.known, job.key)
            if job.settle():
                # the answer first: the native door sends it at once (channel.WriteBatch), and
                # everything after it here overlaps with the client's wake-up
                if not job.cancelled:
                    job.sink.forward(job, buf, status)
                self._answers.observe(job, _OUTCOMES.get(status, "error"))
            if self.config.max_rss and not worker.recycle_due and (self.launcher.rss(worker) or 0) > self.config.max_rss:
                log.info("worker=%s pool=%s over max_rss (%d bytes); recycling it", worker.id, self.name, self.config.max_rss)
                worker.recycle_due = True
        if worker.job is None and not worker.dead:
            if worker.recycle_due or (self.config.max_requests and worker.requests >= self.config.max_requests):
                self._retire(worker, "recycled")
            else:
                self._become_idle(worker)
        self.pump(worker if worker.job is not None else None)

    def _next_held(self, worker: Worker, now: float) -> None:
        """The running job replied: the first held job, if any, is running from now."""
        if not worker.held:
            worker.job = None
            return
        nxt = worker.held.popleft()
        self.held_count -= 1
        if nxt.waits:  # _left, inline: every held job passes here
            nxt.waits = False
            flow = nxt.flow
            assert flow is not None
            flow.waiting -= 1
            if not flow.waiting:
                self.queue.idle(flow)
        nxt.held = False
        worker.job = nxt
        if not nxt.answered and worker.state == WorkerState.BUSY:
            self._begin(worker, nxt, now)

    def _arm_exec(self, worker: Worker, deadline: float) -> None:
        """Make sure a timer fires at or before ``deadline``.

        One timer per worker, not one per call: a timer armed for an earlier
        call's deadline is kept (replies do not cancel it) and, when it fires,
        re-arms itself for the running call's deadline (``_exec_check``).
        Calls are usually far shorter than exec_timeout, so most calls create
        and cancel no timer at all, yet a call is still killed exactly at its
        deadline.
        """
        if worker.exec_timer is not None:
            if worker.exec_timer_at <= deadline:
                return
            worker.exec_timer.cancel()  # a shorter per-call timeout than the armed one
        worker.exec_timer_at = deadline
        worker.exec_timer = self.clock.call_at(deadline, self._exec_check, worker)

    def _exec_check(self, worker: Worker) -> None:
        worker.exec_timer = None
        job = worker.job
        if job is None or job.started is None or worker.state != WorkerState.BUSY:
            return  # idle (or already being killed): nothing to time; the next call re-arms
        deadline = job.started + (job.exec_limit or self.config.exec_timeout)
        if deadline > worker.exec_timer_at:
            self._arm_exec(worker, deadline)  # armed for an earlier call: wait for this one's deadline
            return
        # A reply already sent means the call ended before the timer could fire (a loop delayed
        # under load): read it first, as _expire_queue does for held calls. If it answers the
        # call, _exec_timeout finds the job answered and kills nothing.
        self.launcher.drain(worker)
        self._exec_timeout(worker, job)  # this call's own deadline (the loop's resolution, as before)

    def _exec_timeout(self, worker: Worker, job: Job) -> None:
        if worker.job is not job or job.answered:
            return
        worker.timer = None
        limit = job.exec_limit or self.config.exec_timeout
        log.warning("worker=%s pool=%s call %s ran past %.3gs; killing the worker", worker.id, self.name, job.id, limit)
        job.finished = self.clock.time()
        self._finish(job, Status.EXEC_TIMEOUT, f"call ran past its execution timeout of {limit:g}s; its worker was killed", "exec_timeout")
        self._kill(worker, "exec_timeout")
        self.manage()

    def pump(self, replied: Worker | None = None) -> None:
        """Hand queued jobs to idle workers, oldest job first; then maybe to busy ones to hold
        (after a reply only ``replied`` has room that was not offered before)."""
        queue = self.queue
        while queue.n and self.idle:
            job = queue.pop()
            assert job is not None
            if job.waits:  # _left, inline
                job.waits = False
                flow = job.flow
                assert flow is not None
                flow.waiting -= 1
                if not flow.waiting:
                    queue.idle(flow)
            if job.cancelled or job.answered:
                continue
            self._start(self.idle.pop(), job)
        if queue.n:
            self._prefetch(replied)
        if self.accounts:
            # calls left the queue: maybe room for a batch of credit. Looked at every few replies (a
            # grant is a batch: it waits for that much room anyway), and whenever the queue is empty
            self._credit_due -= 1
            if self._credit_due <= 0 or not queue.n:
                self._top_up()
        self.manage()

    def _queue_timeout_message(self, job: Job, now: float) -> str:
        why = self.env.unavailable() if self.env is not None else None  # a code env still building says so
        env = f"; {why}" if why else ""
        return f"waited {now - job.admitted:.3g}s in pool {self.name!r}'s queue (queue_timeout {self.config.queue_timeout:g}s{env}); not run"

    def _first_held(self) -> Job | None:
        """The oldest job still held (not started, not answered), dropping the others from the front."""
        held = self.held
        while held and (not held[0].held or held[0].answered):
            held.popleft()
        return held[0] if held else None

    def _expire_queue(self) -> None:
        self._queue_timer = self._queue_timer_at = None
        now = self.clock.time()
        drained: set[str] = set()
        while (job := self._first_held()) is not None and job.deadline <= now:
            worker = job.worker
            assert worker is not None
            if worker.id not in drained:
                # a reply already sent would mean the job started in time: read it first
                drained.add(worker.id)
                self.launcher.drain(worker)
                continue
            # Still held after reading everything its worker sent: the worker will find the
            # deadline passed and answer NOT_RUN. It stays in the hold list to pair that reply.
            job.finished = now
            self._finish(job, Status.QUEUE_TIMEOUT, self._queue_timeout_message(job, now), "queue_timeout")
        queue = self.queue
        while (job := queue.oldest()) is not None and (job.deadline <= now or job.cancelled):
            queue.take(job)
            self._left(job)
            if job.cancelled:
                continue
            job.finished = now
            self._finish(job, Status.QUEUE_TIMEOUT, self._queue_timeout_message(job, now), "queue_timeout")
        if self.accounts:
            self._top_up()
        self._arm_queue_timer()

    def _arm_queue_timer(self) -> None:
        # Deadlines are admission order plus one queue_timeout, so the oldest queued job (and the
        # oldest held one) always expires first: one timer per pool suffices.
        first = self._first_held() if self.held else None
        deadlines = [j.deadline for j in (self.queue.oldest(), first) if j is not None]
        if not deadlines:
            return
        at = min(deadlines)
        if self._queue_timer is not None and self._queue_timer_at is not None and self._queue_timer_at <= at:
            return  # an earlier timer will fire and re-arm
        _cancel(self._queue_timer)
        self._queue_timer_at = at
        self._queue_timer = self.clock.call_at(at, self._expire_queue)

    def _finish(self, job: Job, status: int, message: str, outcome: str) -> None:
        if not job.settle():
            return
        self._answers.observe(job, outcome)
        if not job.cancelled:
            job.sink.refuse(job, status, message)

    def flush_answered(self) -> None:
        """Show the observers every request answered since the last batch (see daemon/core/observers.py).

        Whoever reads what the observers keep calls this first (Supervisor.render_metrics,
        shutdown, a retired pool's last step), so a scrape counts every request answered before it.
        """
        self._answers.flush()

    # -- worker lifecycle ----------------------------------------------------------------

    def _spawn(self) -> Worker:
        w = Worker(id=f"{self.name}-{next(self.worker_ids)}", spawned_at=self.clock.time())
        self.workers[w.id] = w
        self.counts[WorkerState.STARTING] += 1
        w.timer = self.clock.call_at(w.spawned_at + self.config.start_timeout, self._start_timeout, w)
        self.launcher.spawn(w)
        return w

    def _start_timeout(self, worker: Worker) -> None:
        if worker.state != WorkerState.STARTING:
            return
        worker.timer = None
        worker.error = f"not ready within start_timeout ({self.config.start_timeout:g}s)"
        log.error("worker=%s pool=%s %s", worker.id, self.name, worker.error)
        self._kill(worker, "preload_failed")

    def on_worker_ready(self, worker: Worker, info: dict[str, Any]) -> None:
        if worker.state != WorkerState.STARTING:
            return
        _cancel(worker.timer)
        worker.timer = None
        now = self.clock.time()
        worker.pid = info.get("pid", worker.pid)
        worker.python = info.get("python")
        self.python = worker.python or self.python
        self.ready_info = info
        worker.ready_at = now
        self._report.note_q(worker, info.get("q"))
        self.failures = 0
        self.last_error = None
        log.info("worker=%s pool=%s ready pid=%s in %.1fms", worker.id, self.name, worker.pid, (now - worker.spawned_at) * 1e3)
        self._become_idle(worker)
        self.pump()
        self.on_change()

    def on_worker_state(self, worker: Worker, info: dict[str, Any]) -> None:
        """An unsolicited STATE frame: the worker's q connection came up or went down."""
        if worker.state in (WorkerState.GONE, WorkerState.KILLING):
            return
        if self._report.note_q(worker, info.get("q")):
            self.on_change()

    def q_connected(self) -> int:
        """Ready workers (idle or busy) whose q connection is up; 0 in a pool without q."""
        return self._report.q_connected()

    def on_worker_violation(self, worker: Worker) -> None:
        """The worker broke the channel protocol (its reporter logged how): it is killed, and
        its exit answers its call as crashed, like any other crash."""
        self._kill(worker, "crash")

    def on_worker_preload_failed(self, worker: Worker, message: str) -> None:
        worker.error = message
        worker.exit_reason = "preload_failed"

    def on_worker_lost(self, worker: Worker) -> None:
        """Its channel is gone (end of stream, a failed write, or the process reported dead): it can
        take nothing more. Frames it sent before may still be delivered; its exit report follows."""
        worker.dead = True
        if worker in self.idle:
            self.idle.remove(worker)

    def on_worker_exit(self, worker: Worker, code: int | None) -> None:
        """The process is gone (reaped). Answers its job, if any, and refills the pool."""
        if worker.state == WorkerState.GONE:
            return
        was_starting = worker.state == WorkerState.STARTING
        _cancel(worker.timer)
        worker.timer = None
        _cancel(worker.exec_timer)
        worker.exec_timer = None
        how = _describe_exit(code)
        job = worker.job
        if job is not None and not job.answered:
            job.finished = self.clock.time()
            self._finish(job, Status.WORKER_CRASHED, f"worker {worker.id} died during the call ({how}); the call was not retried", "crashed")
        worker.job = None
        if worker.held:
            # Its channel was read to the end before this report (Launcher.drain), and no reply
            # for the running job came, so none of these started: back to the front, in order.
            requeue = [j for j in worker.held if not (j.answered or j.cancelled)]
            self.held_count -= len(worker.held)
            for j in worker.held:
                j.held = False
                j.worker = None
                if j.cancelled or j.answered:
                    self._left(j)  # the requeued ones still wait
                if j.cancelled:
                    j.settle()  # its client left: nobody is answered, but its file is released
            worker.held.clear()
            if self._aborted is not None:  # shutting down: the queue was already answered
                for j in requeue:
                    self._left(j)
                    self._finish(j, Status.SHUTTING_DOWN, self._aborted, "rejected")
            else:
                self.queue.requeue(requeue)
                self._arm_queue_timer()
            log.info(
                "worker=%s pool=%s died holding %d calls that had not started: requeued %s head=%s",
                worker.id,
                self.name,
                len(requeue),
                [(j.id, j.client_reqid) for j in requeue],
                (job.id, job.client_reqid) if job else None,
            )
        reason = worker.exit_reason
        if reason is None:
            reason = "preload_failed" if was_starting else ("shutdown" if not self.accepting else "crash")
        if reason == "preload_failed":
            self.failures += 1
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
            self.next_spawn_at = self.clock.time() + delay
            self.last_error = worker.error or f"worker exited before it was ready ({how})"
            log.error("worker=%s pool=%s failed to start: %s; next attempt in %.1fs", worker.id, self.name, self.last_error, delay)
        elif reason == "crash":
            log.error("worker=%s pool=%s died: %s", worker.id, self.name, how)
        else:
            log.info("worker=%s pool=%s exited (%s, %s)", worker.id, self.name, reason, how)
        self._set_state(worker, WorkerState.GONE)
        if worker in self.idle:
            self.idle.remove(worker)
        self.workers.pop(worker.id, None)
        self._answers.worker_exit(reason)
        if self.queue.n and self.idle:
            self.pump()
        else:
            if self.accounts:
                self._top_up()
            self.manage()
        self.on_change()

    def _become_idle(self, worker: Worker) -> None:
        self._set_state(worker, WorkerState.IDLE)
        worker.idle_since = self.clock.time()
        self.idle.append(worker)
        self._arm_idle_timer()

    def _kill(self, worker: Worker, reason: str) -> None:
        if worker.state in (WorkerState.KILLING, WorkerState.GONE):
            return
        if worker in self.idle:
            self.idle.remove(worker)
        self._set_state(worker, WorkerState.KILLING)
        worker.exit_reason = worker.exit_reason or reason
        self.launcher.kill(worker)

    def _retire(self, worker: Worker, reason: str) -> None:
        if worker in self.idle:
            self.idle.remove(worker)
        self._set_state(worker, WorkerState.DRAINING)
        worker.exit_reason = reason
        self.launcher.retire(worker)

    # -- sizing ----------------------------------------------------------------------------

    def live(self) -> int:
        c = self.counts
        return c[WorkerState.STARTING] + c[WorkerState.IDLE] + c[WorkerState.BUSY]

    def manage(self) -> None:
        """Keep ``cruise`` workers alive; grow toward ``max`` while requests wait."""
        if not self.accepting and not self.queue.n:
            return  # draining for shutdown: replace a worker only while queued requests still need one
        cfg = self.config
        c = self.counts
        live = c[WorkerState.STARTING] + c[WorkerState.IDLE] + c[WorkerState.BUSY]  # self.live(), inline: every call
        waiting = self.queue.n  # cancelled jobs leave the queue at once (drop_client)
        if live >= cfg.max or (live >= cfg.cruise and not waiting):
            return  # the steady states: nothing to decide
        starting = self.counts[WorkerState.STARTING]
        want = max(cfg.cruise - live, min(waiting - starting, cfg.max - live))
        if want <= 0:
            return
        if self.env is not None and not self.env.ready:
            return  # its code env is being built (or failed): envbuild calls manage() once it is ready
        now = self.clock.time()
        if now < self.next_spawn_at:
            if self._manage_timer is None:
                self._manage_timer = self.clock.call_at(self.next_spawn_at, self._manage_later)
            return
        # after a failure, probe with one worker at a time instead of a burst of doomed ones
        if self.failures:
            want = 1 if starting == 0 else 0
        for _ in range(want):
            self._spawn()

    def _manage_later(self) -> None:
        self._manage_timer = None
        self.manage()

    def _arm_idle_timer(self) -> None:
        if self._idle_timer is not None or self.live() <= self.config.cruise or not self.idle:
            return
        oldest = min(w.idle_since for w in self.idle)
        self._idle_timer = self.clock.call_at(oldest + self.config.idle_timeout, self._retire_idle)

    def _retire_idle(self) -> None:
        self._idle_timer = None
        now = self.clock.time()
        # idle[0] has been idle longest (LIFO stack)
        while self.live() > self.config.cruise and self.idle and now - self.idle[0].idle_since >= self.config.idle_timeout:
            self._retire(self.idle[0], "idle")
        self._arm_idle_timer()

    # -- code -------------------------------------------------------------------------------

    def register(self, key: bytes, define_frame: bytearray) -> None:
        """Keep a function's DEFINE frame (immutable from here on) for workers that lack it (daemon/core/codecache.py)."""
        self.code_cache.register(key, define_frame)

    # -- shutdown and status -------------------------------------------------------------------

    def stop_accepting(self) -> None:
        self.accepting = False
        self.refusal = (Status.SHUTTING_DOWN, "cruised is shutting down; not accepting new requests")
        # A map waiting for credit with nothing in flight would wait for good: one more credit
        # lets it send a call, whose answer (shutting down, or no such pool after a reload that
        # removed it) ends the map. (A reload that keeps the pool moved the accounts already.)
        for acct in self.accounts.values():
            acct.client.credit(self.name, 1)
        _cancel(self._manage_timer)
        self._manage_timer = None

    def set_draining(self, on: bool) -> None:
        """Refuse new calls with DRAINING (``cruised drain``), or take them again; queued, held and
        running calls are untouched, and workers stay warm. A pool that stopped accepting for good
        (shutdown, retired by a reload) keeps refusing with SHUTTING_DOWN."""
        if self.accepting:
            self.refusal = (Status.DRAINING, DRAINING_MESSAGE) if on else None

    def in_flight(self) -> tuple[int, int]:
        """(queued, running): calls admitted and not answered yet; held ones count as queued."""
        running = sum(1 for w in self.workers.values() if w.job is not None)
        return len(self.queue) + self.held_count, running

    def idle_now(self) -> bool:
        return not self.queue.n and all(w.job is None for w in self.workers.values())

    def abort_queue(self, message: str) -> None:
        self._aborted = message  # held jobs of workers that end from now on get the same answer
        for job in self.queue.clear():
            self._left(job)
            if not job.cancelled:
                self._finish(job, Status.SHUTTING_DOWN, message, "rejected")

    def terminate_all(self, reason: str = "shutdown") -> None:
        """End every worker: idle ones retire, busy or starting ones are killed (``reason`` for metrics)."""
        for w in list(self.workers.values()):
            if w.state == WorkerState.IDLE:
                self._retire(w, reason)
            elif w.state in (WorkerState.STARTING, WorkerState.BUSY):
                self._kill(w, reason)

    def ready(self) -> bool:
        if self.env is not None and not self.env.ready:
            return False
        warm = self.counts[WorkerState.IDLE] + self.counts[WorkerState.BUSY]
        if self.config.q is not None and self.config.q.required:
            # every warm worker connected, and at least min of them
            return warm >= self.config.min and self._report.q_connected() == warm
        return warm >= self.config.min

    def status(self) -> dict[str, Any]:
        """The pool's section of the status document (daemon/core/poolstatus.py)."""
        return self._report.document()


#: what a call sent to a draining daemon is refused with (every door words it from the DRAINING status)
DRAINING_MESSAGE = "cruised is draining (cruised drain): not accepting new requests; send them to another daemon or retry after `cruised ready`"


#: a worker's reply status -> the outcome counted for it
_OUTCOMES: dict[int, str] = {  # keyed by a reply's raw status
    Status.OK: "ok",
    Status.CUSTOM_RESPONSE: "ok",
    Status.ERROR: "error",
    Status.API_ERROR: "error",
    Status.UNKNOWN_FUNCTION: "unknown_function",
    Status.BAD_REQUEST: "bad_request",
    Status.BAD_ARGUMENTS: "bad_request",
    Status.ENDPOINT_UNAVAILABLE: "unavailable",
    Status.Q_UNAVAILABLE: "q_unavailable",
    Status.CANCELLED: "cancelled",  # the worker stopped a cancelled call (pool/interrupt.py)
}

NEVER_STARTED = "cancelled before it started; it never ran"

#: job kinds a worker can interrupt (pool/interrupt.py); a cancelled running job of another kind finishes
INTERRUPTIBLE = frozenset({frames.Kind.CALL, frames.Kind.ENDPOINT, frames.Kind.QCALL})


def _answered(job: Job) -> bool:
    return job.answered


def _cancel(handle: Any) -> None:
    if handle is not None:
        handle.cancel()


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
