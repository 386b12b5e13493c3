"""The shipping matrix (issue 16) where users write code, against the real daemon.

One source of cases (tests/support/shipping_matrix.py: classes, dataclasses, enums, named
tuples, exceptions, bound methods, partials, decorators, generators, closures, annotations,
mutual recursion, module aliases, all defined in the caller's ``__main__``), run from a
script, a plain ``python`` REPL in a pty, IPython, and a real Jupyter kernel executing a
notebook (tests/support/shipping_envs.py). Every case must pass in every environment.
The pool has one worker, so the case that checks one class across calls in a worker sees
the same worker each time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import shipping_envs
from support.daemon import Daemon, pool_config


@pytest.fixture(scope="module")
def matrix_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1, exec_timeout="60s")}}, tmp_path_factory.mktemp("matrix"))
    d.start()
    try:
        yield d
    finally:
        d.cleanup_or_fail()


NEEDS = {"ipython": ["IPython"], "notebook": ["nbclient", "nbformat", "ipykernel"]}


@pytest.mark.parametrize("where", shipping_envs.ENVIRONMENTS)
def test_every_case_ships_and_comes_back(matrix_daemon: Daemon, where: str, tmp_path: Path) -> None:
    missing = [m for m in NEEDS.get(where, []) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (the test extra has them)")
    results = shipping_envs.RUNNERS[where]({"CRUISED_SOCKET": matrix_daemon.socket}, tmp_path)
    failed = {case: why for case, why in results.items() if why != "ok"}
    assert not failed, f"{len(failed)} of {len(results)} cases failed in {where}: {failed}"
    assert len(results) >= 28, sorted(results)
