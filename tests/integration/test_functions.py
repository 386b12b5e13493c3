"""Shipping Python functions to the real daemon: the kx.remote-style client, end to end."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

import cruised
from support.daemon import Daemon, in_threads, pool_config


def helper_in_this_module(x: int) -> int:
    return x * 2


def uses_a_module_helper(x: int) -> int:
    return helper_in_this_module(x) + 1


class Unpicklable(Exception):
    def __init__(self, a: int, b: int) -> None:  # pickle re-creates with one arg: fails at load
        super().__init__(f"{a}/{b}")


def test_decorator_with_keywords_and_session_library(daemon: Daemon) -> None:
    s = daemon.session()
    s.add_library("numpy")

    @cruised.function(s)
    def f(x, y=1):
        return numpy.add(x, y)  # noqa: F821 - provided by add_library

    assert f(10, y=20) == 30
    assert f(1) == 2
    assert s.call(f, 1, 2) == 3
    assert s.submit(f, 2, y=3).result(timeout=30) == 5
    assert list(s.map(f, range(40))) == [i + 1 for i in range(40)]


THRESHOLD = 5


def above_threshold(x: int) -> bool:
    return x > THRESHOLD


@pytest.mark.parametrize("window", [1, 2, 7, 64])
def test_map_keeps_order_through_batched_refills_and_a_full_queue(start_daemon, window: int) -> None:
    """map sends its refills in batches (half a window at a time); with a queue smaller than the
    window, it sends only what its credit allows: every result arrives, in order, exactly once,
    and no call is refused."""
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1, queue_size=3)}})
    s = cruised.session(socket=d.socket)
    try:
        assert list(s.map(lambda x, y: x * y, range(150), range(1, 151), window=window)) == [x * (x + 1) for x in range(150)]
        assert list(s.map(lambda x: x, [], window=window)) == []
        assert d.status()["pools"]["default"]["requests"] == {"ok": 150}, "each call reached the daemon once, none refused"
    finally:
        s.close()


def test_rebinding_a_global_reships_the_function(daemon: Daemon) -> None:
    global THRESHOLD
    s = daemon.session()
    assert s.call(above_threshold, 3) is False
    THRESHOLD = 2
    try:
        assert s.call(above_threshold, 3) is True, "the new value of the global is used"
    finally:
        THRESHOLD = 5


def test_two_step_create_like_pykx_2(daemon: Daemon) -> None:
    s = cruised.session()
    s.create(socket=daemon.socket)
    assert s.call(lambda: "ok") == "ok"


def test_libraries_with_aliases_and_imports_in_the_body(daemon: Daemon) -> None:
    s = daemon.session(libraries={"np": "numpy"})

    @cruised.function(s)
    def g(n):
        import math

        return float(np.sqrt(n)) + math.floor(0.5)

    assert g(16) == 4.0


def test_add_library_is_prechecked_with_the_workers_import_error(daemon: Daemon) -> None:
    s = daemon.session()
    with pytest.raises(ImportError, match="no_such_module_xyz"):
        s.add_library("no_such_module_xyz")
    # the session stays usable and the failed library is not added
    assert s.call(lambda: 1) == 1


def test_lambdas_closures_nested_helpers_and_module_functions(daemon: Daemon) -> None:
    s = daemon.session()
    k = 7

    def make_adder(n):
        def add(x):
            return x + n + k

        return add

    def inner_helper(x):
        return x * 3

    def uses_inner(x):
        return inner_helper(x) + 1

    assert s.call(lambda x: x * k, 6) == 42
    assert s.call(make_adder(3), 1) == 11
    assert s.call(uses_inner, 2) == 7
    # defined in this test module, which the worker cannot import: shipped by value with its helper
    assert s.call(uses_a_module_helper, 5) == 11

    def recursive(n):
        return 1 if n <= 1 else n * recursive(n - 1)

    assert s.call(recursive, 5) == 120


def test_remote_exception_keeps_its_type_and_traceback(daemon: Daemon) -> None:
    s = daemon.session()

    def boom(x):
        raise ValueError(f"bad value {x}")

    with pytest.raises(ValueError, match="bad value 3") as info:
        s.call(boom, 3)
    cause = info.value.__cause__
    assert cause is not None and "boom" in str(cause) and "Traceback" in str(cause)


def test_exception_that_cannot_be_recreated_becomes_remote_error(daemon: Daemon) -> None:
    s = daemon.session()

    def odd():
        raise Unpicklable(1, 2)

    with pytest.raises(cruised.RemoteError, match="Unpicklable: 1/2") as info:
        s.call(odd)
    assert "Traceback" in info.value.traceback_text
    assert isinstance(info.value, cruised.CruisedError)


def test_an_exception_class_defined_in_the_worker_comes_back_by_value(daemon: Daemon) -> None:
    s = daemon.session()

    def local():
        class Local(Exception):
            pass

        raise Local("defined inside the worker")

    with pytest.raises(Exception, match="defined inside the worker") as info:
        s.call(local)
    assert type(info.value).__name__ == "Local" and not isinstance(info.value, cruised.CruisedError)
    assert "Traceback" in str(info.value.__cause__)


def test_numpy_pandas_and_pykx_objects_survive(daemon: Daemon) -> None:
    s = daemon.session()
    arr = np.arange(1_000_000, dtype=np.float64)
    out = s.call(lambda a: a * 2, arr)
    np.testing.assert_array_equal(out, arr * 2)
    df = pd.DataFrame({"sym": ["a", "b", "c"], "px": [1.0, 2.0, 3.0]})
    pd.testing.assert_frame_equal(s.call(lambda d: d.assign(px=d.px * 10), df), df.assign(px=df.px * 10))

    def make_table():
        import os

        os.environ.setdefault("PYKX_UNLICENSED", "true")
        import pykx as kx

        return kx.toq(pd.DataFrame({"sym": ["x", "y"], "v": [1, 2]}))

    tab = s.call(make_table)
    import pykx as kx

    assert isinstance(tab, kx.Table)
    assert list(tab.pd()["v"]) == [1, 2]


def test_a_session_is_safe_from_many_threads(daemon: Daemon) -> None:
    s = daemon.session()
    results: dict[int, list[int]] = {}

    def run(t: int) -> None:
        results[t] = [s.call(lambda x, t=t: x * 100 + t, i) for i in range(30)]

    assert not in_threads(run, 6)
    for t in range(6):
        assert results[t] == [i * 100 + t for i in range(30)]
    # within the pool's capacity (queue 16 + workers), so no submission can be rejected
    futs = [s.submit(lambda x: x + 1, i) for i in range(16)]
    assert [f.result(timeout=60) for f in futs] == list(range(1, 17))


def test_code_is_shipped_once_and_reregistered_after_a_daemon_restart(start_daemon) -> None:
    d = start_daemon()
    s = d.session()

    def f(x):
        return x + 1

    assert s.call(f, 1) == 2
    d.stop()
    with pytest.raises(cruised.DaemonUnavailable):
        s.call(f, 1)  # nobody there
    d.start()
    # the dead connection is noticed before anything is sent; the new one registers f again
    assert s.call(f, 2) == 3


def test_session_libraries_reach_workers_started_later(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1)}})
    s = d.session()
    s.add_library("numpy")

    @cruised.function(s)
    def total(xs):
        return int(numpy.sum(xs))  # noqa: F821 - provided by add_library

    first = s.call(os.getpid)
    assert total([1, 2, 3]) == 6
    with pytest.raises(cruised.WorkerCrashed):
        s.call(os._exit, 1)
    assert s.call(os.getpid) != first
    assert total([4, 5]) == 9, "the replacement worker got the function and its library"


def test_unreachable_daemon_names_the_socket_and_how_to_start(tmp_path) -> None:
    path = str(tmp_path / "nothing.sock")
    s = cruised.Session(socket=path)  # the class is lazy; session(socket=...) checks at once (test_cancel.py)
    with pytest.raises(cruised.DaemonUnavailable) as info:
        s.call(lambda: 1)
    assert path in str(info.value) and "cruised serve" in str(info.value)


def test_functions_from_a_script_and_the_plain_repl(daemon: Daemon) -> None:
    script = textwrap.dedent(
        f"""
        import cruised
        s = cruised.session(socket={daemon.socket!r})
        s.add_library('numpy')
        @cruised.function(s)
        def f(x, y=1):
            return int(numpy.add(x, y))
        print("RESULT", f(10, y=20), s.call(lambda: 'lam'))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "RESULT 30 lam" in out.stdout, out.stderr
    # the interactive interpreter: source of REPL functions is not retrievable, cloudpickle ships them anyway
    repl = subprocess.run(
        [sys.executable, "-i", "-q"],
        input=(f"import cruised\ns = cruised.session(socket={daemon.socket!r})\ndef sq(x):\n    return x * x\n\nprint('REPL', s.call(sq, 9))\n"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "REPL 81" in repl.stdout, repl.stderr


def test_results_that_cannot_be_pickled_fail_clearly(daemon: Daemon) -> None:
    s = daemon.session()

    def gen():
        return (i for i in range(3))

    with pytest.raises(TypeError, match="generator"):
        s.call(gen)
    assert s.call(lambda: 2) == 2
    # the worker survived the failure
    assert daemon.status()["pools"]["default"]["requests"].get("crashed", 0) == 0


def test_pickled_exception_class_from_module_roundtrips(daemon: Daemon) -> None:
    s = daemon.session()

    def raise_key():
        raise KeyError("missing")

    with pytest.raises(KeyError):
        s.call(raise_key)
    assert pickle  # the module-level import is used by other tests' helpers


def test_pool_selection_and_unknown_pool(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(), "other": pool_config()}})
    assert d.session(pool="other").call(lambda: "other") == "other"
    with pytest.raises(cruised.CruisedError, match="no pool named 'nope'"):
        d.session(pool="nope").call(lambda: 1)
