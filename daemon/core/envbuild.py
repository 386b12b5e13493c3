"""Code envs built from a definition (``pools.<name>.code_env``), as the DSS API node installs them.

A definition is a list of requirement lines (or a requirements file) and an
interpreter (a path, or a version such as ``"3.11"``). cruised builds the env
itself, once per definition, into ``daemon.env_dir``, and reuses it for every
pool, generation and restart with the same definition.

The key
    ``py<major>.<minor>-<16 hex digits>``: a SHA-256 over the normalised
    requirement lines (``-r`` files inlined, relative paths made absolute,
    comments and continuations resolved), the contents of any ``-c``
    constraint file they name, the base interpreter (its real path, its
    major.minor version, implementation and machine) and ``LAYOUT`` (bumped
    when the way envs are built changes). Nothing else goes in: in
    particular not cruised's version, because the env holds only the
    definition's packages. The workers' own code (``cruised.pool``) and the
    daemon's ``cloudpickle`` reach the env's interpreter through the same shim as a
    ``pools.<name>.python`` env (core/codeenv.py: a path entry put first at
    template start), so after a cruised upgrade a built env is still valid and
    its workers speak the new daemon's wire format. The patch version of the
    interpreter is left out too: a venv keeps working across patch releases of
    its base interpreter (same ABI). A base interpreter that disappears (its
    ``bin/python`` link dangles) makes the env invalid, and it is rebuilt.

On disk (``env_dir``)::

    py3.11-0123456789abcdef -> py3.11-0123456789abcdef.build-<id>    the env in use (a symlink)
    py3.11-0123456789abcdef.build-<id>/    a venv + requirements.txt + cruised-env.json
    py3.11-0123456789abcdef.lock           flock: EX while building or pruning, SH while a pool uses it

    A build runs in a fresh ``<key>.build-<id>`` directory and is published by
    renaming a symlink over ``<key>`` (atomic), after its marker
    (``cruised-env.json``) is written: a half-built env is never pointed at,
    and is removed by the next build of that key or by ``cruised env prune``.
    The directory itself never moves: a venv is not relocatable (pip writes
    its absolute path into the shebangs of console scripts).

Locks
    One lock file per key. A build holds it exclusively, so concurrent builds
    of one key (two daemons, or ``cruised env build`` while the daemon builds)
    run once: the second waits, then finds the env built. A pool holds it
    shared for as long as it runs on the env, so ``cruised env prune`` (which
    needs it exclusively) never removes an env that a running daemon uses.
    Locks are polled (``LOCK_NB``), never awaited in a thread: the event loop
    never blocks and a shutdown never waits on one. Within one process, pools
    with the same definition share one build (``_Build``).

Builders
    ``uv`` when an ``uv`` executable is found (on PATH, beside the daemon's
    interpreter, or the ``uv`` package's own): ``uv venv`` then
    ``uv pip install --compile-bytecode -r``. Otherwise ``python -m venv
    --without-pip`` and the daemon's own pip installing into it
    (``pip --python``), or, if the daemon has no pip, a venv with pip and that
    pip. ``daemon.env_builder`` forces one. The builder runs as a subprocess
    in a session of its own (so a timeout or a shutdown kills it and whatever
    it started), its output read line by line off the event loop into the
    pool's status and the log, bounded by ``daemon.env_build_timeout``.

The pool's side (``PoolEnv``)
    The launcher asks ``PoolEnv.start`` before it starts a template: until
    the env is ready, no template and no worker starts (the dispatcher's
    ``manage`` asks ``ready`` too), the pool's status shows ``building env``
    with the elapsed time and the builder's last line, and its endpoints
    answer 503 ``PoolUnavailable`` saying so. When the build is done the
    template starts as for any pool; when it fails, the builder's error
    becomes the pool's ``last_error`` (status, log, systemd STATUS, 503
    answers) and nothing is retried until a reload.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cruised import __version__
from cruised.config import PYTHON_VERSION

if TYPE_CHECKING:
    from cruised.config import CodeEnvConfig, DaemonConfig, PoolConfig
    from cruised.core.launcher import PoolLauncher

log = logging.getLogger("cruised.envbuild")

#: part of every key: bump it when the way an env is built changes, so every env is built anew
LAYOUT = 1
MARKER = "cruised-env.json"
REQUIREMENTS = "requirements.txt"
#: a key: the interpreter's version, then 16 hex digits of the definition's hash
KEY_RE = re.compile(r"^py\d+\.\d+-[0-9a-f]{16}$")
BUILD_INFIX = ".build-"
#: seconds between attempts at a lock another process holds
LOCK_POLL = 0.1
#: builder output lines kept to explain a failure
TAIL = 40
#: longest an interpreter may take to say what it is
PROBE_TIMEOUT = 60.0
#: pip's ``--python`` (pip installing into another interpreter's environment) appeared in pip 22.3
PIP_PYTHON_OPTION = (22, 3)


class DefinitionError(Exception):
    """A definition that cannot be read: ``where`` is the key under ``code_env`` (``requirements[2]``, ``requirements_file``)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


