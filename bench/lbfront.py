"""HAProxy in front of daemons on loopback: the shipped config, rewritten, run, and read.

Used by tests/integration/test_haproxy.py and ``python -m bench.scaleout``. The
config is deploy/haproxy/cruised.cfg itself: ``rewrite`` only swaps its
example addresses and ports for the ones on this machine (each daemon on its
own loopback address, 127.0.0.2, .3, .4: Linux routes all of 127/8 to lo, so
every daemon can use the same ports, as on real hosts), and fails if a string
it replaces is no longer in the file, so the shipped file cannot drift from
what is tested. ``Haproxy`` runs it in the foreground in its own session and
reads its runtime API (``show stat``) on the stats socket.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "haproxy" / "cruised.cfg"
#: where each daemon listens; cruisedN in the config is HOSTS[N-1]
HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: the shipped file's example ports, by the daemon setting they stand for
SHIPPED_PORTS = {"http": 9580, "agent": 9581, "q": 5010, "remote": 7443}


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)


def free_port(hosts: tuple[str, ...]) -> int:
    """A TCP port free on every one of ``hosts`` (the daemons share port numbers, as on real hosts)."""
    for _ in range(50):
        probes = []
        try:
            first = socket.socket()
            probes.append(first)
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            for host in hosts[1:]:
                s = socket.socket()
                probes.append(s)
                s.bind((host, port))
            return port
        except OSError:
            continue
        finally:
            for s in probes:
                s.close()
    raise RuntimeError(f"no port free on all of {hosts}")


@dataclass(frozen=True)
class Ports:
    """The daemons' ports (the same on every host) and HAProxy's front ports (on 127.0.0.1)."""

    http: int
    agent: int
    q: int
    remote: int
    front_http: int
    front_q: int
    front_remote: int
    front_stats: int

    @classmethod
    def pick(cls) -> Ports:
        back = [free_port(HOSTS) for _ in range(4)]
        front = [free_port(("127.0.0.1",)) for _ in range(4)]
        return cls(*back, *front)


def _replace(text: str, old: str, new: str) -> str:
    if old not in text:
        raise ValueError(f"deploy/haproxy/cruised.cfg no longer contains {old!r}: update bench/lbfront.py's rewrite with it")
    return text.replace(old, new)


def rewrite(text: str, ports: Ports, stats_socket: str, slowstart: str = "2s", hosts: tuple[str, ...] = HOSTS) -> str:
    """The shipped config with this machine's addresses and ports (and a shorter slowstart, for tests)."""
    for i, host in enumerate(hosts, 1):
        for name, shipped in SHIPPED_PORTS.items():
            if name != "agent":
                text = _replace(text, f"10.0.0.{i}:{shipped}", f"{host}:{getattr(ports, name)}")
    text = _replace(text, f"agent-port {SHIPPED_PORTS['agent']}", f"agent-port {ports.agent}")
    text = _replace(text, f"check port {SHIPPED_PORTS['http']}", f"check port {ports.http}")
    text = _replace(text, f"bind *:{SHIPPED_PORTS['http']}", f"bind 127.0.0.1:{ports.front_http}")
    text = _replace(text, f"bind *:{SHIPPED_PORTS['q']}", f"bind 127.0.0.1:{ports.front_q}")
    text = _replace(text, f"bind *:{SHIPPED_PORTS['remote']}", f"bind 127.0.0.1:{ports.front_remote}")
    text = _replace(text, "bind *:8404", f"bind 127.0.0.1:{ports.front_stats}")
    text = _replace(text, "/run/haproxy/cruised-admin.sock", stats_socket)
    return _replace(text, "slowstart 10s", f"slowstart {slowstart}")


def check(binary: str, path: Path) -> subprocess.CompletedProcess[str]:
    """``haproxy -c -f path``: HAProxy's own validation of a config file."""
    return subprocess.run([binary, "-c", "-f", str(path)], capture_output=True, text=True, timeout=60)


class Haproxy:
    """One HAProxy process on a config file, in the foreground (``-db``), in its own session."""

    def __init__(self, binary: str, config: Path, stats_socket: str, log_path: Path) -> None:
        self.binary = binary
        self.config = config
        self.stats_socket = stats_socket
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> Haproxy:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [self.binary, "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                self.stat()
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy's stats socket did not answer within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def command(self, line: str) -> str:
        """One runtime API command on the stats socket; its whole answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(self.stats_socket)
            s.sendall(line.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        return b"".join(chunks).decode()

    def stat(self) -> list[dict[str, str]]:
        """``show stat`` as rows of {field: value} (pxname, svname, scur, smax, stot, status, ...)."""
        text = self.command("show stat")
        lines = text.lstrip("# ").splitlines()
        return [dict(row) for row in csv.DictReader(io.StringIO("\n".join(lines)))]

    def server(self, backend: str, name: str) -> dict[str, str]:
        for row in self.stat():
            if row["pxname"] == backend and row["svname"] == name:
                return row
        raise KeyError(f"no server {backend}/{name} in haproxy's stats")

    def servers(self, backend: str) -> dict[str, dict[str, str]]:
        return {row["svname"]: row for row in self.stat() if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self.proc = None


def launch(binary: str, ports: Ports, workdir: Path) -> Haproxy:
    """HAProxy on the shipped config rewritten for ``ports`` (its config, log and stats socket in ``workdir``), started."""
    stats = str(workdir / "haproxy.sock")
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(rewrite(SHIPPED.read_text(), ports, stats))
    return Haproxy(binary, cfg, stats, workdir / "haproxy.log").start()


def status_of(row: dict[str, Any]) -> str:
    """A server's state word in ``show stat`` (UP, DOWN, DRAIN, NOLB, ``UP 1/2`` while it changes...)."""
    return str(row.get("status", ""))
