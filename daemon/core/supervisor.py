"""The supervisor: one process, one event loop, the single owner of all request state.

Data flow (paths from the repository root; daemon/ is the ``cruised`` package, pool/ is ``cruised.pool``)::

    native client ──frames──> NativeServer / ClientConnection   daemon/doors/native.py ─┐
    remote client ─mTLS frames─> RemoteDoor / RemoteConnection  daemon/doors/remote.py ─┤
    HTTP client ──requests──> HttpDoor (aiohttp + fast path)    daemon/doors/http/ ─────┤
    q, pykx ─────kdb+ IPC───> QipcDoor / QConnection            daemon/doors/qipc/ ─────┤
        each door sees the daemon only through DoorHost (daemon/doors/host.py),         │
        which this Supervisor implements: host.dispatcher(pool) reads the serving       │ Job
        Generation (daemon/core/generation.py: config + pools, swapped by install)      │
                                                                                        v
    Dispatcher, one per pool (daemon/core/dispatch.py): admission (the caller's share, credit
        reserved for pipelined callers) ─> bounded fair queue (daemon/core/fairness.py: start-time
        fair queueing across callers, FIFO within one), deadlines; an idle worker (LIFO), or held
        behind a busy one (prefetch)
        │ DEFINE frame first if the worker lacks the function (daemon/core/codecache.py)
        v
    PoolLauncher (daemon/core/launcher.py) ── Channel (daemon/core/channel.py) over a socketpair ──>
        worker process (pool/worker.py; forked by the pool's template, pool/template.py)
        │ REPLY frame
        v
    Dispatcher.on_worker_reply ─> job.sink: the door writes the same frame back, reqid patched
        └─> AnsweredFeed (daemon/core/observers.py), in batches ─> Metrics (daemon/ops/metrics.py),
            AccessLog (daemon/ops/logs.py); status documents: daemon/core/poolstatus.py

Ownership and invariants
    Only this process holds the queues, the worker tables and every deadline
    (monotonic ``loop.time()``). Workers never see clients. Payload bytes
    (pickled functions and arguments) are opaque here: they are forwarded,
    never unpickled, so a hostile pickle can at worst kill a worker. The
    serving generation changes only in ``install`` (one synchronous step);
    pools still warming or draining belong to the reloader, and
    ``all_pools`` counts them so that a shutdown stops every process.

Signals
    Handlers only record the signal; ``_signal_loop`` acts on it. SIGTERM or
    SIGINT: graceful stop (stop listening, refuse new work with "shutting
    down", let queued and running calls finish up to ``shutdown_grace``, stop
    the workers, reap everything, remove the socket). A second one: fast path.
    SIGHUP: reload (daemon/core/reload.py: a new generation of pools is warmed and
    swapped in; the old one finishes what it holds, then exits).

Drain (``cruised drain`` / ``cruised ready``, the DRAIN frame)
    ``set_draining`` flips one flag here and in every serving and warming
    dispatcher (``Dispatcher.set_draining``): new calls on every door are
    refused with DRAINING, queued and running ones finish, workers stay warm,
    /readyz answers 503 and the HAProxy agent (daemon/ops/haproxy_agent.py)
    ``drain``. The flag outlives a reload (``_build`` applies it to each new
    generation) and is undone only by ``cruised ready``; SIGTERM during a
    drain shuts down as always. ``drain --linger S`` splits the two halves:
    /readyz and the agent say so at once, but the dispatchers go on taking
    calls for S more seconds, for load balancers and endpoint controllers
    that take that long to stop sending (Kubernetes removes a pod from its
    Service while the preStop hook already runs).

Cancel (the CANCEL frame, a departed client)
    A client withdraws a call with CANCEL (Ctrl-C, ``Future.cancel()``, a
    stopped ``map``, a cancelled asyncio task); a door whose client leaves
    calls ``drop_client``. The call's dispatcher owns the rest
    (daemon/core/dispatch.py "Cancelling"): out of the queue, off a worker's
    hold list through its cancel board (pool/interrupt.py), or SIGINT into a
    running function and a kill after ``cancel_grace``; one answer, CANCELLED.

Operations
    Metrics (daemon/ops/metrics.py) and the access log (daemon/ops/logs.py) are
    dispatcher observers attached to every pool; ``render_metrics`` serves
    /metrics and the METRICS frame. systemd (daemon/ops/systemd.py): the native
    socket may be inherited (LISTEN_FDS) instead of bound; READY=1 once every
    pool is ready, STATUS= on changes, WATCHDOG=1 from this loop, STOPPING=1
    when shutdown starts, RELOADING=1/READY=1 through ``notify_reloading`` and
    ``notify_ready``.

Workers are started by a per-pool template process (a fresh interpreter
acting as a preloaded forkserver), never by forking this process.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from cruised import __version__
from cruised.client import paths
from cruised.config import Config
from cruised.core import envbuild, services
from cruised.core.dispatch import Dispatcher
from cruised.core.generation import Generation, Pool
from cruised.core.reload import Reloader
from cruised.doors.native import NativeServer
from cruised.doors.sockets import bind_unix
from cruised.ops import systemd
from cruised.ops.logs import AccessLog
from cruised.ops.metrics import Metrics
from cruised.pool import heap

if TYPE_CHECKING:
    from cruised.doors.http.app import HttpDoor
    from cruised.doors.qipc.door import QipcDoor
    from cruised.doors.remote import RemoteDoor
    from cruised.ops.haproxy_agent import HaproxyAgent

log = logging.getLogger("cruised.supervisor")

#: seconds between returns of freed heap to the kernel (see Supervisor._trim_heap)
TRIM_EVERY = 30.0


def raise_fd_limit() -> tuple[int, int]:
    """(before, after): the soft open-file limit raised to the hard one.

    Every call waiting in a queue with a shared file (pool/wire/sharedfile.py)
    holds one descriptor here, on top of one per client and three per worker;
    a soft limit of 1024 (a shell's default) would cap the daemon well below
    what ``queue_size`` and ``max_connections`` allow. The systemd unit sets
    ``LimitNOFILE`` too. Should descriptors still run out, the kernel drops
    passed ones and the client's connection is closed with that reason.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return soft, want
        except (ValueError, OSError):
            pass
    return soft, soft


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the supervisor on uvloop when it is importable, else on asyncio's own loop.

    uvloop runs the loop machinery (epoll, ready queue, timers) in C: on the
    2-core reference VM it cut the supervisor's CPU per call by 44% (sync)
    and 30% (pipelined) and sync p50 by 26% (bench/hotpath.py, interleaved
    A/B). ``CRUISED_LOOP=asyncio`` forces the standard loop (debugging).
    """
    if os.environ.get("CRUISED_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


class Supervisor:
    """Owns the pools, the doors, signals and the lifecycle; implements ``DoorHost`` for the doors."""

    def __init__(self, config: Config, socket_path: str, config_path: str | None = None, dev: bool = False) -> None:
        self.socket_path = socket_path
        self.config_path = config_path  # re-read by a reload
        self.dev = dev  # `serve --dev`: reload when the config or endpoint code changes
        self.loop = asyncio.get_running_loop()
        #: pools still warming or draining belong to the reloader (``all_pools`` counts them)
        self.reloader = Reloader(self)
        self.native: NativeServer | None = None
        self.http: HttpDoor | None = None  # imported only when enabled
        self.qipc: QipcDoor | None = None  # the kdb+ IPC door, only when qipc.listen is set
        self.remote: RemoteDoor | None = None  # the mutual-TLS native door, only when remote.listen is set
        self.started = time.time()
        self.state = "starting"
        #: ``cruised drain`` in force (see "Drain" above); read by ``_build``, so set before generation 1
        self.draining = False
        #: the dispatchers refuse new calls (a drain, once its linger is over); read by ``_build`` too
        self.refusing = False
        self._linger: asyncio.TimerHandle | None = None
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._fast = False
        self.ready = asyncio.Event()
        self.metrics = Metrics(lambda: self._serving.dispatchers, caller_labels=config.metrics.caller_labels, top_callers=config.metrics.top_callers)
        self.access_log = AccessLog(call_later=self.loop.call_later) if config.daemon.access_log else None
        self.notifier: systemd.Notifier | None = None
        self.agent: HaproxyAgent | None = None  # the HAProxy agent-check listener, only when health.agent is set
        #: sockets passed by systemd that the native door did not take, by name (for the other doors)
        self.activated: dict[str, socket.socket] = {}
        self._signal_task: asyncio.Task[None] | None = None
        #: the generation every new call goes to; replaced only by ``install``. Generation 1 is
        #: built here like every reload's (no process starts before ``run``)
        self._serving: Generation = self._build(config, None)

    # -- generations ---------------------------------------------------------------

    @property
    def serving(self) -> Generation:
        """The generation new calls go to."""
        return self._serving

    @property
    def config(self) -> Config:
        """The serving generation's config (DoorHost)."""
        return self._serving.config

    def new_generation(self, config: Config) -> Generation:
        """The next generation, built from ``config`` and wired to this supervisor, not started (a reload's first step)."""
        return self._build(config, self._serving)

    def _build(self, config: Config, previous: Generation | None) -> Generation:
        """The one way pools are built, for generation 1 and every reload's: readiness, metrics and the access log watch them."""
        gen = Generation.build(self.loop, config, previous)
        for pool in gen.pools.values():
            pool.dispatcher.on_change = self._check_ready
            self._attach_observers(pool)
            if self.refusing:  # a reload during a drain: the new pools refuse new calls too
                pool.dispatcher.set_draining(True)
        return gen

    def install(self, gen: Generation) -> Generation:
        """Serve ``gen`` from now on; return the generation it replaces.

        One synchronous step on the loop, so no call sees half of it: ``gen``
        takes over the functions shipped to the serving pools, the doors'
        lookups (``dispatcher``, ``config``) answer from ``gen`` for every call
        after this one, and the replaced generation accepts nothing new. Its
        queued and running calls still finish there: draining it is the
        caller's (core/reload.py), and ``all_pools`` must count it until then.
        """
        old = self._serving
        if gen is old:
            raise ValueError(f"generation {gen.number} is already serving")
        gen.take_over(old)
        self._serving = gen
        old.stop_accepting()
        return old

    # -- lookups used by the front doors ---------------------------------------

    def dispatcher(self, pool: str) -> Dispatcher | None:
        return self._serving.dispatchers.get(pool)

    def all_pools(self) -> list[Pool]:
        """Serving, warming and retiring pools: everything that has processes."""
        return [*self._serving.pools.values(), *self.reloader.warming, *self.reloader.retiring]

    def all_dispatchers(self) -> list[Dispatcher]:
        return [p.dispatcher for p in self.all_pools()]

    def no_such_pool(self, pool: str) -> str:
        return f"no pool named {pool!r} (configured: {', '.join(sorted(self._serving.pools))})"

    def request_reload(self, done: Callable[[bool, str], None]) -> None:
        self.reloader.request(done)

    def pool_status(self) -> dict[str, dict[str, Any]]:
        return {name: d.status() for name, d in self._serving.dispatchers.items()}

    def readiness(self) -> list[str]:
        if self.state == "stopping":
            return ["shutting down"]
        draining = ["draining (cruised drain): not taking new calls until cruised ready"] if self.draining else []
        return draining + services.readiness(self.config, self._serving.dispatchers)

    # -- drain -------------------------------------------------------------------

    def set_draining(self, on: bool, linger: float = 0.0) -> None:
        """Refuse new calls on every door (True) or take them again (False); see "Drain" above.

        ``linger`` seconds (a drain only): advertise the drain (/readyz 503, the agent's ``drain``)
        at once but take new calls until they pass. A drain already refusing never goes back to
        taking calls; a second drain replaces a pending linger (0: refuse now)."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if on != self.draining:
            log.info("%s", "drain: not ready; queued and running calls finish" if on else "ready: taking new calls again")
        self.draining = on
        self.metrics.draining.set(1 if on else 0)  # systemd's STATUS= shows it at its next refresh (_status_line)
        if on and linger > 0 and not self.refusing:
            log.info("drain: taking new calls for %.3gs more (--linger), then refusing them", linger)
            self._linger = self.loop.call_later(linger, self._refuse, True)
        else:
            self._refuse(on)

    def _refuse(self, on: bool) -> None:
        """Every serving and warming dispatcher refuses new calls with DRAINING (True), or takes them."""
        self._linger = None
        if on and not self.refusing:
            log.info("drain: refusing new calls")
        self.refusing = on
        for pool in (*self._serving.pools.values(), *self.reloader.warming):
            pool.dispatcher.set_draining(on)

    def drain_report(self) -> dict[str, Any]:
        """``{"draining", "state", "queued", "running"}`` over every pool (retiring ones too): what ``drain --wait`` polls."""
        queued = running = 0
        for d in self.all_dispatchers():
            q, r = d.in_flight()
            queued += q
            running += r
        # "drained" only once new calls are refused: while a linger lasts, more may still come
        state = "serving" if not self.draining else ("drained" if self.refusing and queued + running == 0 else "draining")
        report: dict[str, Any] = {"draining": self.draining, "state": state, "queued": queued, "running": running}
        report["accepting"] = not self.refusing
        return report

    def drain(self, on: bool | None, linger: float = 0.0) -> dict[str, Any]:
        """The DRAIN frame (DoorHost): start or end a drain (``linger``: see ``set_draining``), or only report (``on`` None)."""
        if on is not None:
            self.set_draining(on, linger)
        return self.drain_report()

    def auth_failed(self, door: str) -> None:
        self.metrics.auth_failed(door)

    # -- lifecycle ---------------------------------------------------------------

    async def run(self) -> int:
        self.notifier = systemd.Notifier.from_environment(self._status_line, self._healthy)
        sock, owned_path = self._native_listener()
        systemd.clear_environment()  # before any template starts: children must not inherit them
        self.native = NativeServer(self, sock, owned_path)
        await self._open_doors()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            self.loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        log.info("cruised %s listening on %s (pid %s, python %s)", __version__, self.socket_path, _pid(), sys.version.split()[0])
        log.info("event loop: %s", type(self.loop).__module__)
        self._serving.start()
        self._check_ready()
        signals = self._signal_task = asyncio.create_task(self._signal_loop())
        self.notifier.start(self.loop)
        ready = asyncio.create_task(self._notify_when_ready())
        watcher = None
        if self.dev:
            from cruised.core.devwatch import watch

            watcher = asyncio.create_task(watch(self))
        heap.keep_large_buffers_warm()
        before, after = raise_fd_limit()
        if after != before:
            log.info("open-file limit raised from %d to %d (queued calls with shared files hold descriptors)", before, after)
        self._trimmer = self.loop.call_later(TRIM_EVERY, self._trim_heap)
        try:
            await self._stop.wait()
            await self._shutdown()
        finally:
            signals.cancel()
            if watcher is not None:
                watcher.cancel()
            ready.cancel()
            self._trimmer.cancel()
            self.notifier.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                self.loop.remove_signal_handler(sig)
        return 0

    async def _open_doors(self) -> None:
        """The doors besides the native one, each set here once it listens; if one cannot start, the
        ones already open (the native door too) are closed and its error raised."""
        assert self.native is not None
        try:
            if self.config.http.enabled:
                from cruised.doors.http.app import HttpDoor

                http = HttpDoor(self, paths.default_http_socket(self.socket_path, self.config.http.socket))
                await http.start()
                self.http = http
            if self.config.health.agent:
                from cruised.ops.haproxy_agent import HaproxyAgent

                agent = HaproxyAgent(self)
                await agent.start()
                self.agent = agent
            if self.config.qipc.listen:
                from cruised.doors.qipc.door import QipcDoor

                qipc = QipcDoor(self)
                await qipc.start()
                self.qipc = qipc
            if self.config.remote.listen:
                from cruised.doors.remote import RemoteDoor

                remote = RemoteDoor(self)
                await remote.start()
                self.remote = remote
        except BaseException:
            self.native.stop_listening()
            if self.http is not None:
                await self.http.close()
            if self.agent is not None:
                self.agent.close()
            if self.qipc is not None:
                await self.qipc.close()
            raise

    def _native_listener(self) -> tuple[socket.socket, str | None]:
        """The native door's listening socket and the path to remove at exit.

        Socket activation (systemd's LISTEN_FDS) wins over binding: the socket
        unit owns that file, so it is neither replaced nor removed here, and
        connections made while the daemon restarts wait in its backlog.
        """
        inherited = systemd.activated_sockets()
        if inherited is None:
            return bind_unix(self.socket_path, self.config.daemon.socket_mode), self.socket_path
        sock, self.socket_path, self.activated = inherited
        return sock, None

    def _attach_observers(self, pool: Pool) -> None:
        """Metrics and the access log watch this pool's requests and worker exits (call for every new pool)."""
        self.metrics.attach(pool.dispatcher)
        if self.access_log is not None:
            pool.dispatcher.observers.append(self.access_log)

    async def _notify_when_ready(self) -> None:
        await self.ready.wait()
        if self.notifier is not None and not self._stop.is_set():
            self.notifier.ready()

    def _status_line(self) -> str:
        """systemd's STATUS=: the pool summary, plus why a pool cannot start (what `systemctl status` should show)."""
        errors = [f"{name}: {d.last_error}" for name, d in self._serving.dispatchers.items() if d.last_error]
        building = envbuild.status_note(p.launcher for p in self.all_pools())  # "; pool x building env (12s): ..."
        draining = "; draining (cruised drain)" if self.draining else ""
        return self.summary() + draining + building + (f"; last error {'; '.join(errors)}" if errors else "")

    def _healthy(self) -> bool:
        """Worth a watchdog ping: the loop runs (we are in it) and still reacts to signals."""
        task = self._signal_task
        return task is not None and not task.done()

    def notify_reloading(self) -> None:
        """A reload starts: systemd shows the unit as reloading until ``notify_ready``."""
        if self.notifier is not None:
            self.notifier.reloading()

    def notify_ready(self) -> None:
        """A reload finished (or failed and the old pools keep serving): READY=1 again."""
        if self.notifier is not None:
            self.notifier.ready()

    def render_metrics(self) -> bytes:
        """Prometheus text exposition (GET /metrics and the METRICS frame): every request answered
        before the scrape is counted."""
        for d in self.all_dispatchers():
            d.flush_answered()
        return self.metrics.render()

    def _check_ready(self) -> None:
        pools = self._serving.pools
        for pool in pools.values():
            services.log_new_failures(pool)
        if not self.ready.is_set() and all(p.dispatcher.ready() for p in pools.values() if envbuild.required(p.dispatcher.config)):
            self.ready.set()
            self.state = "ready"
            # Everything built so far (imports, config, pools, doors) lives as long as the daemon:
            # out of the collector's sight, a full collection walks only what requests create.
            gc.freeze()
            log.info("ready: %s", self.summary())

    async def _signal_loop(self) -> None:
        while True:
            sig = await self._signals.get()
            if sig in (signal.SIGTERM, signal.SIGINT):
                if self._stop.is_set():
                    log.warning("second %s: fast shutdown", signal.Signals(sig).name)
                    self._fast = True
                else:
                    self._stop_taking_calls()
                    log.info("%s: shutting down gracefully (grace %ss)", signal.Signals(sig).name, self.config.daemon.shutdown_grace)
                    self._stop.set()
            elif sig == signal.SIGHUP:
                self.request_reload(lambda ok, msg: log.log(logging.INFO if ok else logging.ERROR, "reload: %s", msg))
            elif sig == signal.SIGUSR1:
                log_memory()

    def stop(self) -> None:
        self._stop_taking_calls()
        self._stop.set()

    def _stop_taking_calls(self) -> None:
        """From this moment every door refuses new calls (SHUTTING_DOWN). Synchronous, at the
        signal, not when ``_shutdown`` gets to run: a call that arrives in between (the listeners'
        closing awaits) would be admitted behind work that may never finish within the grace."""
        if self._linger is not None:  # stopping refuses new calls by itself
            self._linger.cancel()
            self._linger = None
        for d in self.all_dispatchers():
            d.stop_accepting()

    def _trim_heap(self) -> None:
        """Hand freed heap pages back to the kernel (glibc keeps them otherwise).

        Every request allocates and frees frame buffers of very different sizes;
        under churn glibc retained ~25 MB of freed heap in a few minutes of soak
        (bench/soak.py), which read as RSS growth although the live objects
        were flat (SIGUSR1's counts). A trim costs well under a millisecond.
        """
        heap.trim()
        self._trimmer = self.loop.call_later(TRIM_EVERY, self._trim_heap)

    async def _shutdown(self) -> None:
        self.state = "stopping"
        self.reloader.cancel()
        self._stop_taking_calls()  # again: a reload may have installed pools since the signal
        if self.notifier is not None:
            self.notifier.stopping_now()
        if self.native is not None:
            self.native.stop_listening()
        if self.http is not None:
            await self.http.stop_listening()
        if self.qipc is not None:
            self.qipc.stop_listening()
        if self.remote is not None:
            self.remote.stop_listening()
        dispatchers = self.all_dispatchers()
        deadline = self.loop.time() + self.config.daemon.shutdown_grace
        while not self._fast and self.loop.time() < deadline and not all(d.idle_now() for d in dispatchers):
            await asyncio.sleep(0.02)
        for d in dispatchers:
            d.abort_queue("cruised is shutting down; the request was not run")
            d.terminate_all()
        kill_deadline = self.loop.time() + self.config.daemon.kill_grace + 1.0
        while self.loop.time() < kill_deadline and any(p.launcher.worker_count() for p in self.all_pools()):
            await asyncio.sleep(0.02)
        for p in self.all_pools():
            p.launcher.close()
        for p in self.all_pools():
            await p.launcher.wait_template(2.0)
        if self.http is not None:
            await self.http.close()
        if self.qipc is not None:
            await self.qipc.close()
        if self.agent is not None:
            self.agent.close()  # it answered "down" since shutdown began
        if self.native is not None:
            self.native.close_all()
            # let the last replies leave before the loop goes away
            end = self.loop.time() + 1.0
            while self.native.connections and self.loop.time() < end:
                await asyncio.sleep(0.01)
        if self.remote is not None:
            self.remote.close_all()
            end = self.loop.time() + 1.0
            while self.remote.connections and self.loop.time() < end:
                await asyncio.sleep(0.01)
        for d in self.all_dispatchers():
            d.flush_answered()  # the last access lines, before the loop (and its timers) goes
        log.info("stopped")

    # -- reporting ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": _pid(),
            "state": self.state,
            "uptime_s": round(time.time() - self.started, 3),
            "socket": self.socket_path,
            "generation": self._serving.number,
            "http": self.http.describe() if self.http is not None else None,
            "qipc": self.qipc.describe() if self.qipc is not None else None,
            "remote": self.remote.describe() if self.remote is not None else None,
            "agent": self.agent.describe() if self.agent is not None else None,
            "draining": self.draining,
            "drain": self.drain_report(),
            "pools": self.pool_status(),
            "retiring_pools": len(self.reloader.retiring),
            "services": services.describe(self.config, self._serving.dispatchers),
        }

    def summary(self) -> str:
        parts = []
        for name, d in self._serving.dispatchers.items():
            st = d.status()
            w = st["workers"]
            parts.append(f"{name}: {w['idle']} idle {w['busy']} busy {w['starting']} starting, queue {st['queue']['depth']}/{st['queue']['capacity']}")
        return "; ".join(parts)


def _pid() -> int:
    import os

    return os.getpid()


def log_memory(top: int = 15) -> None:
    """SIGUSR1: one log line with the supervisor's most numerous object types (leak hunting).

    With ``python -X tracemalloc``, a second line gives the top allocation sites too.
    """
    import gc
    import tracemalloc
    from collections import Counter

    counts = Counter(type(o).__name__ for o in gc.get_objects())
    log.info("memory: %d objects; top types: %s", sum(counts.values()), ", ".join(f"{n}={c}" for n, c in counts.most_common(top)))
    before = _rss_kib()  # glibc keeps freed heap pages; trimming shows how much RSS is retained rather than live
    heap.trim()
    log.info("memory: rss %d KiB, %d KiB after malloc_trim", before, _rss_kib())
    if tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().statistics("lineno")[:top]
        log.info(
            "memory: top allocation sites: %s",
            "; ".join(f"{s.traceback[0].filename.rsplit('/', 1)[-1]}:{s.traceback[0].lineno}={s.size // 1024}KiB" for s in stats),
        )


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0