class BuildError(Exception):
    """A build (or the interpreter behind it) failed; the message says why, in one line."""


# -- requirement lines -----------------------------------------------------------------------

#: options a requirements file may hold (pip's list; uv reads the same ones), and whether each takes a value
OPTIONS: dict[str, bool] = {
    "-i": True,
    "--index-url": True,
    "--extra-index-url": True,
    "--no-index": False,
    "-c": True,
    "--constraint": True,
    "-r": True,
    "--requirement": True,
    "-e": True,
    "--editable": True,
    "-f": True,
    "--find-links": True,
    "--no-binary": True,
    "--only-binary": True,
    "--prefer-binary": False,
    "--require-hashes": False,
    "--pre": False,
    "--trusted-host": True,
    "--use-feature": True,
    "--config-settings": True,
}
#: options whose value may be a local path: made absolute, so the builder reads what the author meant
PATH_OPTIONS = {"-c", "--constraint", "-r", "--requirement", "-e", "--editable", "-f", "--find-links"}
_INCLUDE = {"-r", "--requirement"}
_CONSTRAINT = {"-c", "--constraint"}
#: deepest chain of ``-r`` includes followed
MAX_INCLUDE_DEPTH = 16


def split_option(line: str) -> tuple[str, str] | None:
    """``--find-links DIR``, ``--find-links=DIR``, ``-f DIR``, ``-fDIR`` -> (option, value); None for a requirement."""
    if not line.startswith("-"):
        return None
    if line.startswith("--"):
        head, _, rest = line.partition(" ")
        name, eq, value = head.partition("=")
        return name, (value if eq else rest).strip()
    return line[:2], line[2:].strip()


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a requirements file: continuations joined, comments and blank lines dropped."""
    out: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\"):
            pending += raw[:-1]
            continue
        line = _strip_comment(pending + raw)
        pending = ""
        if line:
            out.append((start, line))
    if pending and (line := _strip_comment(pending)):
        out.append((start, line))
    return out


def _strip_comment(line: str) -> str:
    line = line.strip()
    if line.startswith("#"):
        return ""
    return re.split(r"\s+#", line, maxsplit=1)[0].strip()


def line_problem(line: str) -> str | None:
    """Why ``line`` cannot be a requirement line (config validation), or None."""
    if not line.strip():
        return "is empty"
    if "\n" in line:
        return "holds a line break: give one requirement per list item"
    opt = split_option(line.strip())
    if opt is None:
        return None
    name, value = opt
    if name not in OPTIONS:
        known = ", ".join(sorted(o for o in OPTIONS if o.startswith("--")))
        return f"unknown option {name} (a requirements file accepts {known})"
    if OPTIONS[name] and not value:
        return f"option {name} needs a value"
    if not OPTIONS[name] and value:
        return f"option {name} takes no value, got {value!r}"
    return None


def _is_local(value: str) -> bool:
    return "://" not in value and not value.startswith(("git+", "hg+", "svn+", "bzr+"))


def absolute(value: str, base: str) -> str:
    """A local path ``value`` made absolute against ``base``; URLs untouched."""
    if not _is_local(value):
        return value
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def resolve_paths(lines: Iterable[str], base: str) -> list[str]:
    """Inline requirement lines with their relative paths (option values, ``./pkg`` lines) made absolute against ``base``."""
    out = []
    for raw in lines:
        line = raw.strip()
        opt = split_option(line)
        if opt is not None and opt[0] in PATH_OPTIONS and opt[1]:
            line = f"{opt[0]} {absolute(opt[1], base)}"
        elif opt is None and line.startswith(("./", "../")):
            line = absolute(line, base)
        out.append(line)
    return out


@dataclass(frozen=True)
class Definition:
    """What an env is built from, read and normalised: the requirement lines and the digests of the constraint files they name."""

    lines: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    python: str | None  # as configured: a path, a version, or None for the daemon's own


def read_definition(spec: CodeEnvConfig) -> Definition:
    """The definition of ``spec``, from its inline lines or its requirements file (read now); DefinitionError if it cannot be read."""
    files: dict[str, str] = {}
    if spec.requirements_file is not None:
        path = spec.requirements_file
        lines = _read_file(path, "requirements_file", files, set(), 0)
    else:
        lines = []
        for i, raw in enumerate(spec.requirements):
            problem = line_problem(raw)
            if problem is not None:
                raise DefinitionError(f"requirements[{i}]", problem)
            lines.extend(_normalise(raw.strip(), os.getcwd(), f"requirements[{i}]", files, set(), 0))
    return Definition(tuple(lines), tuple(sorted(files.items())), spec.python)


def _read_file(path: str, where: str, files: dict[str, str], seen: set[str], depth: int) -> list[str]:
    if depth > MAX_INCLUDE_DEPTH:
        raise DefinitionError(where, f"-r includes nest deeper than {MAX_INCLUDE_DEPTH} ({path})")
    real = os.path.realpath(path)
    if real in seen:
        raise DefinitionError(where, f"{path} includes itself (-r)")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise DefinitionError(where, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DefinitionError(where, f"{path} is not UTF-8 text") from None
    base = os.path.dirname(os.path.abspath(path))
    out: list[str] = []
    for number, line in logical_lines(text):
        here = f"{where}: {path} line {number}" if depth else f"{where}: line {number}"
        problem = line_problem(line)
        if problem is not None:
            raise DefinitionError(where, f"{here[len(where) + 2 :]}: {problem}")
        out.extend(_normalise(line, base, where, files, seen | {real}, depth))
    return out


def _normalise(line: str, base: str, where: str, files: dict[str, str], seen: set[str], depth: int) -> list[str]:
    opt = split_option(line)
    if opt is None:
        return [absolute(line, base) if line.startswith(("./", "../")) else line]
    name, value = opt
    if name in PATH_OPTIONS and value:
        value = absolute(value, base)
    if name in _INCLUDE:
        return _read_file(value, where, files, seen, depth + 1)
    if name in _CONSTRAINT and _is_local(value):
        try:
            with open(value, "rb") as fh:
                files[value] = hashlib.sha256(fh.read()).hexdigest()
        except OSError as exc:
            raise DefinitionError(where, f"cannot read constraint file {value}: {exc.strerror or exc}") from None
    return [f"{name} {value}" if value else name]


def check(spec: CodeEnvConfig) -> DefinitionError | None:
    """Config validation: the first problem reading ``spec``'s definition, or None."""
    try:
        read_definition(spec)
    except DefinitionError as exc:
        return exc
    return None


