"""The real daemon in a subprocess, polled to deadlines (the integration tests' harness).

``start_daemon(config)`` writes the YAML, starts ``python -m cruised serve`` in
its own session (so its whole process tree shares one process group), waits
until it answers and its pools are ready, and on teardown stops it (SIGTERM,
then SIGKILL of the group) and asserts that no process of that group is left.
Nothing here sleeps for a fixed time: everything polls to a deadline.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

faulthandler.enable()

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.01, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_exc = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last_exc!r})" if last_exc else ""))
        time.sleep(interval)


def in_threads(fn: Callable[[int], Any], count: int, timeout: float = 60.0) -> list[BaseException]:
    """Run ``fn(0)`` ... ``fn(count - 1)`` in threads at once; what they raised (joined to a deadline)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        errors.append(TimeoutError(f"threads still running after {timeout}s"))
    return errors


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_members(pgid: int) -> list[str]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
                out.append(f"{entry}: {cmdline[:120]}")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return out


class Daemon:
    def __init__(
        self,
        config: dict[str, Any] | str,
        workdir: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        prefix: list[str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.config_path = workdir / "config.yaml"
        if isinstance(config, str):
            self.config_path.write_text(config)
        else:
            self.config_path.write_text(yaml.safe_dump(config))
        # Unix socket paths are limited to ~107 bytes: keep them short
        self.sockdir = Path(tempfile.mkdtemp(prefix="cr", dir="/tmp"))
        self.socket = str(self.sockdir / "cruised.sock")
        self.log_path = workdir / "daemon.log"
        self.env = dict(os.environ)
        self.env["CRUISED_SOCKET"] = self.socket
        self.env["PYTHONUNBUFFERED"] = "1"
        self.env.pop("NOTIFY_SOCKET", None)
        if env:
            self.env.update(env)
        self.args = args or []
        #: a command the daemon runs under (``unshare --pid --fork``): ``proc`` is then that command's
        #: process; a test that finds the daemon's own pid sets ``signal_pid`` so signals reach it
        self.prefix = prefix or []
        #: how cruised itself is started: this interpreter's, or an installed entry point (the image's)
        self.command = command or [sys.executable, "-m", "cruised"]
        self.signal_pid: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> Daemon:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, *self.command, "serve", "--config", str(self.config_path), *self.args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.workdir,
            start_new_session=True,
        )
        self.pgid = self.proc.pid
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            st = self.status()
            return st if all(p["ready"] for p in st["pools"].values()) else None

        return wait_for(ready, timeout, 0.02, "daemon ready")

    def session(self, **kw: Any) -> Any:
        import cruised

        return cruised.session(socket=self.socket, **kw)

    def status(self) -> dict[str, Any]:
        with self.session() as s:
            return s.status()

    def cli(self, *args: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cruised", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            input=input,
            cwd=self.workdir,
        )

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.signal_pid is not None:
            os.kill(self.signal_pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, then SIGKILL the whole group; return the daemon's exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                try:
                    self.signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass  # signal_pid already gone; its parent (proc) exits in a moment
                try:
                    code = self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            else:
                code = self.proc.returncode
            if group_alive(self.pgid):
                try:
                    wait_for(lambda: not group_alive(self.pgid), 5.0, 0.02, "process group to exit")
                except AssertionError:
                    os.killpg(self.pgid, signal.SIGKILL)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
        return code

    def assert_no_strays(self) -> None:
        if self.proc is None:
            return
        leftovers = group_members(self.pgid)
        if leftovers:
            os.killpg(self.pgid, signal.SIGKILL)
        assert not leftovers, f"processes left behind: {leftovers}"

    def cleanup_or_fail(self) -> None:
        """``cleanup`` for module-scoped fixtures: a leftover process fails the test with the daemon's log."""
        try:
            self.cleanup()
        except AssertionError as exc:
            pytest.fail(f"{exc}\n--- daemon log ---\n{self.log()[-4000:]}")

    def cleanup(self) -> None:
        self.stop()
        try:
            wait_for(lambda: not group_members(self.pgid), 10.0, 0.02, "no stray processes")
        finally:
            self.assert_no_strays()
            shutil.rmtree(self.sockdir, ignore_errors=True)


def pool_config(**overrides: Any) -> dict[str, Any]:
    """A small, fast pool for tests (DSS-style names)."""
    pool: dict[str, Any] = {"min": 1, "cruise": 1, "max": 2, "queue_size": 16, "queue_timeout": "10s", "exec_timeout": "30s", "idle_timeout": "30s"}
    pool.update(overrides)
    return pool


def dump_status(d: Daemon) -> str:
    return json.dumps(d.status(), indent=1)
