"""DoorHost: everything a front door may ask of the daemon, and nothing more.

A door turns bytes into Jobs and answers back into bytes. For that it needs the
pool a request names (its Dispatcher), the serving generation's config, the
status and metrics documents, readiness, a reload, and a place to count refused
logins. The supervisor implements this protocol; doors never see the
Supervisor object, its pools, generations or private state, so a door can be
read, tested (tests/unit with a fake host) and changed on its own.

``config`` is the *serving* generation's: a reload swaps it between two
requests, so a door reads it per request (or per connection for settings that
are bound at start, such as listening addresses).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cruised.config import Config
    from cruised.core.dispatch import Dispatcher


class DoorHost(Protocol):
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The daemon's one event loop: every door callback runs on it."""
        ...

    @property
    def config(self) -> Config:
        """The serving generation's config (changes only between requests, at a reload's swap)."""
        ...

    @property
    def state(self) -> str:
        """``starting``, ``ready`` or ``stopping``."""
        ...

    @property
    def draining(self) -> bool:
        """``cruised drain`` is in force: every door refuses new calls (DRAINING) until ``cruised ready``."""
        ...

    def drain(self, on: bool | None) -> dict[str, Any]:
        """Start (True) or end (False) a drain, or only report (None): ``{"draining", "state", "queued", "running"}``."""
        ...

    def dispatcher(self, pool: str) -> Dispatcher | None:
        """The serving generation's dispatcher of ``pool``, None if there is no such pool."""
        ...

    def all_dispatchers(self) -> list[Dispatcher]:
        """Serving, warming and retiring dispatchers: where a closed connection's jobs may still be."""
        ...

    def no_such_pool(self, pool: str) -> str:
        """The message that refuses a request naming an unknown pool (lists the configured ones)."""
        ...

    def status(self) -> dict[str, Any]:
        """The status document (``cruised status``, ``GET /status``, the STATUS frame)."""
        ...

    def pool_status(self) -> dict[str, dict[str, Any]]:
        """Each serving pool's status, by name (the ``pools`` section of ``status()``)."""
        ...

    def readiness(self) -> list[str]:
        """Why the daemon is not ready to serve all it is configured for; empty when ready."""
        ...

    def render_metrics(self) -> bytes:
        """Prometheus text; every request answered before the call is counted."""
        ...

    def request_reload(self, done: Callable[[bool, str], None]) -> None:
        """Start a reload; ``done(ok, message)`` once it has succeeded or failed."""
        ...

    def auth_failed(self, door: str) -> None:
        """Count a refused login or peer on ``door`` (``native``, ``http``, ``qipc``)."""
        ...