# -- the interpreter ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Interpreter:
    """A base interpreter as it describes itself."""

    executable: str  # the real path of the base interpreter (a venv's python resolves to its base)
    version: tuple[int, int, int]
    implementation: str
    machine: str

    @property
    def minor(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    def identity(self) -> list[str]:
        """What of it goes into the key (not the patch version: a venv survives patch upgrades of its base)."""
        return [self.executable, self.minor, self.implementation, self.machine]


_PROBE = (
    "import json, os, platform, sys; "
    "b = getattr(sys, '_base_executable', None) or sys.executable; "
    "print(json.dumps({'executable': os.path.realpath(b), 'version': list(sys.version_info[:3]), "
    "'implementation': sys.implementation.name, 'machine': platform.machine()}))"
)
_probes: dict[tuple[str, int, int], Interpreter] = {}


def find_on_path(version: str) -> str | None:
    """``python3.11`` on PATH for ``"3.11"``."""
    return shutil.which(f"python{version}")


async def resolve_interpreter(spec: str | None, uv: str | None, deadline: float) -> str:
    """The interpreter to build from: the daemon's own (None), ``pythonX.Y`` on PATH or uv's find (a version), or the path as is."""
    if spec is None:
        return sys.executable
    if PYTHON_VERSION.match(spec) is None:
        return spec
    found = find_on_path(spec)
    if found is not None:
        return found
    if uv is None:
        raise BuildError(f'python "{spec}": no python{spec} on PATH, and no uv to look further (install uv, or give the interpreter\'s path)')
    code, out = await _capture([uv, "python", "find", spec], deadline)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    if code != 0 or not lines:
        raise BuildError(f'python "{spec}": no python{spec} on PATH, and uv found none: {_summary(lines) or f"exit code {code}"}')
    return lines[-1].strip()


async def probe(python: str, deadline: float) -> Interpreter:
    """Run ``python`` once and ask what it is (cached while its file does not change)."""
    try:
        st = os.stat(python)
    except OSError as exc:
        raise BuildError(f"no such interpreter: {python} ({exc.strerror})") from None
    cache_key = (os.path.realpath(python), st.st_mtime_ns, st.st_ino)
    known = _probes.get(cache_key)
    if known is not None:
        return known
    code, out = await _capture([python, "-I", "-c", _PROBE], min(deadline, time.monotonic() + PROBE_TIMEOUT))
    lines = [ln for ln in out.splitlines() if ln.strip()]
    try:
        info = json.loads(lines[-1]) if code == 0 and lines else None
    except ValueError:
        info = None
    if not isinstance(info, dict):
        last = lines[-1].strip() if lines else f"exit code {code}, no output"
        raise BuildError(f"{python} is not a working Python interpreter: {last}")
    v = info["version"]
    interp = Interpreter(str(info["executable"]), (int(v[0]), int(v[1]), int(v[2])), str(info["implementation"]), str(info["machine"]))
    if interp.version[:2] < (3, 10):
        raise BuildError(f"{python} is Python {interp.minor}; cruised's workers need 3.10 or later")
    _probes[cache_key] = interp
    return interp


def env_key(interp: Interpreter, definition: Definition) -> str:
    """The cache key of ``definition`` built on ``interp`` (see the module docstring)."""
    blob = json.dumps({"layout": LAYOUT, "python": interp.identity(), "requirements": list(definition.lines), "files": list(definition.files)}, sort_keys=True)
    return f"py{interp.minor}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


async def key_of(spec: CodeEnvConfig) -> str:
    """The key ``spec`` builds to, found without building (``cruised env list`` and ``prune``); BuildError or DefinitionError."""
    deadline = time.monotonic() + PROBE_TIMEOUT
    definition = read_definition(spec)
    python = await resolve_interpreter(spec.python, find_uv(), deadline)
    return env_key(await probe(python, deadline), definition)


# -- the cache directory -----------------------------------------------------------------------


def state_dir(env: dict[str, str] | None = None) -> str:
    """cruised's state directory: ``$STATE_DIRECTORY`` (systemd's StateDirectory=), /var/lib/cruised when
    writable, else ``$XDG_STATE_HOME/cruised`` or ``~/.local/state/cruised``."""
    env = dict(os.environ) if env is None else env
    sd = env.get("STATE_DIRECTORY")
    if sd:
        return sd.split(":")[0]
    system = "/var/lib/cruised"
    if os.path.isdir(system) and os.access(system, os.W_OK):
        return system
    xdg = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(xdg, "cruised")


def env_dir(daemon: DaemonConfig) -> Path:
    """Where this daemon's code envs live (``daemon.env_dir``, default ``envs`` in the state directory)."""
    return Path(daemon.env_dir if daemon.env_dir else os.path.join(state_dir(), "envs"))


@dataclass
class Entry:
    """One key found in an env directory (``cruised env list``)."""

    key: str
    path: Path | None  # the published env, if valid
    marker: dict[str, Any]
    size: int
    in_use: bool  # a process holds its lock (a running pool, or a build)
    leftovers: list[Path]  # unpublished build directories (crashed or replaced builds)


class Cache:
    """The env directory: lookups, locks, publishing, listing and pruning (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def lookup(self, key: str) -> Path | None:
        """The published, complete env of ``key`` (its real directory), or None."""
        link = self.root / key
        try:
            target = self.root / os.readlink(link)
        except OSError:
            return None
        if not (target / MARKER).is_file() or not os.path.exists(target / "bin" / "python"):
            return None  # incomplete, or its base interpreter is gone (the link dangles)
        return target

    def marker(self, target: Path) -> dict[str, Any]:
        try:
            with open(target / MARKER, encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def lock_path(self, key: str) -> Path:
        return self.root / f"{key}.lock"

    def try_lock(self, key: str, exclusive: bool) -> int | None:
        """The lock of ``key`` taken now (its descriptor: close it to release), or None if another holder prevents it."""
        path = self.lock_path(key)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # an env directory another user made: flock needs no write access
            try:
                fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # a prune removed the file between open and flock: lock the new one

    async def lock(self, key: str, exclusive: bool, deadline: float, waiting: Callable[[], None] | None = None) -> int:
        """``try_lock`` polled until ``deadline`` (never blocking the loop); BuildError after it."""
        while True:
            fd = self.try_lock(key, exclusive)
            if fd is not None:
                return fd
            if waiting is not None:
                waiting()
            if time.monotonic() > deadline:
                what = "build" if exclusive else "use"
                raise BuildError(f"timed out waiting for the lock of code env {key} (to {what} it): another build or a prune held it")
            await asyncio.sleep(LOCK_POLL)

    def leftovers(self, key: str, keep: Path | None) -> list[Path]:
        """Build directories of ``key`` that are not the published env."""
        prefix = key + BUILD_INFIX
        return sorted(p for p in self.root.glob(prefix + "*") if p.is_dir() and not p.is_symlink() and p != keep)

    def remove_stale(self, key: str) -> None:
        """Under the exclusive lock: a link to an invalid env and every unpublished build of ``key``."""
        current = self.lookup(key)
        if current is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.root / key)
        for path in self.leftovers(key, current):
            shutil.rmtree(path, ignore_errors=True)

    def publish(self, key: str, target: Path) -> None:
        """Point ``key`` at the finished build ``target``, atomically."""
        tmp = self.root / f".{key}.link-{secrets.token_hex(4)}"
        os.symlink(target.name, tmp)
        os.replace(tmp, self.root / key)

    def keys(self) -> list[str]:
        found = set()
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        for name in names:
            key = name.split(".lock")[0].split(BUILD_INFIX)[0]
            if KEY_RE.match(key):
                found.add(key)
        return sorted(found)

    def entries(self) -> list[Entry]:
        out = []
        for key in self.keys():
            path = self.lookup(key)
            fd = self.try_lock(key, exclusive=True)
            in_use = fd is None
            if fd is not None:
                os.close(fd)
            leftovers = self.leftovers(key, path)
            if path is None and not leftovers:
                continue  # only a lock file (a build that failed, or one not started)
            out.append(Entry(key, path, self.marker(path) if path else {}, dir_size(path) if path else 0, in_use, leftovers))
        return out

    def prune(self, keep: set[str], dry_run: bool = False) -> tuple[list[str], list[str]]:
        """Remove every env whose key is not in ``keep`` and that nothing uses, and unpublished builds.

        Returns (removed: one line each, kept in use: keys). An env in use (its lock held by a
        running pool or a build) is never touched.
        """
        removed: list[str] = []
        busy: list[str] = []
        for key in self.keys():
            fd = self.try_lock(key, exclusive=True)
            if fd is None:
                busy.append(key)
                continue
            try:
                current = self.lookup(key)
                for path in self.leftovers(key, current):
                    removed.append(f"{path.name} (unfinished build)")
                    if not dry_run:
                        shutil.rmtree(path, ignore_errors=True)
                if key in keep:
                    continue
                if current is not None:
                    removed.append(f"{key} ({human_size(dir_size(current))})")
                    if not dry_run:
                        os.unlink(self.root / key)
                        shutil.rmtree(current, ignore_errors=True)
                elif os.path.lexists(self.root / key) and not dry_run:
                    os.unlink(self.root / key)
                if not dry_run:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.lock_path(key))  # lockers check the inode after locking (try_lock)
            finally:
                os.close(fd)
        return removed, busy


def dir_size(path: Path) -> int:
    """Bytes in the files under ``path`` (each inode once; symlinks not followed)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


# -- builders ------------------------------------------------------------------------------------


def find_uv() -> str | None:
    """An ``uv`` executable: on PATH, beside the daemon's interpreter (its venv's bin), or the ``uv`` package's own."""
    found = shutil.which("uv")
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), "uv")
    if os.access(beside, os.X_OK):
        return beside
    if importlib.util.find_spec("uv") is not None:
        try:
            import uv  # type: ignore[import-not-found, unused-ignore]  # optional: PyPI's uv ships its binary with a finder

            path = str(uv.find_uv_bin())
        except (ImportError, FileNotFoundError, AttributeError):
            return None
        return path if os.access(path, os.X_OK) else None
    return None


