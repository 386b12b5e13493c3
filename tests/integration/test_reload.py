"""Hot reload through the real daemon: `cruised reload`, SIGHUP, `serve --dev`, failures, and no lost requests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.daemon import ROOT, Daemon, group_members, pool_config, wait_for
from support.httphelp import call, unix, write
from support.load import Tally, http_loop

CODE = """
import time

VERSION = {version!r}


def version(pause=0.0):
    time.sleep(pause)
    return VERSION
"""


def endpoint_config(root: Path, version: str = "v1", extra: dict[str, Any] | None = None, **pool: Any) -> dict[str, Any]:
    code = write(root / "ep" / "version.py", CODE.format(version=version))
    endpoints = {"version": {"code": code, "function": "version"}}
    endpoints.update(extra or {})
    return {"pools": {"default": pool_config(**pool)}, "services": {"svc": {"endpoints": endpoints}}}


def set_code(root: Path, source: str) -> None:
    path = root / "ep" / "version.py"
    before = path.stat().st_mtime_ns if path.exists() else 0
    # written aside and renamed into place, as a deploy does: a worker the old generation
    # spawns meanwhile (it scales up under this load) must never read a half-written file
    tmp = path.with_suffix(".tmp")
    tmp.write_text(source)
    os.replace(tmp, path)
    # a change within the file system's timestamp granularity must still be seen
    os.utime(path, ns=(time.time_ns(), max(time.time_ns(), before + 1_000_000_000)))


def version_of(d: Daemon) -> Any:
    resp = call(unix(d), "svc/version")
    assert resp.status == 200, resp.body
    return resp.json()["response"]


def settled(d: Daemon) -> bool:
    """No old generation left, and exactly the processes the status accounts for (no leak)."""
    st = d.status()
    if st["retiring_pools"]:
        return False
    live = sum(p["workers"]["starting"] + p["workers"]["idle"] + p["workers"]["busy"] for p in st["pools"].values())
    return len(group_members(d.pgid)) == 1 + len(st["pools"]) + live


def test_reload_takes_new_code_and_config_and_retires_the_old_generation(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(endpoint_config(tmp_path))
    assert version_of(d) == "v1"
    set_code(tmp_path, CODE.format(version="v2"))
    hello = write(tmp_path / "ep" / "hello.py", "def hello(name):\n    return 'hi ' + name\n")
    d.config_path.write_text(yaml.safe_dump(endpoint_config(tmp_path, "v2", {"hello": {"code": hello, "function": "hello"}})))
    out = d.cli("reload")
    assert out.returncode == 0, out.stderr
    assert "generation 2 serving" in out.stdout
    assert version_of(d) == "v2"
    assert call(unix(d), "svc/hello", {"name": "kx"}).json()["response"] == "hi kx"
    assert d.status()["generation"] == 2
    wait_for(lambda: settled(d), 15, 0.05, "the old generation to exit")


def test_shipped_functions_stay_registered_across_a_reload(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    from cruised.pool.wire.frames import Status

    d = start_daemon(endpoint_config(tmp_path))
    with d.session() as s:

        def triple(x: int) -> int:
            return 3 * x

        assert s.call(triple, 1) == 3  # registered on this connection
        out = d.cli("reload")
        assert out.returncode == 0, out.stderr
        # call again WITHOUT registering: the new generation must already know the code
        conn = s._connection()
        slot = conn.wait(s._send_call(conn, s._ship(triple), (5,), {}, False))
        assert slot.status == Status.OK, bytes(slot.frame or b"")


def test_a_failed_reload_keeps_the_old_generation_serving(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(endpoint_config(tmp_path))
    good_config = d.config_path.read_text()
    # an invalid config: nothing is started
    d.config_path.write_text(good_config.replace("min: 1", "min: -3"))
    bad = d.cli("reload")
    assert bad.returncode == 1
    assert "pools.default.min: must not be negative" in bad.stderr and "generation 1 keeps serving" in bad.stderr
    # a code file that raises: the new generation is torn down
    d.config_path.write_text(good_config)
    set_code(tmp_path, "raise ImportError('the model is gone')\n")
    bad = d.cli("reload")
    assert bad.returncode == 1
    assert "endpoint svc/version" in bad.stderr and "ImportError: the model is gone" in bad.stderr
    # a missing interpreter for a pool of the new config
    set_code(tmp_path, CODE.format(version="v1"))
    broken_env = yaml.safe_load(good_config)
    broken_env["pools"]["default"]["python"] = str(tmp_path / "nowhere" / "python")
    d.config_path.write_text(yaml.safe_dump(broken_env))
    bad = d.cli("reload")
    assert bad.returncode == 1 and "nowhere/python" in bad.stderr
    assert version_of(d) == "v1"
    assert d.status()["generation"] == 1
    assert "reload failed" in d.log()
    wait_for(lambda: settled(d), 15, 0.05, "the failed generations to exit")


def test_sighup_reloads(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(endpoint_config(tmp_path))
    set_code(tmp_path, CODE.format(version="v2"))
    d.signal(signal.SIGHUP)
    wait_for(lambda: d.status()["generation"] == 2, 30, 0.05, "generation 2")
    assert version_of(d) == "v2"


def test_reload_under_load_loses_no_request(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(endpoint_config(tmp_path, min=1, cruise=2, max=4, queue_size=64))
    target = unix(d)
    stop = threading.Event()
    tally = Tally()
    record = tally.record

    def http_client() -> None:
        http_loop(target, "/public/api/v1/svc/version/run", b'{"pause": 0.002}', stop, tally, str)

    def native_client() -> None:
        with d.session() as s:
            for i in range(20_000):
                if stop.is_set():
                    break
                try:
                    ok = s.call(lambda x: x * 2, i) == i * 2
                    record(ok, "shipped")
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    record(False, f"shipped: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=http_client) for _ in range(4)] + [threading.Thread(target=native_client)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: tally.ok > 50, 30, 0.01, "load to be running")
        for gen, version in ((2, "v2"), (3, "v3")):
            set_code(tmp_path, CODE.format(version=version))
            before = tally.ok
            out = d.cli("reload")
            assert out.returncode == 0, out.stderr
            wait_for(
                lambda version=version, before=before: version in tally.answers and tally.ok > before + 50, 30, 0.01, f"calls answered by generation {gen}"
            )
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert tally.failed == 0, tally.failures
    assert tally.ok > 200
    assert {"v1", "v2", "v3", "shipped"} <= set(tally.answers)
    wait_for(lambda: settled(d), 15, 0.05, "the old generations to exit")


def test_dev_mode_reloads_when_code_changes(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(endpoint_config(tmp_path), args=["--dev"])
    wait_for(lambda: "cruised dev: watching" in d.log(), 10, 0.02, "the watcher")
    set_code(tmp_path, CODE.format(version="v2"))
    wait_for(lambda: "cruised dev: reloaded" in d.log(), 30, 0.05, "the dev reload")
    assert version_of(d) == "v2"
    set_code(tmp_path, "def version(:\n")  # a syntax error mid-edit
    wait_for(lambda: "cruised dev: reload FAILED" in d.log(), 30, 0.05, "the failed dev reload")
    assert "SyntaxError" in d.log().split("cruised dev: reload FAILED", 1)[1].splitlines()[0]
    assert version_of(d) == "v2"  # the last good generation keeps serving
    set_code(tmp_path, CODE.format(version="v3"))
    wait_for(lambda: d.log().count("cruised dev: reloaded") == 2, 30, 0.05, "the second dev reload")
    assert version_of(d) == "v3"


def test_dev_mode_needs_a_config_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "cruised", "serve", "--dev"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--config" in out.stderr


def test_the_shipped_config_passes_cruised_test(tmp_path: Path) -> None:
    """The README's first steps: serve the shipped config.yaml as it is, then `cruised test`."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # its paths are relative to the config file
    d = Daemon((ROOT / "config.yaml").read_text(), tmp_path)
    try:
        d.start()
        out = d.cli("test")
        assert out.returncode == 0, out.stdout + out.stderr
        rows = [line.split()[:3] for line in out.stdout.splitlines()[1:-1]]
        assert rows == [["demo/hello", "1", "200"], ["demo/hello", "2", "200"], ["demo/stats", "1", "200"], ["demo/stats", "2", "200"]]
        stats = d.cli("call", "demo/stats", "--data", '{"sym": "KX", "window": 4}')
        assert stats.returncode == 0 and json.loads(stats.stdout)["moving_average"][0] == pytest.approx(100.9)
    finally:
        d.cleanup()


def test_sigterm_lets_running_http_calls_finish(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    block = write(
        tmp_path / "ep" / "block.py",
        """
        import os
        import time


        def block(path):
            deadline = time.monotonic() + 30
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.005)
            return "finished"
        """,
    )
    d = start_daemon(endpoint_config(tmp_path, extra={"block": {"code": block, "function": "block"}}))
    target = unix(d)
    release = tmp_path / "release"
    result: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: result.update(resp=call(target, "svc/block", {"path": str(release)})))
    caller.start()
    try:
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, 10, 0.01, "the call to run")
        d.signal(signal.SIGTERM)
        wait_for(lambda: not os.path.exists(target.unix or ""), 10, 0.01, "the HTTP socket to go")
    finally:
        release.touch()
        caller.join(30)
    assert result["resp"].status == 200 and result["resp"].json()["response"] == "finished"
    assert d.wait_exit(30) == 0
