"""Code envs through the real daemon: pools on other interpreters, side by side, and their failures.

The test makes its own venvs (no pip, no network): each gets a module
``verlib`` written into its site-packages, at a different version, and the
test's own environment has none. A pool per venv serves an endpoint that
imports it. Broken interpreters (missing, or not Python at all) fail their
own pool only.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cruised
from cruised.client import errors, shipping
from support.daemon import Daemon, pool_config, wait_for
from support.httphelp import call, error_of, get, unix, write

BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
MINOR = f"{sys.version_info[0]}.{sys.version_info[1]}"

CODE = """
import sys

import verlib  # present only in the pool's own venv


def ver():
    return {"verlib": verlib.__version__, "prefix": sys.prefix, "python": "%d.%d" % sys.version_info[:2]}
"""

PLAIN = """
import sys


def version():
    return "%d.%d" % sys.version_info[:2]
"""


def make_venv(where: Path, python: str, verlib_version: str | None) -> str:
    subprocess.run([python, "-m", "venv", "--without-pip", str(where)], check=True, capture_output=True, timeout=120)
    if verlib_version is not None:
        (site,) = glob.glob(str(where / "lib" / "python3*" / "site-packages"))
        Path(site, "verlib.py").write_text(f"__version__ = {verlib_version!r}\n")
    return str(where / "bin" / "python")


def other_minor_python() -> str | None:
    """An interpreter of another Python minor version, if this machine has one."""
    candidates = sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3") + glob.glob("/usr/bin/python3.*") + glob.glob("/usr/local/bin/python3.*"))
    for path in candidates:
        if not re.search(r"python3(\.\d+)?$", path) or not os.access(path, os.X_OK):
            continue
        try:
            out = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = out.stdout.strip()
        if out.returncode == 0 and version != MINOR and tuple(map(int, version.split("."))) >= (3, 10):
            return path
    return None


@pytest.fixture(scope="module")
def envs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("envs")
    py_a = make_venv(root / "venv-a", BASE_PYTHON, "1.0")
    py_b = make_venv(root / "venv-b", BASE_PYTHON, "2.0")
    notpy = write(root / "notpython", "#!/bin/sh\necho 'this is not a python interpreter' >&2\nexit 7\n")
    os.chmod(notpy, 0o755)
    code = write(root / "ver.py", CODE)
    plain = write(root / "plain.py", PLAIN)
    pools: dict[str, Any] = {
        "default": pool_config(),
        "env-a": pool_config(python=py_a),
        "env-b": pool_config(python=py_b),
        "ghost": pool_config(python=str(root / "no-such-venv" / "bin" / "python")),
        "notpy": pool_config(python=notpy),
    }
    endpoints: dict[str, Any] = {
        "a": {"code": code, "function": "ver", "pool": "env-a"},
        "b": {"code": code, "function": "ver", "pool": "env-b"},
        "main": {"code": code, "function": "ver", "pool": "default"},
        "ghost": {"code": plain, "function": "version", "pool": "ghost"},
        "notpy": {"code": plain, "function": "version", "pool": "notpy"},
    }
    other = other_minor_python()
    if other is not None:
        pools["other"] = pool_config(python=make_venv(root / "venv-other", other, None))
        endpoints["other"] = {"code": plain, "function": "version", "pool": "other"}
    d = Daemon({"pools": pools, "services": {"env": {"endpoints": endpoints}}}, root)
    d.start(wait_ready=False)
    try:
        good = ["default", "env-a", "env-b"] + (["other"] if other else [])
        wait_for(lambda: all(d.status()["pools"][p]["ready"] for p in good), 60, 0.05, "the working pools")
        yield d
    finally:
        d.cleanup_or_fail()


def test_two_envs_with_incompatible_versions_serve_side_by_side(envs: Daemon) -> None:
    assert importlib.util.find_spec("verlib") is None  # not in the test's (and daemon's) own env
    t = unix(envs)
    a = call(t, "env/a").json()["response"]
    b = call(t, "env/b").json()["response"]
    assert a["verlib"] == "1.0" and a["prefix"].endswith("venv-a")
    assert b["verlib"] == "2.0" and b["prefix"].endswith("venv-b")
    st = envs.status()["pools"]
    assert st["env-a"]["python"] == MINOR and st["env-b"]["python"] == MINOR


def test_the_library_is_missing_in_the_main_pool(envs: Daemon) -> None:
    resp = call(unix(envs), "env/main")
    assert resp.status == 503
    assert "No module named 'verlib'" in error_of(resp)["message"]


@dataclasses.dataclass
class Pair:
    a: int
    b: int


def test_shipped_functions_work_in_an_env_without_cloudpickle(envs: Daemon) -> None:
    with envs.session(pool="env-a") as s:
        assert s.call(lambda x: x + 1, 41) == 42

        def where() -> str:
            import sys

            return sys.prefix

        assert s.call(where).endswith("venv-a")
        # a class of this (unimportable there) module, by value both ways: the env has no
        # cloudpickle of its own, so the results go back through the daemon's copy too
        out = s.call(lambda p: Pair(p.b, p.a), Pair(1, 2))
        assert type(out) is Pair and out == Pair(2, 1)


def test_a_missing_interpreter_fails_its_pool_alone(envs: Daemon) -> None:
    t = unix(envs)

    def ghost() -> dict[str, Any]:
        return envs.status()["pools"]["ghost"]

    wait_for(lambda: ghost()["last_error"], what="the ghost pool's error")
    assert "no-such-venv/bin/python" in ghost()["last_error"] and "No such file" in ghost()["last_error"]
    resp = call(t, "env/ghost")
    assert resp.status == 503
    err = error_of(resp)
    assert err["errorType"] == "PoolUnavailable" and "no-such-venv/bin/python" in err["message"]
    assert resp.headers["retry-after"] == "1"
    reasons = get(t, "/readyz").json()["reasons"]
    assert any(r.startswith("pool ghost:") for r in reasons)
    assert call(t, "env/a").status == 200  # the others serve on


def test_an_interpreter_that_cannot_start_a_worker(envs: Daemon) -> None:
    wait_for(lambda: "this is not a python interpreter" in (envs.status()["pools"]["notpy"]["last_error"] or ""), what="the notpy pool's error")
    err = error_of(call(unix(envs), "env/notpy"))
    assert err["errorType"] == "PoolUnavailable" and "exit code 7" in err["message"]


def test_other_python_minor_serves_endpoints_and_refuses_shipped_functions(envs: Daemon) -> None:
    st = envs.status()["pools"]
    if "other" not in st:
        pytest.skip("no Python of another minor version on this machine (the mismatch is also tested by faking the client's version)")
    other = st["other"]["python"]
    assert other != MINOR
    assert call(unix(envs), "env/other").json()["response"] == other
    with envs.session(pool="other") as s:
        with pytest.raises(errors.VersionMismatch) as info:
            s.call(lambda: 1)
    assert f"Python {MINOR}" in str(info.value) and f"Python {other}" in str(info.value)


def test_version_mismatch_is_refused_at_registration(envs: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client's version is faked, so this runs on any machine: the refusal names both versions."""
    monkeypatch.setattr(shipping, "PYTHON", "3.99")
    with envs.session(pool="env-a") as s:
        with pytest.raises(errors.VersionMismatch) as info:
            s.call(lambda: 1)
    message = str(info.value)
    assert "Python 3.99" in message and f"Python {MINOR}" in message and "env-a" in message
    assert isinstance(info.value, cruised.CruisedError)