def pip_version() -> tuple[int, ...] | None:
    """The version of the daemon's own pip, or None without one."""
    from importlib import metadata

    try:
        text = metadata.version("pip")
    except metadata.PackageNotFoundError:
        return None
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


@dataclass(frozen=True)
class Builder:
    """How envs are built: ``uv``, or ``venv+pip`` (with the daemon's own pip when it has one, else the env's)."""

    name: str
    uv: str | None = None
    daemon_pip: bool = False

    def venv_step(self, python: str, target: Path) -> tuple[str, list[str]]:
        """(name, argv) creating the venv ``target`` on the base interpreter ``python``."""
        if self.uv is not None:
            return "uv venv", [self.uv, "venv", "--no-project", "--python", python, str(target)]
        if self.daemon_pip:
            return "venv", [python, "-m", "venv", "--without-pip", str(target)]
        return "venv", [python, "-m", "venv", str(target)]  # with ensurepip: slower, but needs nothing of the daemon's

    def install_step(self, target: Path, requirements: Path) -> tuple[str, list[str]]:
        """(name, argv) installing the requirements file into ``target``."""
        env_python = str(target / "bin" / "python")
        if self.uv is not None:
            return "uv pip install", [self.uv, "pip", "install", "--python", env_python, "--compile-bytecode", "-r", str(requirements)]
        options = ["install", "--no-input", "--disable-pip-version-check", "--progress-bar", "off", "-r", str(requirements)]
        if self.daemon_pip:
            return "pip install", [sys.executable, "-m", "pip", "--python", env_python, *options]
        return "pip install", [env_python, "-m", "pip", *options]


