"""The HAProxy agent-check listener (``health.agent: HOST:PORT``): live capacity for the load balancer.

HAProxy's ``agent-check`` connects over TCP every ``agent-inter``, reads one
line and closes; the words on it change the server's state and limits
(HAProxy configuration manual, "agent-check"). This listener writes exactly
one line per connection, without reading anything, and closes::

    up ready maxconn:<N>\\n   serving: N workers can run calls now
    drain\\n                  draining (``cruised drain``): no new sessions;
                             the ones HAProxy holds finish
    down\\n                   no counted pool is ready (warming, its code env
                             building, its required q connection down) or the
                             daemon is stopping

N is the sum, over the pools in ``health.pools`` (every pool of the serving
generation when empty), of their warm workers (idle + busy): the calls the
daemon can run at once without queueing. With HAProxy's per-server
``maxconn`` tracking it, the surplus waits in HAProxy's queue (and goes to
another daemon with a free worker under ``balance leastconn``) instead of in
this daemon's queue; it rises as workers warm up and falls when one dies.
Why a sum: one daemon is one HAProxy server, whichever pool a request
lands in; list in ``health.pools`` the pools the balanced traffic uses, so
a pool for local batch work does not inflate the figure. N is at least 1:
``maxconn:0`` would mean "no limit" to HAProxy, and a pool scaled to zero
(``min: 0``) needs a call to start a worker.

``ready`` is on the ``up`` line because "only the agent may revert its own
actions": after a ``drain`` or ``down`` from this agent, HAProxy keeps the
server drained until the agent says ``ready``/``up`` again.

The line is composed from the daemon's state at connect time by
``agent_line`` (pure; tests/unit/test_haproxy_agent.py), on the supervisor's
loop, so it reads the dispatchers without locks. The listener stays open
through a graceful shutdown (answering ``down``) and closes with the daemon.
Its address is bound at start: a reload does not move it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from cruised.core.dispatch import WorkerState
from cruised.doors import access
from cruised.doors.sockets import bind_tcp

if TYPE_CHECKING:
    from cruised.doors.host import DoorHost

log = logging.getLogger("cruised.agent")

UP = "up ready maxconn:{}\n"
DRAIN = "drain\n"
DOWN = "down\n"


def agent_line(stopping: bool, draining: bool, pools: Iterable[tuple[bool, int]]) -> str:
    """The agent's answer. ``pools``: (ready, warm workers) of each counted pool."""
    if stopping:
        return DOWN
    if draining:
        return DRAIN
    any_ready = False
    warm = 0
    for ready, n in pools:
        any_ready = any_ready or ready
        warm += n
    if not any_ready:
        return DOWN
    return UP.format(max(1, warm))


def counted_pools(host: DoorHost) -> list[tuple[bool, int]]:
    """(ready, warm workers) of each pool the agent counts (``health.pools``, else all) in the serving generation."""
    cfg = host.config
    out = []
    for name in cfg.health.pools or list(cfg.pools):
        d = host.dispatcher(name)
        if d is not None:
            out.append((d.ready(), d.counts[WorkerState.IDLE] + d.counts[WorkerState.BUSY]))
    return out


class _Answer(asyncio.Protocol):
    """One agent connection: write the line, close (HAProxy reads until the close)."""

    def __init__(self, host: DoorHost) -> None:
        self.host = host

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        host = self.host
        line = agent_line(host.state == "stopping", host.draining, counted_pools(host))
        writer = cast(asyncio.WriteTransport, transport)  # a stream transport (uvloop's is no WriteTransport subclass)
        writer.write(line.encode())
        writer.close()  # after the write is flushed

    def connection_lost(self, exc: BaseException | None) -> None:
        pass


class HaproxyAgent:
    """The listener on ``health.agent``; ``start`` binds it (SocketInUse if taken), ``close`` ends it."""

    def __init__(self, host: DoorHost) -> None:
        self.host = host
        self.server: asyncio.AbstractServer | None = None
        self.address: str | None = None

    async def start(self) -> None:
        address = self.host.config.health.address()
        assert address is not None
        sock = bind_tcp(*address, "health.agent")
        bound = sock.getsockname()
        self.address = f"{bound[0]}:{bound[1]}"
        try:
            self.server = await self.host.loop.create_server(lambda: _Answer(self.host), sock=sock, backlog=64)
        except BaseException:
            sock.close()
            raise
        log.info("%s", access.agent_line(self.address))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def describe(self) -> dict[str, object]:
        return {"listen": self.address, "pools": list(self.host.config.health.pools) or sorted(self.host.config.pools)}
