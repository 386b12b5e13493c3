"""Against a real q process: run only when CRUISED_TEST_Q=host:port is set.

    q -p 5010 &        # any q; no table needed
    CRUISED_TEST_Q=127.0.0.1:5010 python -m pytest tests/integration/test_realq.py

Optional CRUISED_TEST_Q_USER / CRUISED_TEST_Q_PASSWORD for a q started with -u/-U.
The same behaviours are covered against tests/support/qserver.py in test_qconn.py.
"""

from __future__ import annotations

import os

import pytest

from support.daemon import pool_config

TARGET = os.environ.get("CRUISED_TEST_Q")
pytestmark = [pytest.mark.realq, pytest.mark.skipif(not TARGET, reason="set CRUISED_TEST_Q=host:port to test against a real q")]


def q_section() -> dict:
    assert TARGET
    host, _, port = TARGET.rpartition(":")
    q = {"host": host or "127.0.0.1", "port": int(port), "timeout": "30s"}
    if os.environ.get("CRUISED_TEST_Q_USER"):
        q["username"] = os.environ["CRUISED_TEST_Q_USER"]
        q["password_env"] = "CRUISED_TEST_Q_PASSWORD"
    return q


def test_real_q_from_shipped_functions(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1, q=q_section())}})
    s = d.session()
    assert s.call(lambda: q("1+1").py()) == 2  # noqa: F821 - the worker's q global
    assert s.call(lambda: q("{x+y}", 1, 2).py()) == 3  # noqa: F821 - the worker's q global
    tab = s.call(lambda: q("([] sym:`a`b; px:1 2f)"))  # noqa: F821 - the worker's q global
    assert list(tab.pd()["px"]) == [1.0, 2.0]
    status = d.status()["pools"]["default"]["q"]
    assert status["connected"] == 1
