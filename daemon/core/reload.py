"""Hot reload: a new generation of pools is warmed, swapped in, and the old one drains.

Triggered by SIGHUP, ``cruised reload`` (a RELOAD frame) or ``serve --dev``
when a watched file changes. One reload runs at a time.

Steps::

    re-read the config file ----------- invalid: report, keep serving (nothing started)
    build the next generation (Supervisor.new_generation, as generation 1 was
    built: every pool anew, Dispatcher + PoolLauncher, a fresh template, so
    libraries, init files and endpoint code are all read again)
    wait until each pool has ``min`` warm workers and every endpoint loaded
        \\-- a worker fails to start, an endpoint's code fails to load, or the
            start deadline passes: tear the new pools down, keep serving, report
    swap (Supervisor.install, one synchronous step on the loop): the doors'
    pool lookups and config now answer from the new generation, so every NEW
    call goes there; shipped-function code registered with the old pools is
    carried over, so clients need not register again
    old pools: accept nothing new; their queued and running calls finish
    there, then their workers retire and their template closes

Because the swap happens only once the new generation is warm, and nothing
already admitted is moved or dropped, a steady load sees no failed request
across a reload. Every pool is rebuilt, even an unchanged one: its libraries,
init file or code may have changed on disk, and a generation is one
consistent snapshot (as on a DSS API node).

Settings that belong to listening sockets (``daemon.socket``, ``http.*``
addresses, ``health.agent``) are not re-bound: a change there is logged and needs a restart.
API keys, services and endpoints take effect with the swap.

Ownership: the supervisor owns the serving generation and changes it only
through ``install``; the reloader owns the pools in transition (``warming``,
``retiring``), which the supervisor counts as having processes
(``Supervisor.all_pools``) so that a shutdown stops them too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from cruised import config as config_mod
from cruised.config import Config, ConfigErrors
from cruised.core import envbuild

if TYPE_CHECKING:
    from cruised.core.generation import Pool
    from cruised.core.supervisor import Supervisor

log = logging.getLogger("cruised.reload")

#: beyond the slowest pool's start_timeout, how long the new generation may take to be ready
READY_MARGIN = 5.0
POLL = 0.02


class Reloader:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.task: asyncio.Task[None] | None = None
        self.drains: set[asyncio.Task[None]] = set()
        #: the next generation's pools while they warm (not serving yet)
        self.warming: list[Pool] = []
        #: pools that take no new calls: replaced by a swap, or of a generation that failed to
        #: start, finishing what they hold; each leaves the list once its processes are gone
        self.retiring: list[Pool] = []

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def request(self, done: Callable[[bool, str], None]) -> None:
        """Start a reload; ``done(ok, message)`` is called when it has succeeded or failed."""
        if self.sup.state == "stopping":
            done(False, "cruised is shutting down")
            return
        if self.busy:
            done(False, "a reload is already in progress; try again once it has finished")
            return
        self.task = asyncio.get_running_loop().create_task(self._run(done))

    async def _run(self, done: Callable[[bool, str], None]) -> None:
        self.sup.notify_reloading()
        try:
            ok, message = await self.reload()
        except asyncio.CancelledError:
            ok, message = False, "cruised is shutting down"
        except Exception as exc:
            log.exception("reload failed with an internal error")
            ok, message = False, f"internal error: {type(exc).__name__}: {exc}"
        if ok:
            log.info("reload: %s", message)
        else:
            log.error("reload failed: %s", message)
        if self.sup.state != "stopping":
            self.sup.notify_ready()  # success or not, a generation serves again
        done(ok, message)

    def cancel(self) -> None:
        """Shutdown: stop warming or draining; the supervisor stops every pool itself."""
        if self.task is not None:
            self.task.cancel()
        for t in list(self.drains):
            t.cancel()

    # -- the reload ---------------------------------------------------------------------

    async def reload(self) -> tuple[bool, str]:
        sup = self.sup
        serving = sup.serving
        if sup.config_path is None:
            return False, "the daemon was started without --config, so there is no file to re-read"
        try:
            new_cfg = config_mod.load(sup.config_path)
        except ConfigErrors as exc:
            lines = "; ".join(str(e) for e in exc.errors)
            return False, f"invalid config {sup.config_path}, generation {serving.number} keeps serving: {lines}"
        self._warn_unapplied(serving.config, new_cfg)
        gen = sup.new_generation(new_cfg)  # metrics and the access log follow the new generation
        log.info("reload: warming generation %s (%s)", gen.number, ", ".join(new_cfg.pools))
        new_pools = list(gen.pools.values())
        self.warming.extend(new_pools)
        problem: str | None = None
        try:
            gen.start()  # a pool with code_env starts building it (core/envbuild.py)
            await envbuild.wait_built(p.launcher for p in gen.pools.values())  # the old generation serves meanwhile
            problem = await self._wait_ready(gen.pools)
        except asyncio.CancelledError:
            # shutting down: hand the half-warm pools to the supervisor's own stop (all_pools)
            self.warming = [p for p in self.warming if p not in new_pools]
            self.retiring.extend(new_pools)
            raise
        # From here to the swap nothing awaits: the new pools go from warming to serving (or
        # to retiring) and the old ones from serving to retiring in one step, so every pool
        # with processes is always in exactly one of the supervisor's all_pools lists.
        self.warming = [p for p in self.warming if p not in new_pools]
        if problem:
            self.retiring.extend(new_pools)
            self._drain(new_pools, drain=False)
            return False, f"generation {gen.number} did not start, generation {sup.serving.number} keeps serving: {problem}"
        old_pools = list(sup.install(gen).pools.values())
        self.retiring.extend(old_pools)
        self._drain(old_pools, drain=True)
        return True, f"generation {gen.number} serving ({summary(new_cfg)})"

    async def _wait_ready(self, pools: dict[str, Pool]) -> str | None:
        """None once every pool is ready with its endpoints loaded; else what went wrong."""
        loop = self.sup.loop
        deadline = loop.time() + max(p.dispatcher.config.start_timeout for p in pools.values()) + READY_MARGIN
        while True:
            waiting = []
            for name, pool in pools.items():
                disp = pool.dispatcher
                if disp.last_error:  # a worker or the template failed to start
                    return f"pool {name!r}: {disp.last_error}"
                reports = disp.ready_info.get("endpoints") or {}
                for ep in pool.launcher.endpoints:
                    report = reports.get(ep)
                    if report is not None and not report.get("ok"):
                        return f"endpoint {ep}: its code failed to load: {report.get('error')}"
                if not disp.ready() or any(ep not in reports for ep in pool.launcher.endpoints):
                    waiting.append(name)
            if not waiting:
                return None
            if self.sup.state == "stopping":
                return "cruised is shutting down"
            if loop.time() > deadline:
                return f"pools {', '.join(waiting)} not ready in time"
            await asyncio.sleep(POLL)

    def _warn_unapplied(self, old: Config, new: Config) -> None:
        changed = []
        if old.daemon.socket != new.daemon.socket:
            changed.append("daemon.socket")
        if old.http.socket != new.http.socket or old.http.listen != new.http.listen or old.http.enabled != new.http.enabled:
            changed.append("http.enabled/socket/listen")
        if (old.qipc.listen, old.qipc.unix, old.qipc.tls_cert, old.qipc.tls_key) != (new.qipc.listen, new.qipc.unix, new.qipc.tls_cert, new.qipc.tls_key):
            changed.append("qipc.listen/unix/tls_cert/tls_key")
        if old.health.agent != new.health.agent:
            changed.append("health.agent")  # health.pools applies at once: the agent reads the serving config per connection
        if changed:
            log.warning("reload: %s changed; listening sockets are kept until a restart", ", ".join(changed))

    # -- retiring ---------------------------------------------------------------------------

    def _drain(self, pools: list[Pool], drain: bool) -> None:
        task = self.sup.loop.create_task(self._retire(pools, drain))
        self.drains.add(task)
        task.add_done_callback(self.drains.discard)

    async def _retire(self, pools: Iterable[Pool], drain: bool) -> None:
        await asyncio.gather(*(self._retire_pool(p, drain) for p in pools))

    async def _retire_pool(self, pool: Pool, drain: bool) -> None:
        """Stop a pool that takes no new calls: let its queued and running ones finish (if ``drain``), then end its processes."""
        sup = self.sup
        loop = sup.loop
        disp = pool.dispatcher
        disp.stop_accepting()
        if drain:
            # no call can outlive its queue and execution timeouts, so this wait is bounded
            deadline = loop.time() + disp.config.queue_timeout + disp.config.exec_timeout + sup.config.daemon.kill_grace + 1.0
            while not disp.idle_now() and loop.time() < deadline:
                await asyncio.sleep(POLL)
        disp.abort_queue("the pool was replaced by a reload before this request could run")
        disp.terminate_all("reload")
        end = loop.time() + sup.config.daemon.kill_grace + 1.0
        while pool.launcher.worker_count() and loop.time() < end:
            await asyncio.sleep(POLL)
        pool.launcher.close()
        await pool.launcher.wait_template(2.0)
        disp.flush_answered()  # its last answers reach metrics and the access log before it goes
        if pool in self.retiring:
            self.retiring.remove(pool)
        log.info("pool=%s old generation retired", pool.name)


def summary(cfg: Config) -> str:
    endpoints = len(cfg.endpoints())
    return f"{len(cfg.pools)} pool{'s' if len(cfg.pools) != 1 else ''}, {endpoints} endpoint{'s' if endpoints != 1 else ''}"
