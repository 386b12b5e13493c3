"""The documented systemd install, under a real systemd booted as PID 1 (issue 22).

A Debian 12 container of the test's own (tests/support/nspawn.py: debootstrap
minbase, cached between runs, booted with ``systemd-nspawn --boot``) gets the
checkout by the install block of docs/operations.md, run line by line as
written. The one thing set around it is pip's configuration: the container has
no network, so ``PIP_NO_INDEX``/``PIP_FIND_LINKS`` point ``pip install .`` at a
wheelhouse built on the host, and ``PIP_COMPILE=0`` skips byte-compiling the
dependencies, two thirds of the install's time here and nothing these tests
look at. The rootfs has no procps, as on minimal and slim images.

Then, in order, as an operator and the group's members would see it: the
service is active with its STATUS line; a member of group cruised calls it
with no socket setting (someone outside the group is refused); it runs as
user cruised under the hardening, and a shipped function that writes outside
its allowed paths gets an error, not a crash; ``systemctl reload`` succeeds,
and fails on an invalid config while the old generation keeps serving;
``systemctl stop`` lets a running call finish; a connect starts the stopped
service through cruised.socket; the watchdog kills a SIGSTOPped supervisor
and restarts it, and no process of the old instance is left.

Skips, with the reason, where the host cannot do it: not root, debootstrap or
systemd-nspawn missing (.ci/run installs them), the Debian archive or the
package index unreachable, or systemd not booting in the container.
``CRUISED_TEST_BOOT=0`` skips it on purpose. The first run builds the rootfs
(minutes); later runs reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from support import nspawn
from support.nspawn import Container, Unavailable, wait_until

ROOT = Path(__file__).resolve().parents[2]
SRC = "/root/cruised"  # where the checkout is inside the container
VENV_PYTHON = "/opt/cruised/venv/bin/python"
PIP_ENV = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/mnt/wheels", "PIP_COMPILE": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
#: a drop-in for the watchdog check only: with the unit's 30 s (and RestartSec=2s) the test would wait that long
WATCHDOG_DROP_IN = "[Service]\nWatchdogSec=2s\nRestartSec=200ms\n"


def install_lines(doc: Path = ROOT / "docs" / "operations.md") -> list[str]:
    """The commands of the ```sh block under "### Install", comments and blank lines left out."""
    text = doc.read_text()
    assert "### Install\n" in text, f"{doc} has no '### Install' section"
    section = text.split("### Install\n", 1)[1]
    assert "```sh\n" in section, "the Install section has no ```sh block"
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]  # a trailing backslash continues a line
    return [line for line in lines if line and not line.startswith("#")]


def test_install_lines_are_found() -> None:
    lines = install_lines()
    assert any("pip install" in line for line in lines)
    assert lines[-1].startswith("usermod -aG cruised ")
    assert any(line.startswith("systemctl enable --now") for line in lines)


# -- the container ---------------------------------------------------------------------------


class Box:
    """The booted container with cruised installed, and what the checks need to ask it."""

    def __init__(self, c: Container) -> None:
        self.c = c
        self.timings: dict[str, float] = {}

    def sh(self, command: Sequence[str] | str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.c.run(command, **kw)

    def show(self, prop: str, unit: str = "cruised.service") -> str:
        return self.sh(f"systemctl show -p {prop} --value {unit}").stdout.strip()

    def active(self, unit: str = "cruised.service") -> str:
        return self.sh(f"systemctl is-active {unit}", check=False).stdout.strip()

    def journal(self, lines: int = 80) -> str:
        return self.sh(f"journalctl --no-pager -o short-monotonic -n {lines} -u cruised.service -u cruised.socket", check=False).stdout

    def status(self) -> dict[str, Any]:
        out = self.sh("cruised status --json", timeout=60)
        status: dict[str, Any] = json.loads(out.stdout)
        return status

    def python(self, script: str, user: str = "alice", timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.c.run([VENV_PYTHON, "-c", script], user=user, timeout=timeout, check=check)

    def service_processes(self) -> dict[int, str]:
        """pid -> start time of every process in cruised.service's cgroup (as the container numbers them)."""
        script = (
            "import json, subprocess\n"
            "cg = subprocess.run(['systemctl', 'show', '-p', 'ControlGroup', '--value', 'cruised.service'], capture_output=True, text=True).stdout.strip()\n"
            "out = {}\n"
            "for base in ('/sys/fs/cgroup/unified', '/sys/fs/cgroup', '/sys/fs/cgroup/systemd'):\n"
            "    try:\n"
            "        pids = open(base + cg + '/cgroup.procs').read().split()\n"
            "    except OSError:\n"
            "        continue\n"
            "    for p in pids:\n"
            "        try:\n"
            "            out[p] = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[19]\n"
            "        except OSError:\n"
            "            pass\n"
            "    break\n"
            "print(json.dumps(out))\n"
        )
        return {int(k): v for k, v in json.loads(self.sh(["python3", "-c", script]).stdout).items()}

    def alive(self, procs: dict[int, str]) -> list[int]:
        """Which of these (pid, start time) are still the same running process."""
        script = (
            "import json, sys\n"
            "left = []\n"
            "for p, start in json.loads(sys.argv[1]).items():\n"
            "    try:\n"
            "        fields = open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()\n"
            "    except OSError:\n"
            "        continue\n"
            "    if fields[19] == start and fields[0] != 'Z':\n"
            "        left.append(int(p))\n"
            "print(json.dumps(left))\n"
        )
        left: list[int] = json.loads(self.sh(["python3", "-c", script, json.dumps({str(k): v for k, v in procs.items()})]).stdout)
        return left

    def busy(self) -> int:
        """Busy workers, from the unit's STATUS= line ("default: 1 idle 1 busy 0 starting, queue 0/16"; at most 1 s old)."""
        words = self.show("StatusText").split()
        return int(words[words.index("busy") - 1]) if "busy" in words else 0

    def wait_active(self, timeout: float = 90) -> None:
        wait_until(lambda: self.active() == "active" and self.show("SubState") == "running", timeout, f"cruised.service to be active\n{self.journal()}", 0.2)


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    if os.environ.get("CRUISED_TEST_BOOT") == "0":
        pytest.skip("CRUISED_TEST_BOOT=0")
    problem = nspawn.host_problem()
    if problem:
        pytest.skip(problem)
    t0 = time.monotonic()
    try:
        root = nspawn.rootfs()
        inside = nspawn.container_python(root)
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if inside != here:
            pytest.skip(f"the wheelhouse is built with this Python ({here}); the container's is {inside}")
        wheels = nspawn.wheelhouse(ROOT)
    except Unavailable as exc:
        pytest.skip(str(exc))
    prepared = time.monotonic()
    work = tmp_path_factory.mktemp("boot")
    src = nspawn.copy_checkout(ROOT, work / "src")
    c = Container(root, work, binds=[(wheels, "/mnt/wheels", True), (src, SRC, False)])
    b = Box(c)
    b.timings["cache"] = prepared - t0
    try:
        try:
            c.start()
        except Unavailable as exc:
            pytest.skip(str(exc))
        booted = time.monotonic()
        b.timings["boot"] = booted - prepared
        # the users of step 5 ("usermod -aG cruised alice"), and one who is not in the group
        b.sh("useradd --create-home alice && useradd --create-home bob")
        for i, line in enumerate(install_lines(), 1):
            started = time.monotonic()
            out = c.run(f"cd {SRC} && {line}", env=PIP_ENV, timeout=600, check=False)
            b.timings[f"step{i}"] = time.monotonic() - started
            assert out.returncode == 0, f"docs/operations.md install step failed: {line}\n{out.stdout}\n{out.stderr}\n{b.journal()}"
        b.timings["install"] = time.monotonic() - booted
        yield b
    finally:
        left = c.stop()
        print(f"\nboot test timings: {', '.join(f'{k} {v:.1f}s' for k, v in b.timings.items())}; boot state {getattr(c, 'boot_state', '?')}")
        assert not left, f"processes left after stopping the container: {left}"


# -- the checks, in order -------------------------------------------------------------------------

CALL = """
import json
import cruised

def add(x, y):
    return x + y

with cruised.session() as s:
    print(json.dumps({"socket": s.path, "sum": s.call(add, 2, 3)}))
"""


def test_install_ends_with_an_active_service_and_its_status_line(box: Box) -> None:
    assert box.active("cruised.socket") == "active"
    assert box.active() == "active", box.journal()
    assert box.sh("systemctl is-enabled cruised.service cruised.socket").stdout.split() == ["enabled", "enabled"]
    status = box.show("StatusText")
    assert status.startswith("default: ") and " idle" in status and "queue" in status, status
    assert box.show("Type") == "notify"
    assert box.sh("test ! -e /bin/kill && test ! -e /usr/bin/kill", check=False).returncode == 0, "the rootfs is meant to lack procps"


def test_a_group_member_calls_without_any_socket_setting(box: Box) -> None:
    out = box.python(CALL, user="alice")
    assert json.loads(out.stdout) == {"socket": "/run/cruised/cruised.sock", "sum": 5}
    st = box.sh("cruised status", user="alice")
    assert "ready" in st.stdout and "socket /run/cruised/cruised.sock" in st.stdout, st.stdout
    # someone outside the group finds the same socket and is refused by its permissions
    refused = box.sh("cruised status", user="bob", check=False)
    assert refused.returncode == 1 and "/run/cruised/cruised.sock" in refused.stderr and "ermission denied" in refused.stderr, refused.stderr


HARDENING = """
import json
import cruised

def identity():
    import os, pwd
    status = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    with open("/tmp/cruised-probe", "w") as fh:  # its private /tmp is writable
        fh.write("ok")
    return {"user": pwd.getpwuid(os.getuid()).pw_name, "NoNewPrivs": status["NoNewPrivs"], "Seccomp": status["Seccomp"], "CapEff": status["CapEff"]}

def write(path):
    with open(path, "w") as fh:
        fh.write("written by a shipped function")
    return "written"

out = {}
with cruised.session() as s:
    out["identity"] = s.call(identity)
    for path in ["/opt/cruised/venv/owned", "/etc/cruised/owned", "/usr/local/owned", "/home/alice/owned"]:
        try:
            out[path] = s.call(write, path)
        except OSError as exc:
            out[path] = f"OSError {exc.errno}"
        except cruised.CruisedError as exc:
            out[path] = f"{type(exc).__name__}: {exc}"
    out["after"] = s.call(identity)["user"]
print(json.dumps(out))
"""


def test_runs_as_cruised_under_the_hardening_and_a_forbidden_write_is_an_error(box: Box) -> None:
    import errno

    main = box.show("MainPID")
    uid = box.sh("id -u cruised").stdout.strip()
    assert box.sh(f"stat -c %u /proc/{main}").stdout.strip() == uid
    out = json.loads(box.python(HARDENING, user="alice").stdout)
    assert out["identity"] == {"user": "cruised", "NoNewPrivs": "1", "Seccomp": "2", "CapEff": "0000000000000000"}, out
    allowed = {f"OSError {e}" for e in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT)}
    for path in ["/opt/cruised/venv/owned", "/etc/cruised/owned", "/usr/local/owned", "/home/alice/owned"]:
        assert out[path] in allowed, (path, out[path])
    assert out["after"] == "cruised"  # the pool still serves
    assert box.sh("ls /opt/cruised/venv/owned /etc/cruised/owned /usr/local/owned /home/alice/owned", check=False).returncode != 0
    st = box.status()
    assert st["pools"]["default"]["requests"].get("crashed", 0) == 0, st
    assert box.show("MainPID") == main and box.show("NRestarts") == "0"


def test_reload_succeeds_and_an_invalid_config_fails_it_while_the_old_generation_serves(box: Box) -> None:
    main = box.show("MainPID")
    before = box.status()["generation"]
    box.sh("systemctl reload cruised", timeout=120)
    assert box.status()["generation"] == before + 1
    assert box.active() == "active" and box.show("MainPID") == main

    box.sh("printf 'pools:\\n  default:\\n    min: lots\\n' > /etc/cruised/config.yaml")
    try:
        failed = box.sh("systemctl reload cruised", check=False, timeout=120)
        assert failed.returncode != 0, failed.stdout + failed.stderr
        assert "cruised.service" in failed.stderr, failed.stderr
        wait_until(lambda: box.active() == "active", 30, "the service to be active after the failed reload")
        assert box.show("MainPID") == main
        assert box.status()["generation"] == before + 1  # the old generation keeps serving
        assert json.loads(box.python(CALL).stdout)["sum"] == 5
        assert "invalid config /etc/cruised/config.yaml" in box.journal(), box.journal()
    finally:
        box.sh(f"cd {SRC} && install -m 0640 -g cruised systemd/config.yaml /etc/cruised/config.yaml")


SLOW = """
import json, time
import cruised

def slow(seconds):
    import time
    time.sleep(seconds)
    return "finished"

with cruised.session() as s:
    t0 = time.monotonic()
    print(json.dumps({"result": s.call(slow, 3.0), "seconds": time.monotonic() - t0}))
"""


def test_stop_lets_a_running_call_finish(box: Box) -> None:
    box.wait_active()
    client = box.c.popen([VENV_PYTHON, "-c", SLOW], user="alice")
    try:
        wait_until(lambda: box.busy() >= 1, 30, "the call to be running", 0.1)
        t0 = time.monotonic()
        box.sh("systemctl stop cruised.service", timeout=90)
        stop_seconds = time.monotonic() - t0
        stdout, stderr = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, 9)
            client.wait()
    assert client.returncode == 0, stderr + box.journal()
    assert json.loads(stdout)["result"] == "finished"
    assert stop_seconds > 0.5, stop_seconds  # the stop waited for the call
    assert box.active() in ("inactive", "failed") and box.show("Result") == "success", box.journal()
    assert box.active("cruised.socket") == "active"


def test_a_connect_starts_the_stopped_service(box: Box) -> None:
    if box.active() == "active":
        box.sh("systemctl stop cruised.service", timeout=90)
    assert box.active() != "active"
    # the connect waits in the socket's backlog while systemd starts the service, which answers
    # as soon as it serves the socket (its pools may still be warming)
    out = box.sh("cruised status", user="alice", timeout=120)
    assert out.stdout.startswith("cruised ") and "socket /run/cruised/cruised.sock" in out.stdout, out.stdout
    box.wait_active()
    assert json.loads(box.python(CALL).stdout)["sum"] == 5
    assert "socket activation: native door on inherited fd 3 (cruised)" in box.journal(200)


def test_the_watchdog_restarts_a_stopped_supervisor_and_nothing_of_it_survives(box: Box) -> None:
    box.sh(f"mkdir -p /etc/systemd/system/cruised.service.d && printf '{WATCHDOG_DROP_IN}' > /etc/systemd/system/cruised.service.d/watchdog.conf")
    box.sh("systemctl daemon-reload && systemctl restart cruised.service", timeout=120)
    box.wait_active()  # READY=1: `min` warm workers
    assert box.show("WatchdogUSec") == "2s"
    main = int(box.show("MainPID"))
    restarts = int(box.show("NRestarts"))
    old = box.service_processes()
    assert main in old and len(old) >= 3, old  # supervisor, template, at least one worker
    box.sh(f"kill -STOP {main}")
    wait_until(
        lambda: box.show("MainPID") not in ("0", str(main)) and int(box.show("NRestarts")) > restarts and box.active() == "active",
        60,
        "systemd to restart the service",
        0.2,
    )
    assert box.alive(old) == [], f"processes of the old instance still running: {box.alive(old)}"
    assert "Watchdog timeout" in box.journal(200)
    box.wait_active()
    assert json.loads(box.python(CALL).stdout)["sum"] == 5