def pick_builder(setting: str) -> Builder:
    """The builder ``daemon.env_builder`` asks for (auto: uv when found); BuildError if it is not available."""
    uv = find_uv() if setting in ("auto", "uv") else None
    if uv is not None:
        return Builder("uv", uv=uv)
    if setting == "uv":
        raise BuildError("daemon.env_builder is uv, but no uv executable was found (pip install uv, or put it on PATH)")
    pip = pip_version()
    return Builder("venv+pip", daemon_pip=pip is not None and pip >= PIP_PYTHON_OPTION)


def builder_env() -> dict[str, str]:
    """The builder's environment: the daemon's (proxies, PIP_* and UV_* settings apply), minus what would point it elsewhere."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PIP_TARGET", "PIP_PREFIX", "PIP_USER", "UV_PROJECT_ENVIRONMENT"):
        env.pop(name, None)
    env["PIP_NO_INPUT"] = "1"
    env.setdefault("UV_NO_PROGRESS", "1")
    return env


# -- running one build -------------------------------------------------------------------------


class _Build:
    """One build of one key in this process; every pool with that definition waits for it (and shows its progress)."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.last_line = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL)
        self.waiting_for_lock = False
        self.ran = False  # this process ran the builder (False: another process built it meanwhile)
        self.builder = ""
        self.build_s = 0.0
        self.task: asyncio.Task[Path] | None = None
        self.waiters = 0
        #: who else shows the output (``cruised env build`` prints it), each once
        self.echoes: list[Callable[[str, str], None]] = []

    def line(self, text: str) -> None:
        text = text.rstrip()
        if not text:
            return
        self.last_line = text
        self.tail.append(text)
        log.info("code env %s: %s", self.key, text)
        for echo in self.echoes:
            echo(self.key, text)


