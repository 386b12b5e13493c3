"""cruised as PID 1 of a new PID namespace, as a container runs it (no init shim).

``unshare --pid --fork --mount-proc cruised serve`` makes the daemon PID 1 of a
fresh namespace, as a pod or ``docker run`` would. The tests look at the
namespace from the host: every process of it shows up in the host's /proc with
an ``NSpid`` line (host pid first, namespace pid last), so zombies, parents and
pids inside are read without entering it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from support.daemon import Daemon, pool_config, wait_for
from support.deploy import UNSHARE, namespace_init, unshare_unavailable

pytestmark = pytest.mark.skipif(bool(unshare_unavailable()), reason=unshare_unavailable() or "")


class NsProc(NamedTuple):
    host_pid: int
    ns_pid: int
    ppid: int  # host pid of its parent
    state: str


def namespace_of(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def members(ns: str) -> list[NsProc]:
    """Every process of PID namespace ``ns``, seen from the host."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                continue
            fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{entry}/status").read_text().splitlines() if ":\t" in line)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        found.append(NsProc(int(entry), int(fields["NSpid"].split()[-1]), int(fields["PPid"]), fields["State"].split()[0]))
    return found


def add(x: int, y: int) -> int:
    return x + y


def wait_for_file(path: str, tag: str) -> str:
    while not os.path.exists(path):
        time.sleep(0.005)
    return tag


def double_fork(release: str) -> int:
    """Leave a grandchild behind, as a function that daemonizes something does: its parent exits
    at once, so it is reparented to PID 1. It exits once ``release`` exists; returns its pid."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        grandchild = os.fork()
        if grandchild == 0:
            os.closerange(3, 1024)  # not the worker's channel: the orphan must not hold it open
            deadline = time.monotonic() + 60
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.01)
            os._exit(0)
        os.write(w, str(grandchild).encode())
        os._exit(0)
    os.close(w)
    data = os.read(r, 32)
    os.close(r)
    os.waitpid(pid, 0)
    return int(data)


TEMPLATE_UNDER_PID1 = """
import json, os, socket, subprocess, sys
assert os.getpid() == 1, os.getpid()
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
proc = subprocess.Popen([sys.executable, "-m", "cruised.pool.template", str(theirs.fileno()), str(os.getpid())], pass_fds=[theirs.fileno()])
theirs.close()
ours.send(json.dumps({"libraries": {}}).encode())
ours.settimeout(60)
hello = ours.recv(65536)
print("hello", hello.decode() if hello else "none (exit %s)" % proc.wait())
ours.close()
print("exit", proc.wait(timeout=60))
"""


def test_a_template_whose_parent_is_pid_1_starts() -> None:
    """The template checks its parent against the pid it was given, not against 1: under a
    supervisor that is PID 1 it used to exit at once with code 1, and the pool never started."""
    out = subprocess.run([*UNSHARE, sys.executable, "-c", TEMPLATE_UNDER_PID1], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert '"ok": true' in out.stdout, out.stdout + out.stderr
    assert "exit 0" in out.stdout, out.stdout


def test_cruised_as_pid_1_serves_reaps_orphans_and_drains_on_sigterm(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    grace = 20.0
    d = start_daemon(
        {"daemon": {"shutdown_grace": f"{grace:g}s"}, "pools": {"default": pool_config(min=1, cruise=1, max=2)}},
        prefix=UNSHARE,
    )
    assert d.proc is not None
    init = namespace_init(d.proc.pid)
    d.signal_pid = init
    ns = namespace_of(init)
    assert ns != namespace_of(os.getpid())
    by_host = {p.host_pid: p for p in members(ns)}
    assert by_host[init].ns_pid == 1, by_host[init]

    release = tmp_path / "release"
    gate = tmp_path / "gate"
    with d.session() as s:
        assert [s.call(add, i, 1) for i in range(20)] == [i + 1 for i in range(20)]

        orphan = s.call(double_fork, str(release))
        procs = {p.ns_pid: p for p in members(ns)}
        assert orphan in procs, procs
        assert procs[orphan].ppid == init, f"the orphan's parent should be PID 1 of the namespace: {procs[orphan]}"
        release.touch()
        # once it exits, PID 1 waits for it: gone from /proc, not left a zombie
        wait_for(lambda: orphan not in {p.ns_pid for p in members(ns)}, timeout=20, what=f"orphan {orphan} to be reaped")
        zombies = [p for p in members(ns) if p.state == "Z"]
        assert not zombies, zombies
        assert s.call(add, 2, 2) == 4  # the pool still serves

        # PID 1 forwards what it does not act on itself: SIGHUP reaches the supervisor as a reload
        d.signal(signal.SIGHUP)
        wait_for(lambda: d.status()["generation"] == 2, 30, 0.05, "generation 2 after SIGHUP to PID 1")
        assert s.call(add, 3, 3) == 6

        # SIGTERM to PID 1, as the container runtime sends it: the call in flight finishes, exit 0
        running = s.submit(wait_for_file, str(gate), "ran")
        wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, what="a busy worker")
        sent = time.monotonic()
        d.signal(signal.SIGTERM)
        wait_for(lambda: "shutting down gracefully" in d.log(), what="the graceful stop")
        gate.touch()
        assert running.result(timeout=grace) == "ran"
    assert d.wait_exit(timeout=grace) == 0, d.log()
    assert time.monotonic() - sent < grace
    log = d.log()
    assert "pid 1: the supervisor exited (code 0)" in log, log
    assert "was not run" not in log
