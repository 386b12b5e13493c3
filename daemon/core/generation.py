"""A generation: one config and the pools built from it, served together.

The supervisor serves exactly one generation at a time. Generation 1 is built
when the supervisor is created; a reload (daemon/core/reload.py) builds
generation N+1 from the re-read config through the same
``Supervisor.new_generation`` (so both are wired alike: readiness, metrics,
the access log), warms it, and the supervisor swaps it in with
``Supervisor.install``. Building starts no process: ``start`` does.

Across generations of the same pool name, two things carry over:

* worker numbers: a pool's dispatcher shares its predecessor's counter, so a
  worker id (``<pool>-<n>``) names one process in the log even while both
  generations run;
* shipped functions: at the swap (``take_over``) the new pools register the
  DEFINE frames the old ones hold, so no client has to register again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

from cruised.config import Config
from cruised.core import services
from cruised.core.dispatch import Dispatcher
from cruised.core.launcher import PoolLauncher


class LoopClock:
    """The dispatcher's Clock port on the running loop (monotonic).

    ``time()`` reads CLOCK_MONOTONIC directly, the clock both asyncio's and
    uvloop's timers are based on: uvloop's ``loop.time()`` only has
    millisecond resolution, which would quantise queue and execution times.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    #: the C function itself, no Python frame around it: the dispatcher reads it ~4 times a call
    time = staticmethod(time.monotonic)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> asyncio.TimerHandle:
        return self.loop.call_at(when, callback, *args)


class Pool:
    """A dispatcher and its launcher, wired together.

    ``worker_ids``: the worker numbering to continue (the same pool's in the
    previous generation); a new one starts at 1.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, config: Config, worker_ids: Iterator[int] | None = None) -> None:
        pool_cfg = config.pools[name]
        self.name = name
        self.launcher = PoolLauncher(loop, name, pool_cfg, config.daemon)
        self.dispatcher = Dispatcher(name, pool_cfg, LoopClock(loop), self.launcher, worker_ids=worker_ids)
        self.launcher.dispatcher = self.dispatcher
        self.dispatcher.env = self.launcher.env  # a code env to build first (core/envbuild.py), or None
        self.launcher.endpoints = services.worker_specs(config, name)
        self.failed_endpoints: set[str] = set()  # already logged as failing to load
        if config.qipc.listen:
            self.launcher.warm_modules = ["pykx"]  # q calls need it: import it once, in the template


class Generation:
    """``number``, the ``config`` it was built from, and its ``pools`` by name (fixed once built)."""

    __slots__ = ("config", "dispatchers", "number", "pools")

    def __init__(self, number: int, config: Config, pools: dict[str, Pool]) -> None:
        self.number = number
        self.config = config
        self.pools = pools
        #: the pools' dispatchers by name: what the doors look up on every request, one dict read
        self.dispatchers: dict[str, Dispatcher] = {name: p.dispatcher for name, p in pools.items()}

    @classmethod
    def build(cls, loop: asyncio.AbstractEventLoop, config: Config, previous: Generation | None) -> Generation:
        """Every pool ``config`` names, built but not started, numbered after ``previous`` (1 without one).

        A pool that ``previous`` has too continues its worker numbering.
        """
        pools: dict[str, Pool] = {}
        for name in config.pools:
            before = previous.pools.get(name) if previous is not None else None
            pools[name] = Pool(loop, name, config, worker_ids=before.dispatcher.worker_ids if before is not None else None)
        return cls(previous.number + 1 if previous is not None else 1, config, pools)

    def start(self) -> None:
        """Start every pool's template and its first workers (``min``, then as the pools decide)."""
        for pool in self.pools.values():
            pool.launcher.start_template()
            pool.dispatcher.manage()

    def take_over(self, previous: Generation) -> None:
        """At the swap: the functions shipped to ``previous``'s pools stay registered with their namesakes here.

        Same frames, so a client that registered with the old generation calls
        the new one without registering again. Part of ``Supervisor.install``'s
        synchronous step: no REGISTER can land on the old pools after it.
        """
        for name, pool in self.pools.items():
            old = previous.pools.get(name)
            if old is not None:
                pool.dispatcher.code_cache.carry_over(old.dispatcher.code_cache)

    def stop_accepting(self) -> None:
        """Refuse new calls in every pool; what they hold already still runs."""
        for pool in self.pools.values():
            pool.dispatcher.stop_accepting()