#: builds running in this process, by env path
_builds: dict[str, _Build] = {}


async def _capture(argv: list[str], deadline: float) -> tuple[int, str]:
    """Run a short command (an interpreter probe, ``uv python find``): exit code and output, killed at ``deadline``."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=builder_env(), start_new_session=True
        )
    except OSError as exc:
        raise BuildError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise BuildError(f"{argv[0]} did not answer in time") from None
    finally:
        await _reap(proc)
    return proc.returncode if proc.returncode is not None else -1, out.decode("utf-8", "replace")


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill ``proc``'s whole session if it still runs, and wait for it."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _run_step(name: str, argv: list[str], build: _Build, deadline: float, cwd: Path, timeout: float) -> None:
    """One builder step, its output line by line into ``build``; BuildError if it fails or outlives ``deadline``."""
    build.line(f"$ {' '.join(argv)}")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(cwd), env=builder_env(), start_new_session=True
        )
    except OSError as exc:
        raise BuildError(f"{name}: cannot run {argv[0]}: {exc.strerror or exc}") from None
    assert proc.stdout is not None
    pending = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(proc.stdout.read(65536), remaining)
            if not chunk:
                break
            pending += chunk
            *lines, pending = re.split(rb"\r\n|\r|\n", pending)
            for raw in lines:
                build.line(raw.decode("utf-8", "replace"))
            if len(pending) > 65536:
                build.line(pending.decode("utf-8", "replace"))
                pending = b""
        if pending:
            build.line(pending.decode("utf-8", "replace"))
        code = await asyncio.wait_for(proc.wait(), max(0.1, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise BuildError(f"{name} did not finish within daemon.env_build_timeout ({timeout:g}s); it was killed") from None
    finally:
        await _reap(proc)
    if code != 0:
        how = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
        raise BuildError(f"{name} failed ({how}): {_summary(list(build.tail)) or 'no output'}")


def _summary(lines: list[str]) -> str:
    """The builder's error in one line: from its last line that starts with "error" to the end (uv and pip both say so), else its last line."""
    lines = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("$ ")]
    if not lines:
        return ""
    start = len(lines) - 1
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"(?i)error\b", lines[i]) or lines[i].startswith("×"):
            start = i
            break
    text = " ".join(lines[start:])
    return text if len(text) <= 600 else text[:597] + "..."


async def _build(cache: Cache, key: str, python: str, interp: Interpreter, definition: Definition, builder: Builder, timeout: float, build: _Build) -> Path:
    """Build ``key`` under its exclusive lock (or find it built by another process meanwhile); its real directory."""
    deadline = time.monotonic() + timeout

    def waiting() -> None:
        build.waiting_for_lock = True

    fd = await cache.lock(key, exclusive=True, deadline=deadline, waiting=waiting)
    build.waiting_for_lock = False
    target: Path | None = None
    try:
        found = cache.lookup(key)
        if found is not None:
            return found  # another process built it while we waited for its lock
        cache.remove_stale(key)
        build.ran = True
        build.builder = builder.name
        target = cache.root / f"{key}{BUILD_INFIX}{time.strftime('%Y%m%d%H%M%S')}-{secrets.token_hex(3)}"
        t0 = time.monotonic()
        log.info("code env %s: building with %s into %s (%d requirement lines, python %s)", key, builder.name, target, len(definition.lines), interp.executable)
        await _run_step(*builder.venv_step(python, target), build, deadline, cache.root, timeout)
        if definition.lines:
            requirements = target / REQUIREMENTS
            requirements.write_text("".join(f"{line}\n" for line in definition.lines), encoding="utf-8")
            await _run_step(*builder.install_step(target, requirements), build, deadline, cache.root, timeout)
        build.build_s = time.monotonic() - t0
        marker = {
            "key": key,
            "build_id": target.name.split(BUILD_INFIX, 1)[1],
            "built_at": time.time(),
            "build_s": round(build.build_s, 3),
            "builder": builder.name,
            "cruised": __version__,
            "layout": LAYOUT,
            "python": dataclasses.asdict(interp),
            "requested_python": definition.python,
            "requirements": list(definition.lines),
            "files": dict(definition.files),
        }
        tmp = target / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(marker, indent=1), encoding="utf-8")
        os.replace(tmp, target / MARKER)
        cache.publish(key, target)
        log.info("code env %s built by %s in %.1fs", key, builder.name, build.build_s)
        return target
    except BaseException:
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)  # never published: nobody can be using it
        raise
    finally:
        os.close(fd)


