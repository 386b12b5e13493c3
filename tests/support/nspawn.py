"""A Debian 12 system booted with systemd as PID 1, in a container of the test's own.

Used by tests/integration/test_systemd_boot.py to run docs/operations.md's
install steps the way an operator would. Three parts:

``rootfs()``
    a ``debootstrap --variant=minbase`` root file system with systemd, dbus,
    python3 and python3-venv, built once and cached between runs (under
    ``$CRUISED_TEST_CACHE``, else ``$XDG_CACHE_HOME/cruised-test``, else
    ``~/.cache/cruised-test``; never in the checkout). It is never written
    to afterwards: each container boots it with ``--volatile=overlay``, so
    its changes live in a tmpfs and vanish when it stops.
``wheelhouse()``
    wheels of cruised's dependencies (and of its build backend), built on the
    host with the test's own pip and cached the same way, keyed by the
    dependency list. The container installs from it with ``--no-index``, so
    it needs no network (it has none: ``--private-network``), no proxy and no
    CA bundle, and an install takes seconds, not a download.
``Container``
    ``systemd-nspawn --boot --register=no --keep-unit``: no systemd is needed
    on the host. Commands run inside with ``nsenter`` into its namespaces.
    It runs in cgroups of its own, so teardown can kill whatever is left and
    check that nothing is; teardown always runs.

Whatever the host cannot do raises ``Unavailable`` with the reason, and the
test skips with it. Nothing here sleeps for a fixed time: every wait polls to
a deadline.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

SUITE = "bookworm"
#: what the install needs beyond minbase; procps is left out on purpose (no /bin/kill)
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv")
#: bump to rebuild every cached rootfs
RECIPE_VERSION = 1
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

DEBOOTSTRAP_TIMEOUT = 1200.0
WHEELS_TIMEOUT = 900.0
BOOT_TIMEOUT = 90.0
LOCK_TIMEOUT = 1800.0


class Unavailable(Exception):
    """This host cannot run the container; the message says why."""


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# -- the host ------------------------------------------------------------------------------


def host_problem() -> str | None:
    """Why this host cannot boot the container, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (debootstrap and systemd-nspawn)"
    missing = [tool for tool in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install debootstrap systemd-container; .ci/run does this)"
    return None


