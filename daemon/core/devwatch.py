"""``cruised serve --dev``: reload whenever the config or endpoint code changes.

The Dataiku "development server" loop for a terminal: edit an endpoint's
code, save, and the daemon warms a new generation with it (daemon/core/reload.py)
and prints one line saying whether it loaded. A file that fails to load
leaves the previous generation serving, so a half-written edit never takes
the endpoint down.

Watched: the config file, every endpoint's code file and the ``.py`` files
beside it (helper modules), and every pool's init file, of both the running
config and the one on disk (so a newly added endpoint is watched before its
first successful load). Polling modification times and sizes keeps this free
of new dependencies; a change is acted on once two polls agree, so an
editor's several writes make one reload.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
import sys
from typing import TYPE_CHECKING

from cruised import config as config_mod
from cruised.config import Config, ConfigErrors

if TYPE_CHECKING:
    from cruised.core.supervisor import Supervisor

log = logging.getLogger("cruised.dev")

POLL = 0.25
#: helper modules watched per code directory, at most
MAX_FILES_PER_DIR = 200

Snapshot = dict[str, "tuple[int, int] | None"]


def files_of(cfg: Config) -> set[str]:
    files: set[str] = set()
    for pool in cfg.pools.values():
        if pool.init:
            files.add(pool.init)
    for _, _, ep in cfg.endpoints().values():
        files.add(ep.code)
        here = os.path.dirname(ep.code)
        files.update(sorted(glob.glob(os.path.join(glob.escape(here), "*.py")))[:MAX_FILES_PER_DIR])
    return files


def watched(sup: Supervisor) -> list[str]:
    assert sup.config_path is not None
    files = {os.path.abspath(sup.config_path)} | files_of(sup.config)
    try:
        files |= files_of(config_mod.load(sup.config_path))
    except ConfigErrors:
        pass  # an invalid config on disk: the running one's files are still watched
    return sorted(files)


def snapshot(files: list[str]) -> Snapshot:
    out: Snapshot = {}
    for path in files:
        try:
            st = os.stat(path)
            out[path] = (st.st_mtime_ns, st.st_size)
        except OSError:
            out[path] = None
    return out


def say(message: str) -> None:
    """One line for the developer on stdout (the log, on stderr, has the detail)."""
    print(f"cruised dev: {message}", file=sys.stdout, flush=True)


async def reload_once(sup: Supervisor) -> tuple[bool, str]:
    while sup.reloader.busy:  # one started by SIGHUP or `cruised reload`: take the next turn
        await asyncio.sleep(POLL)
    fut: asyncio.Future[tuple[bool, str]] = sup.loop.create_future()

    def done(ok: bool, message: str) -> None:
        if not fut.done():
            fut.set_result((ok, message))

    sup.request_reload(done)
    return await fut


async def watch(sup: Supervisor) -> None:
    files = watched(sup)
    seen = snapshot(files)
    say(f"watching {len(files)} files for changes (config and endpoint code)")
    while True:
        await asyncio.sleep(POLL)
        now = snapshot(files)
        if now == seen:
            continue
        while True:  # let the editor finish writing
            await asyncio.sleep(POLL)
            again = snapshot(files)
            if again == now:
                break
            now = again
        changed = [os.path.basename(p) for p in files if seen.get(p) != now.get(p)]
        say(f"{', '.join(changed)} changed; reloading")
        ok, message = await reload_once(sup)
        say(f"reloaded: {message}" if ok else f"reload FAILED, still serving the previous generation: {message}")
        # the new config may watch other files; a file edited during the reload still counts as changed
        files = watched(sup)
        current = snapshot(files)
        seen = {p: now.get(p, current[p]) if p in now else current[p] for p in files}