def _join_build(cache: Cache, key: str, python: str, interp: Interpreter, definition: Definition, builder: Builder, timeout: float) -> _Build:
    """This process's build of ``key``: the one running, or a new one started now."""
    ident = str(cache.root / key)
    build = _builds.get(ident)
    loop = asyncio.get_running_loop()
    if build is not None and build.task is not None and not build.task.done() and build.task.get_loop() is loop:
        return build
    build = _Build(key)
    build.task = loop.create_task(_build(cache, key, python, interp, definition, builder, timeout, build))
    _builds[ident] = build

    def forget(_: asyncio.Task[Path]) -> None:
        if _builds.get(ident) is build:
            del _builds[ident]

    build.task.add_done_callback(forget)
    return build


async def _wait_build(build: _Build, echo: Callable[[str, str], None] | None) -> Path:
    """Wait for ``build`` (shielded: other pools may wait for it too); the last waiter to be cancelled cancels the build."""
    task = build.task
    assert task is not None
    build.waiters += 1
    echoing = echo is not None and echo not in build.echoes
    if echo is not None and echoing:
        build.echoes.append(echo)
    try:
        return await asyncio.shield(task)
    finally:
        build.waiters -= 1
        if echo is not None and echoing:
            build.echoes.remove(echo)
        if build.waiters == 0 and not task.done():
            task.cancel()  # the last waiter left (shutdown, or its pool was dropped): stop the builder


# -- one pool's env ---------------------------------------------------------------------------