def cache_dir() -> Path:
    if os.environ.get("CRUISED_TEST_CACHE"):
        return Path(os.environ["CRUISED_TEST_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cruised-test"


@contextmanager
def _locked(path: Path, what: str) -> Iterator[None]:
    """An exclusive lock between test runs that share the cache (colleagues' suites on one host)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"another test run held {path} for {LOCK_TIMEOUT:.0f}s ({what})") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def debian_mirror() -> str | None:
    """The host's own Debian mirror (apt's sources), so debootstrap goes the way apt goes; None: debootstrap's default."""
    if os.environ.get("CRUISED_TEST_DEBIAN_MIRROR"):
        return os.environ["CRUISED_TEST_DEBIAN_MIRROR"]
    texts = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.suffix in (".list", ".sources") or p.name == "sources.list":
            try:
                texts.append((p.suffix, p.read_text()))
            except OSError:
                continue
    for suffix, text in texts:
        if suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                if any(s in (SUITE, f"{SUITE}-updates") for s in suites) and fields.get("URIs") and fields.get("Enabled", "yes") != "no":
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                    return parts[1]
    return None


def _remove_tree(path: Path) -> None:
    """rm -rf, after unmounting whatever a killed debootstrap left mounted inside (its /proc and /sys)."""
    if not path.exists():
        return
    real = os.path.realpath(path)
    inside = sorted((m for m, _, _ in _mounts() if m == real or m.startswith(real + "/")), key=len, reverse=True)
    for mount in inside:
        subprocess.run(["umount", "--lazy", mount], capture_output=True, timeout=30)
    left = [m for m, _, _ in _mounts() if m == real or m.startswith(real + "/")]
    if left:
        raise Unavailable(f"cannot remove {path}: still mounted there: {', '.join(left)}")
    shutil.rmtree(path, ignore_errors=True)


def rootfs() -> Path:
    """The cached root file system, built on first use (a few minutes); raises Unavailable if it cannot be."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(PACKAGES)} {RECIPE_VERSION}".encode()).hexdigest()[:12]
    cache = cache_dir()
    target = cache / f"rootfs-{SUITE}-{key}"
    if (target / ".cruised-complete").exists():
        return target
    with _locked(cache / "rootfs.lock", "building the rootfs"):
        if (target / ".cruised-complete").exists():
            return target
        for stale in cache.glob(".build-*"):  # a build that was killed; we hold the lock, so nobody else's
            _remove_tree(stale)
        build = cache / f".build-{os.getpid()}"
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(build)]
        mirror = debian_mirror()
        if mirror:
            argv.append(mirror)
        log = cache / "debootstrap.log"
        try:
            with open(log, "wb") as fh:
                out = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, timeout=DEBOOTSTRAP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _remove_tree(build)
            raise Unavailable(f"debootstrap did not finish in {DEBOOTSTRAP_TIMEOUT:.0f}s (log: {log})") from None
        if out.returncode != 0:
            _remove_tree(build)
            raise Unavailable(f"debootstrap {SUITE} failed (exit {out.returncode}; log: {log}):\n{_tail(log.read_text(errors='replace'), 15)}")
        # what apt downloaded is not needed again: keep the cache small
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (build / sub).glob("*"):
                if p.is_file():
                    p.unlink()
        (build / ".cruised-complete").write_text(" ".join(argv) + "\n")
        for old in cache.glob(f"rootfs-{SUITE}-*"):
            _remove_tree(old)  # an older recipe's
        build.rename(target)
    return target


def container_python(root: Path) -> str:
    """``3.11``: the rootfs's python3 version."""
    versions = sorted(p.name[len("python") :] for p in (root / "usr" / "bin").glob("python3.*") if re.fullmatch(r"python3\.\d+", p.name))
    if not versions:
        raise Unavailable(f"no python3 in {root}")
    return versions[-1]


# -- the checkout ----------------------------------------------------------------------------


def copy_checkout(src: Path, dest: Path) -> Path:
    """The working tree as it is (tracked and untracked files, nothing git ignores), without .git or a venv."""
    try:
        out = subprocess.run(
            ["git", "-C", str(src), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            timeout=60,
            check=True,
        )
        names = [n for n in out.stdout.decode().split("\0") if n]
    except (OSError, subprocess.SubprocessError):
        names = []
    if names:
        for name in names:
            s = src / name
            if s.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(s, dest / name)
    else:  # not a git checkout (an unpacked sdist)
        ignore = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.egg-info", "build", "dist", ".*_cache", ".hypothesis")
        shutil.copytree(src, dest, ignore=ignore, dirs_exist_ok=True)
    return dest


def _requirements(src: Path) -> tuple[list[str], list[str]]:
    """(project dependencies, build-system requires) from pyproject.toml."""
    import tomllib  # Python 3.11+: the host's Python equals the container's (bookworm: 3.11), checked before

    data = tomllib.loads((src / "pyproject.toml").read_text())
    return list(data["project"].get("dependencies", [])), list(data.get("build-system", {}).get("requires", []))


#: wheelhouses kept in the cache (the current one included)
KEEP_WHEELHOUSES = 3


def wheelhouse(src: Path) -> Path:
    """Wheels for everything ``pip install .`` of ``src`` needs (cruised itself excepted), cached by the requirement list."""
    deps, build = _requirements(src)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    key = hashlib.sha256(json.dumps([tag, deps, build]).encode()).hexdigest()[:12]
    cache = cache_dir()
    target = cache / f"wheels-{tag}-{key}"
    if (target / ".cruised-complete").exists():
        return target
    with _locked(cache / "wheels.lock", "building the wheelhouse"):
        if (target / ".cruised-complete").exists():
            return target
        for stale in cache.glob(".wheels-*"):
            shutil.rmtree(stale, ignore_errors=True)
        build_dir = cache / f".wheels-{os.getpid()}"
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        steps = [
            [*pip, "wheel", "--quiet", "--wheel-dir", str(build_dir), *deps],
            [*pip, "download", "--quiet", "--only-binary=:all:", "--dest", str(build_dir), *build],
        ]
        for argv in steps:
            try:
                out = subprocess.run(argv, capture_output=True, text=True, timeout=WHEELS_TIMEOUT, stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                shutil.rmtree(build_dir, ignore_errors=True)
                raise Unavailable(f"building the wheelhouse took over {WHEELS_TIMEOUT:.0f}s: {' '.join(argv[3:6])} ...") from None
            if out.returncode != 0:
                shutil.rmtree(build_dir, ignore_errors=True)
                raise Unavailable(f"cannot build the wheelhouse (is the package index reachable?): {' '.join(argv[3:])}:\n{_tail(out.stderr, 15)}")
        (build_dir / ".cruised-complete").write_text("\n".join(deps + build) + "\n")
        build_dir.rename(target)
        # keep the newest few: another checkout's suite (other requirements) may be installing from
        # its own wheelhouse right now, and removing it under that install fails it
        others = sorted((p for p in cache.glob(f"wheels-{tag}-*") if p != target), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[KEEP_WHEELHOUSES - 1 :]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def prepared(src: Path) -> bool:
    """Both caches are there already."""
    deps, build = _requirements(src)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    key = hashlib.sha256(json.dumps([tag, deps, build]).encode()).hexdigest()[:12]
    rkey = hashlib.sha256(f"{SUITE} minbase {','.join(PACKAGES)} {RECIPE_VERSION}".encode()).hexdigest()[:12]
    cache = cache_dir()
    return (cache / f"rootfs-{SUITE}-{rkey}" / ".cruised-complete").exists() and (cache / f"wheels-{tag}-{key}" / ".cruised-complete").exists()


_background: subprocess.Popen[bytes] | None = None


def prepare_in_background(src: Path) -> None:
    """Start building what is missing of the caches in a process of its own, so a cold run overlaps the other tests.

    The test's own ``rootfs()`` and ``wheelhouse()`` then wait for it on the
    cache locks. ``stop_background()`` ends it if the run ends first.
    """
    global _background
    if _background is not None or sys.version_info < (3, 11) or host_problem() is not None or prepared(src):
        return
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from pathlib import Path\n"
        "from support import nspawn\n"
        "try:\n"
        "    nspawn.rootfs()\n"
        f"    nspawn.wheelhouse(Path({str(src)!r}))\n"
        "except nspawn.Unavailable as exc:\n"
        "    print(exc)\n"
    )
    with open(cache / "prepare.log", "ab") as log:
        _background = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cache
        )


def stop_background() -> None:
    """End an unfinished background build (its partial directory is removed by the next build)."""
    global _background
    proc, _background = _background, None
    if proc is None or proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            pass
        try:
            proc.wait(10)
            return
        except subprocess.TimeoutExpired:
            continue


# -- cgroups -----------------------------------------------------------------------------------


def _mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, options) of every mount."""
    out = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 4:
                out.append((parts[1].replace("\\040", " "), parts[2], parts[3]))
    return out


def _own_cgroup(hierarchy: str) -> str:
    """This process's cgroup path in a hierarchy: ``""`` for the unified one, ``name=systemd`` for v1's."""
    with open("/proc/self/cgroup") as fh:
        for line in fh:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == hierarchy:
                return path
    return "/"


def cgroup_hierarchies() -> list[tuple[Path, str]]:
    """(mount point, our path in it) of the hierarchies systemd in the container uses.

    On a cgroup v1 (or hybrid) host, systemd 252 under nspawn needs a
    ``name=systemd`` hierarchy; it is mounted here when the host has none.
    """
    mounts = _mounts()
    unified = [m for m, t, _ in mounts if t == "cgroup2"]
    named = [m for m, t, o in mounts if t == "cgroup" and "name=systemd" in o.split(",")]
    out: list[tuple[Path, str]] = []
    if unified:
        out.append((Path(unified[0]), _own_cgroup("")))
    if Path("/sys/fs/cgroup") not in [Path(u) for u in unified]:  # v1 or hybrid
        if not named:
            where = Path("/sys/fs/cgroup/systemd")
            try:
                where.mkdir(exist_ok=True)
                subprocess.run(["mount", "-t", "cgroup", "-o", "none,name=systemd", "cgroup", str(where)], check=True, capture_output=True, timeout=30)
            except (OSError, subprocess.SubprocessError) as exc:
                raise Unavailable(
                    f"systemd cannot boot under nspawn on this cgroup v1 host: no name=systemd hierarchy, and mounting one at {where} failed ({exc})"
                ) from None
            named = [str(where)]
        out.append((Path(named[0]), _own_cgroup("name=systemd")))
    if not out:
        raise Unavailable("systemd cannot boot under nspawn here: no cgroup hierarchy is mounted")
    return out


def _cgroup_pids(group: Path) -> list[int]:
    pids: list[int] = []
    for procs in group.rglob("cgroup.procs"):
        try:
            pids.extend(int(p) for p in procs.read_text().split())
        except OSError:
            continue
    return pids


def _remove_cgroup(group: Path) -> None:
    for d in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            d.rmdir()
        except OSError:
            pass
    try:
        group.rmdir()
    except OSError:
        pass


# -- the container -------------------------------------------------------------------------------


def _proc_field(pid: int, name: str) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(name + ":"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


class Container:
    """One booted container; ``stop()`` (always called, also after a failed start) leaves nothing behind."""

    def __init__(self, root: Path, workdir: Path, binds: Sequence[tuple[Path, str, bool]] = ()) -> None:
        self.root = root
        self.workdir = workdir
        self.binds = binds  # (host path, container path, read-only)
        self.name = f"cruised-test-{os.getpid()}-{int(time.time() * 1000) % 100000}"
        self.log_path = workdir / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None  # the container's PID 1, as the host numbers it
        self.pidns: int | None = None  # inode of its pid namespace
        self.cgroups: list[Path] = []

    # -- start ----------------------------------------------------------------------------

    def start(self) -> Container:
        for mount, own in cgroup_hierarchies():
            group = mount / own.lstrip("/") / self.name
            try:
                group.mkdir(parents=True)
            except OSError as exc:
                raise Unavailable(f"cannot create a cgroup for the container ({group}): {exc.strerror or exc}") from None
            self.cgroups.append(group)
        groups = [str(g / "cgroup.procs") for g in self.cgroups]

        def enter_cgroups() -> None:  # in the child, before exec: nspawn and all it starts live in our cgroups
            for procs in groups:
                with open(procs, "w") as fh:
                    fh.write(str(os.getpid()))

        argv = [
            "systemd-nspawn",
            "--quiet",
            "--boot",
            "--register=no",  # no machined, no host systemd needed
            "--keep-unit",
            "--private-network",  # nothing inside can reach anything outside
            "--volatile=overlay",  # the cached rootfs is never written
            "--console=read-only",
            "--resolv-conf=off",
            "--timezone=off",
            f"--machine={self.name}",
            f"--directory={self.root}",
        ]
        for host, inside, ro in self.binds:
            argv.append(f"--bind{'-ro' if ro else ''}={host}:{inside}")
        env = {"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_NSPAWN_LOCK": "0"}  # several runs may share the read-only image
        self._log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=enter_cgroups
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise Unavailable(f"cannot start systemd-nspawn in its cgroups {groups}: {exc}") from None
        deadline = time.monotonic() + BOOT_TIMEOUT
        while self.init_pid is None:
            if self.proc.poll() is not None:
                raise Unavailable(f"systemd-nspawn exited with {self.proc.returncode} before systemd started:\n{_tail(self.console())}")
            if time.monotonic() > deadline:
                raise Unavailable(f"systemd did not start in the container within {BOOT_TIMEOUT:.0f}s:\n{_tail(self.console())}")
            self.init_pid = self._find_init()
            if self.init_pid is None:
                time.sleep(0.05)
        self.pidns = os.stat(f"/proc/{self.init_pid}/ns/pid").st_ino
        state = ""
        while True:
            if self.proc.poll() is not None:
                raise Unavailable(f"the container stopped while booting (exit {self.proc.returncode}):\n{_tail(self.console())}")
            out = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
            state = out.stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise Unavailable(f"systemd did not finish booting within {BOOT_TIMEOUT:.0f}s (state {state!r}):\n{_tail(self.console())}")
            time.sleep(0.2)
        self.boot_state = state
        return self

    def _find_init(self) -> int | None:
        assert self.proc is not None
        for pid in _pids():
            if _proc_field(pid, "PPid") == str(self.proc.pid):
                nspid = (_proc_field(pid, "NSpid") or "").split()
                if len(nspid) >= 2 and nspid[-1] == "1":
                    return pid
        return None

    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- commands inside ------------------------------------------------------------------

    def argv(self, command: Sequence[str] | str, user: str | None = None, env: dict[str, str] | None = None) -> list[str]:
        """nsenter into every namespace of the container; a clean environment; ``user`` through runuser."""
        assert self.init_pid is not None
        home = "/root" if user is None else f"/home/{user}"
        base = {"PATH": PATH, "LANG": "C.UTF-8", "HOME": home}
        base.update(env or {})
        cmd = ["sh", "-c", command] if isinstance(command, str) else list(command)
        if user is not None:
            cmd = ["runuser", "-u", user, "--", *cmd]
        return ["nsenter", f"--target={self.init_pid}", "--all", "--", "env", "-i", *(f"{k}={v}" for k, v in base.items()), *cmd]

    def run(
        self,
        command: Sequence[str] | str,
        user: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
        check: bool = True,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = self.argv(command, user, env)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{command!r} took over {timeout}s:\n{stdout}\n{stderr}") from None
        out = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        if check and out.returncode != 0:
            raise AssertionError(f"{command!r} exited {out.returncode}:\n{stdout}\n{stderr}")
        return out

    def popen(self, command: Sequence[str] | str, user: str | None = None, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(command, user, env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )

    # -- stop -------------------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """Processes still in the container's pid namespace or its cgroups."""
        out = []
        for pid in _pids():
            try:
                if self.pidns is not None and os.stat(f"/proc/{pid}/ns/pid").st_ino == self.pidns:
                    out.append(f"{pid} (pid namespace)")
            except OSError:
                continue
        for group in self.cgroups:
            out.extend(f"{pid} (cgroup {group})" for pid in _cgroup_pids(group))
        return out

    def stop(self, timeout: float = 30) -> list[str]:
        """Power off (SIGTERM to nspawn), then kill whatever is left; what was still there after the kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.init_pid is not None and self.pidns is not None:
            try:
                if os.stat(f"/proc/{self.init_pid}/ns/pid").st_ino == self.pidns:
                    os.kill(self.init_pid, signal.SIGKILL)  # the namespace's init: every process in it dies too
            except OSError:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for group in self.cgroups:
            kill = group / "cgroup.kill"
            if kill.exists():
                try:
                    kill.write_text("1")
                except OSError:
                    pass
            for pid in _cgroup_pids(group):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        try:
            wait_until(lambda: not self.leftovers(), 15, "the container's processes to exit")
        except AssertionError:
            pass
        left = self.leftovers()
        for group in self.cgroups:
            _remove_cgroup(group)
        shutil.rmtree(Path("/run/systemd/nspawn/propagate") / self.name, ignore_errors=True)
        if hasattr(self, "_log"):
            self._log.close()
        return left
