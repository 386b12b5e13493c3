"""The supervisor: one process, one event loop, the single owner of all request state.

Data flow::

    client ──frames──> NativeServer/ClientConnection ─┐
    (HTTP door, kdb+ IPC door: same path)             │ Job
                                                      v
                               Dispatcher (per pool): admission ─> bounded FIFO queue
                                                      │  idle worker (LIFO)
                                                      v
                               PoolLauncher ──socketpair──> worker process (forked by
                                                      ^        the pool's template)
                                                      │ REPLY frame
    client <──same frame, reqid patched── ClientConnection <┘

Ownership and invariants
    Only this process holds the queues, the worker tables and every deadline
    (monotonic ``loop.time()``). Workers never see clients. Payload bytes
    (pickled functions and arguments) are opaque here: they are forwarded,
    never unpickled, so a hostile pickle can at worst kill a worker.

Signals
    Handlers only record the signal; ``_signal_loop`` acts on it. SIGTERM or
    SIGINT: graceful stop (stop listening, refuse new work with "shutting
    down", let queued and running calls finish up to ``shutdown_grace``, stop
    the workers, reap everything, remove the socket). A second one: fast path.
    SIGHUP: reload.

Workers are started by a per-pool template process (a fresh interpreter
acting as a preloaded forkserver), never by forking this process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import Any, Callable, Coroutine

from . import __version__
from .config import Config
from .dispatch import Dispatcher
from .launcher import PoolLauncher
from .server import NativeServer, bind_unix

log = logging.getLogger("cruised.supervisor")


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


class LoopClock:
    """The dispatcher's Clock port on the running loop (monotonic).

    ``time()`` reads CLOCK_MONOTONIC directly, the clock both asyncio's and
    uvloop's timers are based on: uvloop's ``loop.time()`` only has
    millisecond resolution, which would quantise queue and execution times.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def time(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        return self.loop.call_at(when, callback, *args)


class Pool:
    """A dispatcher and its launcher, wired together."""

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, config: Config) -> None:
        pool_cfg = config.pools[name]
        self.name = name
        self.launcher = PoolLauncher(loop, name, pool_cfg, config.daemon)
        self.dispatcher = Dispatcher(name, pool_cfg, LoopClock(loop), self.launcher)
        self.launcher.dispatcher = self.dispatcher


class Supervisor:
    def __init__(self, config: Config, socket_path: str) -> None:
        self.config = config
        self.socket_path = socket_path
        self.loop = asyncio.get_running_loop()
        self.pools: dict[str, Pool] = {}
        self.native: NativeServer | None = None
        self.started = time.time()
        self.state = "starting"
        self._signals: asyncio.Queue[int] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._fast = False
        self.ready = asyncio.Event()

    # -- lookups used by the front doors ---------------------------------------

    def dispatcher(self, pool: str) -> Dispatcher | None:
        p = self.pools.get(pool)
        return p.dispatcher if p is not None else None

    def all_dispatchers(self) -> list[Dispatcher]:
        return [p.dispatcher for p in self.pools.values()]

    def no_such_pool(self, pool: str) -> str:
        return f"no pool named {pool!r} (configured: {', '.join(sorted(self.pools))})"

    def request_reload(self, done: Callable[[bool, str], None]) -> None:
        done(False, "reload is not supported by this build")

    # -- lifecycle ---------------------------------------------------------------

    async def run(self) -> int:
        sock = bind_unix(self.socket_path, self.config.daemon.socket_mode)
        for name in self.config.pools:
            pool = Pool(self.loop, name, self.config)
            pool.dispatcher.on_change = self._check_ready
            self.pools[name] = pool
        self.native = NativeServer(self, sock, self.socket_path)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self.loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        log.info("cruised %s listening on %s (pid %s, python %s)", __version__, self.socket_path, _pid(), sys.version.split()[0])
        log.info("event loop: %s", type(self.loop).__module__)
        for pool in self.pools.values():
            pool.launcher.start_template()
            pool.dispatcher.manage()
        self._check_ready()
        signals = asyncio.create_task(self._signal_loop())
        try:
            await self._stop.wait()
            await self._shutdown()
        finally:
            signals.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.loop.remove_signal_handler(sig)
        return 0

    def _check_ready(self) -> None:
        if not self.ready.is_set() and all(p.dispatcher.ready() for p in self.pools.values()):
            self.ready.set()
            self.state = "ready"
            log.info("ready: %s", self.summary())

    async def _signal_loop(self) -> None:
        while True:
            sig = await self._signals.get()
            if sig in (signal.SIGTERM, signal.SIGINT):
                if self._stop.is_set():
                    log.warning("second %s: fast shutdown", signal.Signals(sig).name)
                    self._fast = True
                else:
                    log.info("%s: shutting down gracefully (grace %ss)", signal.Signals(sig).name, self.config.daemon.shutdown_grace)
                    self._stop.set()
            elif sig == signal.SIGHUP:
                self.request_reload(lambda ok, msg: log.log(logging.INFO if ok else logging.ERROR, "reload: %s", msg))

    def stop(self) -> None:
        self._stop.set()

    async def _shutdown(self) -> None:
        self.state = "stopping"
        if self.native is not None:
            self.native.stop_listening()
        dispatchers = self.all_dispatchers()
        for d in dispatchers:
            d.stop_accepting()
        deadline = self.loop.time() + self.config.daemon.shutdown_grace
        while not self._fast and self.loop.time() < deadline and not all(d.idle_now() for d in dispatchers):
            await asyncio.sleep(0.02)
        for d in dispatchers:
            d.abort_queue("cruised is shutting down; the request was not run")
            d.terminate_all()
        kill_deadline = self.loop.time() + self.config.daemon.kill_grace + 1.0
        while self.loop.time() < kill_deadline and any(p.launcher.worker_count() for p in self.pools.values()):
            await asyncio.sleep(0.02)
        for p in self.pools.values():
            p.launcher.close()
        for p in self.pools.values():
            await p.launcher.wait_template(2.0)
        if self.native is not None:
            self.native.close_all()
            # let the last replies leave before the loop goes away
            end = self.loop.time() + 1.0
            while self.native.connections and self.loop.time() < end:
                await asyncio.sleep(0.01)
        log.info("stopped")

    # -- reporting ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": _pid(),
            "state": self.state,
            "uptime_s": round(time.time() - self.started, 3),
            "socket": self.socket_path,
            "pools": {name: p.dispatcher.status() for name, p in self.pools.items()},
        }

    def summary(self) -> str:
        parts = []
        for name, p in self.pools.items():
            st = p.dispatcher.status()
            w = st["workers"]
            parts.append(f"{name}: {w['idle']} idle {w['busy']} busy {w['starting']} starting, queue {st['queue']['depth']}/{st['queue']['capacity']}")
        return "; ".join(parts)


def _pid() -> int:
    import os

    return os.getpid()
