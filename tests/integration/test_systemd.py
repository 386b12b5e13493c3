"""systemd integration: notify messages and their order, the watchdog, socket activation, unit files.

A real AF_UNIX datagram socket stands in for systemd's NOTIFY_SOCKET, and a
socket bound by the test is handed to the daemon as fd 3 with LISTEN_FDS=1,
exactly as systemd passes it. The unit files are checked by
``systemd-analyze verify`` itself.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cruised import config
from cruised.config import DaemonConfig
from cruised.ops import systemd
from support.daemon import Daemon, pool_config, wait_for
from support.notify import NotifyListener

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"


def add(x: int, y: int) -> int:
    return x + y


def systemd_environment() -> dict[str, str | None]:
    return {k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n") if "=" in line)


# -- notify: the real daemon ------------------------------------------------------------


def test_notify_messages_and_order(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    try:
        d = start_daemon(
            {"pools": {"default": pool_config(min=2, cruise=2, max=2)}},
            env={"NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "100000"},  # a ping every 50 ms
        )
        wait_for(lambda: any("READY=1" in m for m in listener.snapshot()), what="READY=1")
        wait_for(lambda: sum(m == "WATCHDOG=1" for m in listener.snapshot()) >= 3, what="three watchdog pings")
        with d.session() as s:
            assert s.call(systemd_environment) == dict.fromkeys(systemd_environment(), None)  # children inherit none of it
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        listener.close()
    msgs = [m for m in listener.messages if m != "WATCHDOG=1"]
    ready = [i for i, m in enumerate(msgs) if "READY=1" in m.split("\n")]
    stopping = [i for i, m in enumerate(msgs) if "STOPPING=1" in m.split("\n")]
    assert len(ready) == 1 and len(stopping) == 1, msgs
    assert ready[0] < stopping[0], msgs
    # READY=1 only once `min` (2) workers are warm; its STATUS says so
    assert fields(msgs[ready[0]])["STATUS"].startswith("default: 2 idle"), msgs[ready[0]]
    assert fields(msgs[stopping[0]])["STATUS"].startswith("stopping"), msgs[stopping[0]]
    # every message is KEY=value lines, and STATUS is a one-line pool summary
    for m in msgs:
        for line in m.split("\n"):
            key, _, val = line.partition("=")
            assert key in ("READY", "STATUS", "STOPPING") and val, m
    statuses = [fields(m)["STATUS"] for m in msgs if "STATUS" in fields(m)]
    assert all("queue" in st for st in statuses), statuses
    # the watchdog pinged while the daemon ran
    assert listener.messages.count("WATCHDOG=1") >= 3


def test_reload_is_announced_with_reloading_then_ready(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    try:
        d = start_daemon({"pools": {"default": pool_config()}}, env={"NOTIFY_SOCKET": str(short_dir / "notify")})
        wait_for(lambda: any("READY=1" in m for m in listener.snapshot()), what="READY=1")
        before = time.monotonic()
        assert d.cli("reload").returncode == 0
        after = time.monotonic()
        wait_for(lambda: sum("READY=1" in m.split("\n") for m in listener.snapshot()) >= 2, what="READY=1 after the reload")
    finally:
        listener.close()
    msgs = [m for m in listener.messages if "READY=1" in m.split("\n") or "RELOADING=1" in m.split("\n")]
    kinds = ["RELOADING" if "RELOADING=1" in m.split("\n") else "READY" for m in msgs]
    assert kinds == ["READY", "RELOADING", "READY"], msgs
    usec = int(fields(msgs[1])["MONOTONIC_USEC"])  # CLOCK_MONOTONIC, as sd_notify(3) asks
    assert before * 1e6 - 1e6 <= usec <= after * 1e6 + 1e6


def test_no_ready_while_a_pool_cannot_start_and_status_says_why(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    try:
        d = start_daemon(
            {"pools": {"default": pool_config(libraries={"nope": "no_such_module_for_cruised"})}},
            wait_ready=False,
            env={"NOTIFY_SOCKET": str(short_dir / "notify")},
        )
        wait_for(lambda: any("no_such_module_for_cruised" in m for m in listener.snapshot()), what="STATUS with the preload error")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        listener.close()
    assert not any("READY=1" in m for m in listener.messages), listener.messages
    assert any("STOPPING=1" in m for m in listener.messages), listener.messages


def test_watchdog_for_another_pid_is_ignored(start_daemon: Callable[..., Daemon], short_dir: Path) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    try:
        d = start_daemon(env={"NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "20000", "WATCHDOG_PID": "1"})
        wait_for(lambda: any("READY=1" in m for m in listener.snapshot()), what="READY=1")
        d.signal(signal.SIGTERM)
        assert d.wait_exit() == 0
    finally:
        listener.close()
    assert "WATCHDOG=1" not in listener.messages
    assert any("STOPPING=1" in m for m in listener.messages)


# -- notify: units under a controlled loop -------------------------------------------------


def test_notifier_state_messages_and_abstract_address(short_dir: Path) -> None:
    name = f"cruised-test-{os.getpid()}-{time.monotonic_ns()}"
    listener = NotifyListener("\0" + name)
    try:
        address = systemd.notify_address({"NOTIFY_SOCKET": "@" + name})
        assert address == "\0" + name
        n = systemd.Notifier(address, None, lambda: "default: 1 idle", lambda: True)
        n.ready()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.ready()
        n.stopping_now()
        wait_for(lambda: len(listener.snapshot()) == 4, what="four messages")
        n.close()
    finally:
        listener.close()
    ready, reloading, ready_again, stopping = listener.messages
    assert ready == "READY=1\nSTATUS=default: 1 idle" == ready_again
    f = fields(reloading)
    assert f["RELOADING"] == "1" and before <= int(f["MONOTONIC_USEC"]) <= after
    assert fields(stopping)["STOPPING"] == "1"


def test_notify_is_a_no_op_without_the_variable() -> None:
    assert systemd.notify_address({}) is None
    assert systemd.notify_address({"NOTIFY_SOCKET": "vsock:2:1234"}) is None  # unsupported transport: ignored
    n = systemd.Notifier(None, None, lambda: "", lambda: True)
    assert not n.enabled and n.send("READY=1") is False
    assert systemd.watchdog_interval({}) is None
    assert systemd.listen_fds({}) == []


def test_watchdog_interval_rules() -> None:
    pid = str(os.getpid())
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_listen_fds_only_for_our_pid() -> None:
    assert systemd.listen_fds({"LISTEN_PID": "1", "LISTEN_FDS": "1"}) == []
    assert systemd.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"}) == []
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "cruised", "NOTIFY_SOCKET": "/x", "OTHER": "kept"}
    systemd.clear_environment(env)
    assert env == {"OTHER": "kept"}


async def test_watchdog_pings_only_while_healthy(short_dir: Path) -> None:
    listener = NotifyListener(str(short_dir / "notify"))
    healthy = True
    checks = 0
    sent: list[tuple[str, bool]] = []  # (message, healthy when it was sent)

    def is_healthy() -> bool:
        nonlocal checks
        checks += 1
        return healthy

    n = systemd.Notifier(str(short_dir / "notify"), 0.005, lambda: "s", is_healthy)
    real_send = n.send

    def spy(message: str, state: bool = False) -> bool:
        sent.append((message, healthy))
        return real_send(message, state)

    n.send = spy  # type: ignore[method-assign]  # a spy in place of the method
    deadline = time.monotonic() + 10

    async def until(pred: Callable[[], bool], what: str) -> None:
        while not pred():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.005)

    try:
        n.start(asyncio.get_running_loop())
        await until(lambda: listener.snapshot().count("WATCHDOG=1") >= 3, "three pings delivered")
        healthy = False
        seen = checks
        await until(lambda: checks >= seen + 5, "five unhealthy rounds")
        healthy = True
        pings = [m for m, _ in sent].count("WATCHDOG=1")
        await until(lambda: [m for m, _ in sent].count("WATCHDOG=1") > pings, "pings to resume")
    finally:
        n.close()
        listener.close()
    assert all(ok for m, ok in sent if m == "WATCHDOG=1"), "a ping was sent while unhealthy"


def test_adopt_listener_refuses_what_it_cannot_serve() -> None:
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        with pytest.raises(systemd.ActivationError, match="SOCK_STREAM"):
            systemd.adopt_listener(dgram.fileno(), "x")
        with pytest.raises(systemd.ActivationError, match="not listening"):
            systemd.adopt_listener(stream.fileno(), "x")
        with pytest.raises(systemd.ActivationError, match="not a socket"):
            systemd.adopt_listener(r, "x")
        assert dgram.fileno() >= 0 and stream.fileno() >= 0  # refused fds are left open, untouched
    finally:
        dgram.close()
        stream.close()
        os.close(r)
        os.close(w)


# -- socket activation: the real daemon -----------------------------------------------------


class ActivatedDaemon(Daemon):
    """A daemon started the way systemd starts it: the listening socket as fd 3, LISTEN_PID = its pid."""

    def __init__(self, config: dict[str, Any], workdir: Path, listener: socket.socket, path: str, names: str | None) -> None:
        workdir.mkdir(exist_ok=True)
        super().__init__(config, workdir)
        shutil.rmtree(self.sockdir, ignore_errors=True)
        self.sockdir = workdir / "unused"
        self.socket = path
        self.env["CRUISED_SOCKET"] = path
        self.listener = listener
        self.names = names

    def start(self, wait_ready: bool = True) -> ActivatedDaemon:
        fd = fcntl.fcntl(self.listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)  # never 3 itself
        # LISTEN_PID must be the daemon's own pid: this wrapper moves the socket to fd 3,
        # sets LISTEN_PID to its own pid and execs the daemon, which keeps that pid
        wrapper = (
            "import os, sys\n"
            "fd = int(sys.argv[1])\n"
            "os.dup2(fd, 3)\n"
            "os.close(fd)\n"
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
            "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])\n"
        )
        env = dict(self.env)
        if self.names:
            env["LISTEN_FDNAMES"] = self.names
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", wrapper, str(fd), "-m", "cruised", "serve", "--config", str(self.config_path)],
                pass_fds=[fd],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )
        finally:
            os.close(fd)
        self.pgid = self.proc.pid
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        # The backlog accepts a connection even when no daemon serves the socket, so a
        # status request could wait forever: first see the daemon say it is ready.
        def said_ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            return "cruised.supervisor: ready:" in self.log()

        wait_for(said_ready, timeout, 0.02, "the daemon to log ready")
        return super().wait_ready(timeout)


def test_socket_activation_serves_fd3_and_restarts_without_losing_a_request(tmp_path: Path, short_dir: Path) -> None:
    path = str(short_dir / "cruised.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    config = {"pools": {"default": pool_config()}}
    first = ActivatedDaemon(config, tmp_path / "first", listener, path, names="cruised")
    second = ActivatedDaemon(config, tmp_path / "second", listener, path, names=None)  # unnamed: the first fd
    try:
        first.start()
        assert first.status()["socket"] == path
        with first.session() as s:
            assert s.call(add, 1, 2) == 3
        assert "socket activation: native door on inherited fd 3 (cruised)" in first.log()
        first.signal(signal.SIGTERM)
        assert first.wait_exit() == 0
        assert os.path.exists(path), "the daemon removed a socket file systemd owns"

        # nobody serves the socket now; a client still connects (the backlog) and is answered after the restart
        import cruised

        with cruised.Session(socket=path) as s:  # lazy: session(socket=) would ping, and wait for the restart below
            pending = s.submit(add, 20, 22)
            second.start(wait_ready=False)
            assert pending.result(timeout=60) == 42
        second.wait_ready()
        assert "socket activation: native door on inherited fd 3 (unknown)" in second.log()
    finally:
        for d in (first, second):
            if d.proc is not None:
                d.cleanup()
        listener.close()


def test_socket_activation_refuses_an_unusable_fd(tmp_path: Path) -> None:
    not_listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    d = ActivatedDaemon({"pools": {"default": pool_config()}}, tmp_path / "d", not_listening, str(tmp_path / "x.sock"), names="cruised")
    try:
        d.start(wait_ready=False)
        assert d.wait_exit() == 2
        assert "cannot be the native socket" in d.log() and "SOCK_STREAM" in d.log()
    finally:
        d.cleanup()
        not_listening.close()


# -- unit files ----------------------------------------------------------------------------


def _unit(name: str) -> dict[str, list[str]]:
    """Unit file as {"Section.Key": [values...]} (keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, val = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(val.strip())
    return out


def _seconds(value: str) -> float:
    return float(value[:-1]) if value.endswith("s") else float(value)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (apt-get install systemd; .ci/run does this)")
def test_unit_files_pass_systemd_analyze_verify() -> None:
    out = subprocess.run(
        ["systemd-analyze", "verify", str(UNITS / "cruised.service"), str(UNITS / "cruised.socket")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out.stdout + out.stderr


def test_service_unit_settings() -> None:
    u = _unit("cruised.service")

    def one(key: str) -> str:
        assert key in u, f"{key} missing from cruised.service"
        return u[key][-1]

    assert one("Service.Type") == "notify"
    assert one("Service.ExecStart").endswith("cruised serve --config /etc/cruised/config.yaml")
    # cruised's own command (no /bin/kill needed), which exits non-zero when the reload fails
    assert one("Service.ExecReload") == "/usr/bin/env cruised reload"
    assert one("Service.Restart") == "on-failure"
    assert one("Service.KillMode") == "mixed"
    assert _seconds(one("Service.WatchdogSec")) > 0
    defaults = DaemonConfig()
    assert _seconds(one("Service.TimeoutStopSec")) > defaults.shutdown_grace + defaults.kill_grace + 2
    assert one("Service.User") == one("Service.Group") == "cruised"
    assert one("Service.RuntimeDirectory") == "cruised"
    for key, want in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    }.items():
        assert one(f"Service.{key}") == want, key
    assert "@system-service" in u["Service.SystemCallFilter"]
    s = _unit("cruised.socket")
    assert s["Socket.ListenStream"] == ["/run/cruised/cruised.sock"]
    assert s["Socket.SocketMode"] == ["0660"] and s["Socket.SocketGroup"] == ["cruised"]
    assert s["Socket.FileDescriptorName"][0] in systemd.NATIVE_FD_NAMES


def test_installed_config_passes_check_config_from_anywhere(tmp_path: Path) -> None:
    # the install copies systemd/config.yaml alone into /etc/cruised: it must not lean on files beside it
    installed = tmp_path / "etc" / "cruised" / "config.yaml"
    installed.parent.mkdir(parents=True)
    shutil.copy(UNITS / "config.yaml", installed)
    out = subprocess.run([sys.executable, "-m", "cruised", "check-config", str(installed)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0 and not out.stderr, out.stdout + out.stderr
    assert "pools: default" in out.stdout
    cfg = config.load(installed)
    assert cfg.daemon.socket is None, "the service's socket comes from RuntimeDirectory= (clients look there)"
    assert cfg.daemon.socket_mode == 0o660


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or os.geteuid() != 0, reason="needs systemd-sysusers and root")
def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    run = lambda *a: subprocess.run(list(a), capture_output=True, text=True, timeout=60)  # noqa: E731 - a one-line helper, local to this test
    out = run("systemd-sysusers", f"--root={root}", str(UNITS / "cruised.sysusers"))
    assert out.returncode == 0, out.stderr
    passwd = (root / "etc" / "passwd").read_text()
    assert passwd.startswith("cruised:") and "/usr/sbin/nologin" in passwd
    out = run("systemd-tmpfiles", f"--root={root}", "--create", str(UNITS / "cruised.tmpfiles"))
    assert out.returncode == 0, out.stderr
    uid = int(passwd.split(":")[2])
    st = (root / "run" / "cruised").stat()
    assert st.st_uid == uid and oct(st.st_mode & 0o777) == "0o755"
    assert (root / "etc" / "cruised").is_dir()
