"""Start and stop a real cruised daemon for the benchmark (its own session, like the tests).

The benchmark's daemon has one pool per workload so that one daemon serves
the whole run: ``fast`` (the latency/throughput/payload rows), ``scale``
(cruise 1 -> max 8 with numpy and pandas preloaded), ``mem`` (4 idle
workers with numpy and pandas, for PSS) and ``over`` (2 workers, a short
queue: the overload row). The HTTP door is configured only when the
installed daemon's config schema knows it (``http_supported``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

#: the benchmark service's code file for the HTTP door (planned endpoint interface)
ADD10_SOURCE = "def add10(x):\n    return x + 10\n"

NAP_MS = 100  # scale-up: each burst call sleeps this long
OVER_MS = 10  # overload: each call's service time


def pools(workers: int) -> dict[str, Any]:
    libs = {"np": "numpy", "pd": "pandas"}
    return {
        "fast": {"min": workers, "cruise": workers, "max": workers, "queue_size": 512, "queue_timeout": "30s"},
        "scale": {"min": 1, "cruise": 1, "max": 8, "queue_size": 64, "queue_timeout": "30s", "idle_timeout": "1s", "libraries": libs},
        "mem": {"min": 4, "cruise": 4, "max": 4, "libraries": libs},
        "over": {"min": workers, "cruise": workers, "max": workers, "queue_size": 16, "queue_timeout": "1s"},
    }


def http_config(workdir: Path, sock: str) -> dict[str, Any]:
    """The planned endpoint-door config: ``http.socket`` and a ``bench`` service with ``add10``."""
    code = workdir / "bench_service.py"
    code.write_text(ADD10_SOURCE)
    return {
        "http": {"socket": sock},
        "services": {"bench": {"endpoints": {"add10": {"code": str(code), "function": "add10", "pool": "fast"}}}},
    }


def http_supported(extra: dict[str, Any]) -> str | None:
    """None if this cruised's config accepts the HTTP door settings, else why not."""
    from cruised import config

    try:
        config.parse({"pools": pools(2), **extra})
    except config.ConfigError as exc:
        return f"daemon config has no HTTP door support ({str(exc).splitlines()[0]})"
    return None


class BenchDaemon:
    def __init__(self, workers: int, with_http: bool = True, config: dict[str, Any] | None = None) -> None:
        """``config``: this daemon's own settings instead of the benchmark's pools and HTTP door
        (its ``daemon.socket`` is still set here); bench/scaleout.py runs three such daemons."""
        self.dir = Path(tempfile.mkdtemp(prefix="crbench"))
        self.socket = str(self.dir / "cruised.sock")
        self.http_socket = ""
        self.http_note: str | None = None
        cfg: dict[str, Any] = {"daemon": {"socket": self.socket}, "pools": pools(workers)}
        if config is not None:
            cfg = {**config, "daemon": {**config.get("daemon", {}), "socket": self.socket}}
            with_http = False
            self.http_note = "own config"
        if with_http:
            extra = http_config(self.dir, str(self.dir / "http.sock"))
            self.http_note = http_supported(extra)
            if self.http_note is None:
                cfg.update(extra)
                self.http_socket = str(self.dir / "http.sock")
        elif config is None:
            self.http_note = "disabled"
        self.config_path = self.dir / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = self.dir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0, wrap: list[str] | None = None, env: dict[str, str] | None = None) -> BenchDaemon:
        """``wrap``: a command the supervisor runs under (bench/callgrind.py: valgrind); ``env``: extra variables."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        env.pop("CRUISED_SOCKET", None)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", "cruised", "serve", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cruised exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                st = self.status()
                if all(p["ready"] for p in st["pools"].values()):
                    break
            except Exception:  # noqa: BLE001 - not up yet: keep polling to the deadline
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cruised not ready within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        if self.http_socket:
            while not os.path.exists(self.http_socket) and time.monotonic() < deadline:
                time.sleep(0.02)
        return self

    def status(self) -> dict[str, Any]:
        import cruised

        with cruised.session(socket=self.socket) as s:
            return s.status()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def ready_times_ms(self, pool: str, since_line: int = 0) -> list[float]:
        """Spawn->READY times the supervisor logged for ``pool``'s workers (after log line ``since_line``)."""
        pat = re.compile(rf"worker=\S+ pool={re.escape(pool)} ready pid=\d+ in ([0-9.]+)ms")
        lines = self.log().splitlines()[since_line:]
        return [float(m.group(1)) for line in lines if (m := pat.search(line))]

    def log_lines(self) -> int:
        return len(self.log().splitlines())

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while _group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _group_alive(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