class PoolEnv:
    """A pool's code env: its definition, and getting it built (see the module docstring).

    ``state``: ``pending`` (nothing done yet), ``checking`` (asking the interpreter,
    looking in the cache), ``building`` (a builder runs, or waits for another
    process's build of the same key), ``ready`` (``python`` is the env's
    interpreter), ``failed`` (``error`` says why).
    """

    def __init__(self, pool: str, spec: CodeEnvConfig, daemon: DaemonConfig, hold: bool = True, echo: Callable[[str, str], None] | None = None) -> None:
        self.pool = pool
        self.spec = spec
        self.cache = Cache(env_dir(daemon))
        self.timeout = float(daemon.env_build_timeout)
        self.builder_setting = daemon.env_builder
        self.hold = hold  # keep the env's lock shared while the pool runs (the daemon); the CLI does not
        self.echo = echo
        self.state = "pending"
        self.key: str | None = None
        self.path: Path | None = None
        self.python: str | None = None
        self.reused: bool | None = None
        self.builder: str | None = None
        self.build_s: float | None = None
        self.error: str | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self._build: _Build | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None

    @classmethod
    def of(cls, pool: str, config: PoolConfig, daemon: DaemonConfig) -> PoolEnv | None:
        """The env of a pool with ``code_env``; None for any other pool."""
        return cls(pool, config.code_env, daemon) if config.code_env is not None else None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    # -- the launcher's hook -----------------------------------------------------------------

    def start(self, launcher: PoolLauncher) -> bool:
        """Called before the pool's template starts: True when the env is ready (``launcher.python``
        now points at it); False while it is being built in the background (the template is started
        once it is) or after it failed (nothing is started until a reload)."""
        if self.state == "ready":
            assert self.python is not None
            launcher.python = self.python
            return True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._prepare_then_start(launcher))
        return False

    async def _prepare_then_start(self, launcher: PoolLauncher) -> None:
        await self.prepare()
        disp = launcher.dispatcher
        if launcher.closing:
            return
        if self.ready:
            launcher.start_template()
            if disp is not None:
                disp.manage()
        elif disp is not None:
            disp.last_error = self.unavailable()
        if disp is not None:
            disp.on_change()

    # -- the work ------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Find the env in the cache or build it; sets ``state`` to ready or failed (never raises but on cancellation)."""
        self.started = time.monotonic()
        self.state = "checking"
        try:
            await self._prepare()
        except BuildError as exc:
            self.state = "failed"
            self.error = str(exc)
            log.error("pool=%s code env build failed: %s", self.pool, self.error)
        except DefinitionError as exc:
            self.state = "failed"
            self.error = f"code_env.{exc.where}: {exc.message}"
            log.error("pool=%s code env definition: %s", self.pool, self.error)
        except asyncio.CancelledError:
            self.state = "failed"
            self.error = "cancelled (shutting down)"
            raise
        except Exception as exc:  # an internal error fails this pool alone, logged with its traceback
            log.exception("pool=%s code env: internal error", self.pool)
            self.state = "failed"
            self.error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            self.finished = time.monotonic()

    async def _prepare(self) -> None:
        deadline = time.monotonic() + self.timeout
        builder = pick_builder(self.builder_setting)
        definition = read_definition(self.spec)
        python = await resolve_interpreter(self.spec.python, builder.uv or find_uv(), deadline)
        interp = await probe(python, deadline)
        key = self.key = env_key(interp, definition)
        self.cache.root.mkdir(parents=True, exist_ok=True)
        built_here = False
        while True:
            target = self.cache.lookup(key)
            if target is None:
                self.state = "building"
                log.info("pool=%s code env %s not built yet: building it (%s)", self.pool, key, builder.name)
                build = self._build = _join_build(self.cache, key, python, interp, definition, builder, self.timeout)
                target = await _wait_build(build, self.echo)  # its progress shows in this pool's status meanwhile
                built_here = built_here or build.ran
            # hold it (shared) so that a prune cannot remove it under the pool; then make sure it is still the published env
            fd = await self.cache.lock(key, exclusive=False, deadline=deadline)
            if self.cache.lookup(key) == target:
                break
            os.close(fd)
        if self.hold:
            self._lock_fd = fd
        else:
            os.close(fd)
        marker = self.cache.marker(target)
        self.path = target
        self.python = str(target / "bin" / "python")
        self.reused = not built_here
        self.builder = str(marker.get("builder") or "")
        self.build_s = marker.get("build_s")
        self.state = "ready"
        if self.reused:
            log.info(
                "pool=%s code env %s reused (built by %s %s ago)",
                self.pool,
                key,
                self.builder,
                human_age(time.time() - float(marker.get("built_at") or time.time())),
            )
        else:
            log.info("pool=%s code env %s ready (built by %s in %.1fs)", self.pool, key, self.builder, self.build_s or 0.0)

    def pending(self) -> asyncio.Task[None] | None:
        """The background preparation, while it runs."""
        return self._task if self._task is not None and not self._task.done() else None

    def close(self) -> None:
        """The pool is gone (shutdown, or its generation retired): stop a build it waits for (if nobody else does) and release the env."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- reporting -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        if self.started is None:
            return 0.0
        return (self.finished if self.finished is not None else time.monotonic()) - self.started

    def last_line(self) -> str:
        build = self._build
        if build is not None and build.waiting_for_lock:
            return f"waiting for another build of {build.key} (its lock is held)"
        return build.last_line if build is not None else ""

    def unavailable(self) -> str | None:
        """Why the pool cannot start workers because of its env (a status line), or None once it is ready."""
        if self.state == "ready":
            return None
        if self.state == "failed":
            return f"code env build failed: {self.error}"
        if self.state == "building":
            last = self.last_line()
            return f"building env ({self.elapsed():.0f}s)" + (f": {last}" if last else "")
        return "checking its code env"

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "key": self.key,
            "path": str(self.path) if self.path is not None else None,
            "python": self.python,
            "requested_python": self.spec.python,
            "builder": self.builder,
            "reused": self.reused,
            "build_s": self.build_s,
            "elapsed_s": round(self.elapsed(), 3),
            "last_line": self.last_line(),
            "error": self.error,
        }


# -- hooks for the supervisor and the reloader ------------------------------------------------------


def required(pool: PoolConfig) -> bool:
    """Whether readiness (/readyz, systemd READY=1) waits for this pool: ``required``, by default
    true except for a pool with ``code_env`` (its build may take minutes)."""
    return pool.required if pool.required is not None else pool.code_env is None


async def wait_built(launchers: Iterable[PoolLauncher]) -> None:
    """Until every code env of these pools is ready or failed (a reload waits here while the old generation serves).

    Each build is bounded by ``daemon.env_build_timeout``; the builds themselves are not
    cancelled if this wait is (two pools may share one).
    """
    tasks = [task for launcher in launchers if launcher.env is not None and (task := launcher.env.pending()) is not None]
    if tasks:
        await asyncio.wait(tasks)


def status_note(launchers: Iterable[PoolLauncher]) -> str:
    """``; pool x building env (12s): <last line>`` for systemd's STATUS=, or ""."""
    notes = [
        f"pool {launcher.name} {why}"
        for launcher in launchers
        if launcher.env is not None and launcher.env.state == "building" and (why := launcher.env.unavailable())
    ]
    return "; " + "; ".join(notes) if notes else ""
