"""Hooks for the integration tests (fixtures are in tests/conftest.py, helpers in tests/support/)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_finish(session: pytest.Session) -> None:
    # A cold run of the systemd boot test first builds a Debian rootfs (minutes, mostly
    # download): start that now, so it overlaps the tests that run before it.
    import os

    if os.environ.get("CRUISED_TEST_BOOT") == "0":
        return
    if any(item.nodeid.split("::")[0].endswith("test_systemd_boot.py") and "box" in getattr(item, "fixturenames", ()) for item in session.items):
        from support import nspawn

        nspawn.prepare_in_background(ROOT)


def pytest_unconfigure(config: pytest.Config) -> None:
    from support import nspawn

    nspawn.stop_background()
