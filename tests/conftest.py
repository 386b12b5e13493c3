"""Fixtures for every test: ``start_daemon`` and ``daemon`` (tests/support/daemon.py has the harness).

Tests import their helpers from the ``support`` package (tests/ is on the
path through pytest's ``pythonpath`` setting), never from this file.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from support.daemon import Daemon, pool_config

__all__ = ["daemon", "start_daemon"]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config: dict[str, Any] | str | None = None, wait_ready: bool = True, **kw: Any) -> Daemon:
        if config is None:
            config = {"pools": {"default": pool_config()}}
        workdir = tmp_path / f"d{len(started)}"
        workdir.mkdir()
        d = Daemon(config, workdir, **kw)
        started.append(d)
        return d.start(wait_ready=wait_ready)

    yield start
    failures = []
    for d in started:
        try:
            d.cleanup()
        except AssertionError as exc:
            failures.append(f"{exc}\n--- daemon log ---\n{d.log()[-4000:]}")
    if failures:
        pytest.fail("\n".join(failures))


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths must stay under ~107 bytes: not under pytest's tmp_path
    d = Path(tempfile.mkdtemp(prefix="crs", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
