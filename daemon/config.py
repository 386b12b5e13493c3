"""Configuration: one typed schema, declared once, validated at load.

Each setting is a field of a frozen dataclass below, with its default and a
one-line ``doc``. The loader walks the YAML against those annotations, so
unknown keys, wrong types and cross-field violations are reported with the
key path, one line each (``pools.default.cruise: must be <= max (8), got
12``). Config objects are immutable values: a reload builds a new one and
compares, it never edits the running one.

DSS API-node names, for users moving pools over: ``min`` = floor (pipelines
allocated at start), ``cruise`` = cruise (kept warm; surplus workers above it
retire after ``idle_timeout``), ``max`` = ceil, ``queue_size`` = queue
(length), ``queue_timeout`` = timeout (DSS gives milliseconds; here any
duration: ``10s``, ``500ms``, ``10000ms``).

Endpoints (``services.<service>.endpoints.<endpoint>``) follow the DSS API
node's Python function endpoints: ``code`` + ``function``, ``folders`` (the
``folders`` global), ``test_queries``; ``pool`` names the pool that serves
it, and a pool's ``python`` is its code env. Paths (``code``, ``folders``,
``init``, ``python``, ``api_keys_file``) are relative to the config file.
"""

from __future__ import annotations

import difflib
import json
import keyword
import os
import re
import shutil
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeGuard, TypeVar, Union, overload

import yaml

from cruised.client.errors import ConfigError


class Duration(float):
    """Seconds; YAML accepts a number of seconds or ``500ms``, ``10s``, ``2m``, ``1h``."""


class Size(int):
    """Bytes; YAML accepts an integer or ``512KiB``, ``64MiB``, ``1GiB``, ``10MB``."""


class FileMode(int):
    """A permission mode written as an octal string, e.g. ``"0660"``."""


class JsonObject(dict[str, Any]):
    """A mapping that must survive ``json.dumps`` (a test query: an endpoint's request body)."""


class PythonSpec(str):
    """An interpreter: a path, or a version such as ``"3.11"`` (a string: YAML reads 3.10 as the number 3.1)."""


#: ``code_env.python: "3.11"``: a version, found when the env is built (python3.11 on PATH, or by uv)
PYTHON_VERSION = re.compile(r"^(\d+)\.(\d+)$")


#: service and endpoint names are URL path segments
#: ``pools.<name>.on_disconnect``: what happens to a departed client's running calls
ON_DISCONNECT = ("cancel", "finish")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
DEFAULT_HTTP_PORT = 9580


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "K": 1 << 10,
    "M": 1 << 20,
    "G": 1 << 30,
}


_T = TypeVar("_T")


@overload
def doc(text: str, default: _T) -> _T: ...
@overload
def doc(text: str, *, factory: Callable[[], _T]) -> _T: ...
def doc(text: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A dataclass field carrying its documentation (``describe``: the README's settings table).

    Every setting is declared through this, with a default or a factory, so every section
    can be built from an empty mapping. Typed as the default it is given (as ``field()`` is
    in typeshed), so mypy checks each default against its annotation; at run time it is the
    ``dataclasses.Field``, which ``@dataclass`` consumes.
    """
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass(frozen=True)
class DaemonConfig:
    socket: str | None = doc("native Unix socket; default $RUNTIME_DIRECTORY, /run/cruised, $XDG_RUNTIME_DIR or a temp dir", None)
    socket_mode: FileMode = doc("permission bits of the socket files", FileMode(0o660))
    max_message_bytes: Size = doc("largest frame or HTTP body accepted", Size(256 << 20))
    shutdown_grace: Duration = doc("SIGTERM: how long queued and running calls may finish", Duration(30))
    kill_grace: Duration = doc("SIGTERM -> SIGKILL delay when a worker is killed", Duration(2))
    max_connections: int = doc("client connections served at once; more are refused", 1024)
    read_timeout: Duration = doc("a started frame must be complete within this", Duration(30))
    allow_uids: list[int] = doc("if set, only these peer uids (SO_PEERCRED) may connect", factory=list)
    allow_gids: list[int] = doc("if set, only these peer gids may connect", factory=list)
    access_log: bool = doc("one log line per answered request (logger cruised.access: pool, endpoint, outcome, queue_ms, exec_ms, peer)", True)
    env_dir: str | None = doc(
        "where code envs (pools.<name>.code_env) are built and kept, one per definition; default: envs/ in the state directory "
        "($STATE_DIRECTORY, /var/lib/cruised when writable, else $XDG_STATE_HOME/cruised or ~/.local/state/cruised)",
        None,
    )
    env_builder: str = doc("how code envs are built: auto (uv when an uv executable is found, else python -m venv + pip), uv, or pip", "auto")
    env_build_timeout: Duration = doc("longest one code env build may take; the builder is then killed and its pool fails", Duration(900))

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if self.env_builder not in ("auto", "uv", "pip"):
            errors.append(ConfigError(f"{path}.env_builder", f"must be auto, uv or pip, got {self.env_builder!r}"))
        if self.env_build_timeout <= 0:
            errors.append(ConfigError(f"{path}.env_build_timeout", f"must be positive, got {self.env_build_timeout}"))
        if self.max_message_bytes < 4096:
            errors.append(ConfigError(f"{path}.max_message_bytes", f"must be at least 4KiB, got {int(self.max_message_bytes)}"))
        if self.max_connections < 1:
            errors.append(ConfigError(f"{path}.max_connections", f"must be positive, got {self.max_connections}"))


@dataclass(frozen=True)
class QReconnect:
    initial: Duration = doc("first wait after a failed connect; doubles per failure", Duration(0.5))
    max: Duration = doc("longest wait between connect attempts", Duration(30))

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        for name in ("initial", "max"):
            if getattr(self, name) <= 0:
                errors.append(ConfigError(f"{path}.{name}", f"must be positive, got {getattr(self, name)}"))
        if self.initial > self.max > 0:
            errors.append(ConfigError(f"{path}.initial", f"must be <= max ({self.max:g}s), got {self.initial:g}s"))


@dataclass(frozen=True)
class QConfig:
    """``pools.<name>.q``: the one kdb+ connection each worker holds (pool/qconn.py).

    The password is kept out of ``repr`` so it cannot reach a log line or a
    traceback through this object; ``password_file`` and ``password_env`` are
    read by the worker at connect time, so the secret never passes through the
    supervisor at all.
    """

    host: str = doc("q host name or address (ignored with unix: true)", "127.0.0.1")
    port: int = doc("q port (required; with unix: true, the Unix socket is /tmp/kx.<port>)", 0)
    username: str = doc("user name sent in the q handshake", "")
    password: str | None = field(default=None, repr=False, metadata={"doc": "password (prefer password_file or password_env)"})
    password_file: str | None = doc("file whose first line is the password (read by each worker at connect time)", None)
    password_env: str | None = doc("environment variable holding the password (read by each worker)", None)
    tls: bool = doc("TLS to q (needs q started with -E 1 or 2)", False)
    tls_ca_file: str | None = doc("CA certificate (PEM) that signed q's certificate; default: the system store", None)
    tls_verify: bool = doc("verify q's certificate; false only for testing", True)
    timeout: Duration | None = doc("longest wait for one q reply; default: the pool's exec_timeout", None)
    connect_timeout: Duration = doc("longest wait to open the connection", Duration(5))
    unix: bool = doc("connect over the local Unix-domain socket of q's port instead of TCP", False)
    reconnect: QReconnect = doc("backoff between connect attempts while q is unreachable", factory=QReconnect)
    required: bool = doc("the pool is ready only while its warm workers are connected to q", False)

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if self.port == 0:
            errors.append(ConfigError(f"{path}.port", "is required (the port q listens on)"))
        elif not 1 <= self.port <= 65535:
            errors.append(ConfigError(f"{path}.port", f"must be a port number 1..65535, got {self.port}"))
        given = [n for n in ("password", "password_file", "password_env") if getattr(self, n) is not None]
        if len(given) > 1:
            errors.append(ConfigError(f"{path}.{given[1]}", f"give only one of password, password_file, password_env (also set: {given[0]})"))
        if self.password_file is not None and not os.path.isfile(self.password_file):
            errors.append(ConfigError(f"{path}.password_file", f"no such file: {self.password_file}"))
        if self.password_env is not None and not self.password_env:
            errors.append(ConfigError(f"{path}.password_env", "must name an environment variable"))
        if self.tls and self.unix:
            errors.append(ConfigError(f"{path}.tls", "TLS is for TCP; a unix: true connection is local and cannot use it"))
        if self.tls_ca_file is not None and not os.path.isfile(self.tls_ca_file):
            errors.append(ConfigError(f"{path}.tls_ca_file", f"no such file: {self.tls_ca_file}"))
        if self.timeout is not None and self.timeout <= 0:
            # pykx busy-polls its socket while it waits when it has no timeout
            errors.append(ConfigError(f"{path}.timeout", f"must be positive, got {self.timeout}"))
        if self.connect_timeout <= 0:
            errors.append(ConfigError(f"{path}.connect_timeout", f"must be positive, got {self.connect_timeout}"))

    @property
    def endpoint(self) -> str:
        return f"unix:/tmp/kx.{self.port}" if self.unix else f"{self.host}:{self.port}"

    def worker_spec(self, exec_timeout: float) -> dict[str, Any]:
        """The settings a worker needs (pool/qconn.py ``QSettings``), as plain JSON values."""
        spec = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "reconnect"}
        spec["timeout"] = float(self.timeout if self.timeout is not None else exec_timeout)
        spec["reconnect_initial"] = float(self.reconnect.initial)
        spec["reconnect_max"] = float(self.reconnect.max)
        return spec


@dataclass(frozen=True)
class CodeEnvConfig:
    """``pools.<name>.code_env``: a code env cruised builds itself from a definition (daemon/core/envbuild.py)."""

    requirements: list[str] = doc(
        "requirement lines, as a requirements file holds them (numpy==1.26.4, --find-links DIR, --no-index, --index-url URL); "
        "paths are relative to the config file",
        factory=list,
    )
    requirements_file: str | None = doc("…or a requirements file (its own relative paths are relative to it)", None)
    python: PythonSpec | None = doc(
        'the base interpreter: a path, or a version in quotes ("3.11": python3.11 on PATH, or found by uv); default: the daemon\'s', None
    )

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        from cruised.core import envbuild

        if self.requirements and self.requirements_file is not None:
            errors.append(ConfigError(f"{path}.requirements_file", "give requirements or requirements_file, not both"))
            return
        if self.python is not None and os.sep not in self.python and not PYTHON_VERSION.match(self.python):
            errors.append(ConfigError(f"{path}.python", f'no command {self.python!r} on PATH (give an interpreter path, or a version such as "3.11")'))
        problem = envbuild.check(self)
        if problem is not None:
            errors.append(ConfigError(f"{path}.{problem.where}", problem.message))


#: pools.<name>.fairness values (daemon/core/fairness.py)
FAIRNESS = ("caller", "connection", "none")


@dataclass(frozen=True)
class PoolConfig:
    min: int = doc("DSS floor: workers warm before the pool counts as ready", 1)
    cruise: int = doc("DSS cruise: workers kept alive; surplus retires when idle", 2)
    max: int = doc("DSS ceil: most workers at once", 8)
    queue_size: int = doc("DSS queue length: requests waiting for a worker; more are rejected", 16)
    queue_timeout: Duration = doc("DSS timeout: longest wait in the queue", Duration(10))
    exec_timeout: Duration = doc("longest run of one call; the worker is killed after it", Duration(60))
    cancel_grace: Duration = doc(
        "a cancelled running call (Ctrl-C in the client, Future.cancel(), a client gone with on_disconnect: cancel) "
        "gets SIGINT (KeyboardInterrupt in the function); its worker is killed and replaced if it has not stopped within this",
        Duration(2),
    )
    on_disconnect: str = doc(
        "when a client disconnects with calls outstanding: cancel (queued ones never run, running ones are "
        "interrupted as on a cancel) or finish (queued ones never run, running ones finish; their results are dropped)",
        "cancel",
    )
    idle_timeout: Duration = doc("a worker above cruise idle this long retires", Duration(30))
    start_timeout: Duration = doc("a new worker must be ready (preload done) within this", Duration(60))
    max_requests: int = doc("recycle a worker after this many calls (0 = never)", 0)
    max_rss: Size = doc("recycle a worker whose private resident memory (RssAnon: not mapped files) exceeds this after a call (0 = no limit)", Size(0))
    prefetch: int = doc(
        "calls a busy worker may hold behind its running one, saving a round trip per call under pipelined load; "
        "only while the pool is at max and its calls average under 2 ms (0 = never)",
        4,
    )
    fairness: str = doc(
        "how the pool is shared (daemon/core/fairness.py): caller (weighted fair queueing across callers: the peer's user, "
        "the HTTP API key's name, the q user), connection (every connection its own caller) or none (one FIFO, as the DSS queue)",
        "caller",
    )
    shares: dict[str, float] = doc("caller -> weight of its share of the pool under contention (default 1), e.g. {alice: 3, etl: 1}", factory=dict)
    max_queued_per_caller: int = doc(
        "calls one caller may have waiting while another caller waits; a pipelined map gets at most this much credit (0 = half of queue_size, at least 1)",
        0,
    )
    libraries: dict[str, str] = doc("alias -> module imported in every worker, e.g. {np: numpy}", factory=dict)
    init: str | None = doc("Python file run once in every worker at start", None)
    env: dict[str, str] = doc("extra environment variables for this pool's workers", factory=dict)
    user: str | None = doc("run this pool's workers as this user (the daemon must run as root)", None)
    group: str | None = doc("…and this group (default: the user's primary group)", None)
    python: str | None = doc(
        "the pool's code env: the interpreter its workers run (/path/to/venv/bin/python); it needs no cruised "
        "install (the daemon puts its own worker package on that interpreter's path), only `cloudpickle` for shipped functions (the daemon supplies its own when the env has none); "
        "default: the daemon's own Python",
        None,
    )
    q: QConfig | None = doc("kdb+ connection held by every worker (the q global); omitted: none", None)
    code_env: CodeEnvConfig | None = doc("a code env built by cruised from a definition (DSS: the service's code env); omitted: none", None)
    required: bool | None = doc(
        "readiness (/readyz, systemd READY=1) waits for this pool (min warm workers; with code_env, its build first); "
        "default: true, but false for a pool with code_env: the daemon is ready without it, and it serves once built",
        None,
    )

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if self.code_env is not None and self.python is not None:
            errors.append(
                ConfigError(f"{path}.code_env", f"give {path}.python (an interpreter someone built) or {path}.code_env (a definition cruised builds), not both")
            )
        for name in ("cruise", "max"):
            if getattr(self, name) < 1:
                errors.append(ConfigError(f"{path}.{name}", f"must be positive, got {getattr(self, name)}"))
        if not 0 <= self.prefetch <= 64:
            errors.append(ConfigError(f"{path}.prefetch", f"must be between 0 and 64, got {self.prefetch}"))
        for name in ("min", "queue_size", "max_requests"):
            if getattr(self, name) < 0:
                errors.append(ConfigError(f"{path}.{name}", f"must not be negative, got {getattr(self, name)}"))
        for name in ("queue_timeout", "exec_timeout", "idle_timeout", "start_timeout", "cancel_grace"):
            if getattr(self, name) <= 0:
                errors.append(ConfigError(f"{path}.{name}", f"must be positive, got {getattr(self, name)}"))
        if self.fairness not in FAIRNESS:
            errors.append(ConfigError(f"{path}.fairness", f"must be one of {', '.join(FAIRNESS)}, got {self.fairness!r}"))
        for caller, weight in self.shares.items():
            if not 0 < weight <= 1000:
                errors.append(ConfigError(f"{path}.shares.{caller}", f"a weight must be above 0 and at most 1000, got {weight:g}"))
        if self.max_queued_per_caller < 0:
            errors.append(ConfigError(f"{path}.max_queued_per_caller", f"must not be negative, got {self.max_queued_per_caller}"))
        elif self.max_queued_per_caller > self.queue_size:
            errors.append(ConfigError(f"{path}.max_queued_per_caller", f"must be at most queue_size ({self.queue_size}), got {self.max_queued_per_caller}"))
        if self.on_disconnect not in ON_DISCONNECT:
            errors.append(ConfigError(f"{path}.on_disconnect", f"must be one of {', '.join(ON_DISCONNECT)}, got {self.on_disconnect!r}"))
        if self.cruise > self.max >= 1:
            errors.append(ConfigError(f"{path}.cruise", f"must be <= max ({self.max}), got {self.cruise}"))
        if self.min > self.cruise >= 1:
            errors.append(ConfigError(f"{path}.min", f"must be <= cruise ({self.cruise}), got {self.min}"))
        if self.init is not None and not os.path.isfile(self.init):
            errors.append(ConfigError(f"{path}.init", f"no such file: {self.init}"))
        for alias in self.libraries:
            if not alias.isidentifier():
                errors.append(ConfigError(f"{path}.libraries.{alias}", "alias must be a Python identifier"))
        if self.user is not None or self.group is not None:
            try:
                self.credentials()
            except KeyError as exc:
                errors.append(ConfigError(f"{path}.{'user' if 'user' in str(exc) else 'group'}", str(exc.args[0])))
            else:
                if os.geteuid() != 0:
                    errors.append(ConfigError(f"{path}.user", "switching workers to another user needs the daemon to run as root"))

    def caller_limit(self) -> int:
        """``max_queued_per_caller`` in force: as set, else half the queue (at least 1); the whole queue with fairness none."""
        if self.fairness == "none":
            return self.queue_size
        return self.max_queued_per_caller or max(1, self.queue_size // 2)

    def credentials(self) -> tuple[int, int] | None:
        """(uid, gid) the workers run as, or None to keep the daemon's."""
        import grp
        import pwd

        if self.user is None and self.group is None:
            return None
        try:
            pw = pwd.getpwnam(self.user) if self.user is not None else pwd.getpwuid(os.geteuid())
        except KeyError:
            raise KeyError(f"no such user: {self.user}") from None
        gid = pw.pw_gid
        if self.group is not None:
            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise KeyError(f"no such group: {self.group}") from None
        return pw.pw_uid, gid


@dataclass(frozen=True)
class EndpointConfig:
    code: str = doc("the endpoint's Python file; its module-level code runs once in each worker of the pool", "")
    function: str = doc("the function in that file that answers a call; JSON attributes fill its parameters", "")
    pool: str = doc("the pool whose workers serve this endpoint", "default")
    folders: list[str] = doc("directories the code reads (DSS managed folders): the global `folders`, absolute, in this order", factory=list)
    test_queries: list[JsonObject] = doc("example request bodies that `cruised test` plays against the running daemon", factory=list)
    description: str = doc("free text shown in status", "")

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if not self.code:
            errors.append(ConfigError(f"{path}.code", "required: the endpoint's .py file"))
        elif not os.path.isfile(self.code):
            errors.append(ConfigError(f"{path}.code", f"no such file: {self.code}"))
        if not self.function:
            errors.append(ConfigError(f"{path}.function", "required: the name of the function to call"))
        elif not self.function.isidentifier() or keyword.iskeyword(self.function):
            errors.append(ConfigError(f"{path}.function", f"must be a Python identifier, got {self.function!r}"))
        for i, folder in enumerate(self.folders):
            if not os.path.isdir(folder):
                errors.append(ConfigError(f"{path}.folders[{i}]", f"no such directory: {folder}"))


def _named_key(entry: str) -> tuple[str, str]:
    """(key, caller name) of an ``api_keys`` entry: ``key`` or ``name:key`` (a key has no ':')."""
    import hashlib

    name, sep, key = entry.partition(":")
    if sep:
        return key, name
    return entry, "key-" + hashlib.sha256(entry.encode()).hexdigest()[:8]


def _key_problem(entry: str) -> str | None:
    # the message must never contain the key itself: config errors get logged
    name, sep, key = entry.partition(":")
    if sep and (not name or any(c.isspace() for c in name)):
        return "has an empty name or whitespace in its name (name:key)"
    if not sep:
        key = entry
    if not key:
        return "is empty"
    if any(c.isspace() for c in key) or ":" in key:
        return "contains whitespace or a second ':' (it is sent as an HTTP Basic user name; name:key names it)"
    return None


@dataclass(frozen=True)
class ServiceConfig:
    endpoints: dict[str, EndpointConfig] = doc("the service's endpoints: POST /public/api/v1/<service>/<endpoint>/run", factory=dict)
    api_keys: list[str] = doc(
        "if set (here or in api_keys_file), callers over TCP must send one: as the HTTP Basic user with a blank "
        "password (as DSS clients do) or as `Authorization: Bearer <key>`; the Unix socket needs none. Written "
        "`name:key`, the key has a name: the caller its calls are for (pools.<name>.shares)",
        factory=list,
    )
    api_keys_file: str | None = doc("a file of further keys (or name:key), one per line (# comments); re-read on reload", None)
    description: str = doc("free text shown in status", "")

    def file_keys(self) -> list[str]:
        """Keys from ``api_keys_file``; OSError if it cannot be read."""
        if self.api_keys_file is None:
            return []
        with open(self.api_keys_file, encoding="utf-8") as fh:
            return [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]

    def keys(self) -> list[str]:
        """Every key, as written (``key`` or ``name:key``)."""
        return list(self.api_keys) + self.file_keys()

    def named_keys(self) -> list[tuple[str, str]]:
        """(key, caller) of every key: a ``name:key`` entry's caller is its name, a bare key's
        ``key-`` and the first 8 hex digits of its SHA-256 (stable, and it does not give the key away)."""
        return [_named_key(entry) for entry in self.keys()]

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        for name in self.endpoints:
            if not _NAME.match(name):
                errors.append(ConfigError(f"{path}.endpoints.{name}", "endpoint names may use only letters, digits, '_', '-' and '.'"))
        for i, key in enumerate(self.api_keys):
            problem = _key_problem(key)
            if problem:
                errors.append(ConfigError(f"{path}.api_keys[{i}]", f"key {problem}"))
        if self.api_keys_file is not None:
            try:
                keys = self.file_keys()
            except OSError as exc:
                errors.append(ConfigError(f"{path}.api_keys_file", f"cannot read {self.api_keys_file}: {exc.strerror}"))
                return
            if not keys:
                errors.append(ConfigError(f"{path}.api_keys_file", f"{self.api_keys_file} holds no keys"))
            for i, key in enumerate(keys):
                problem = _key_problem(key)
                if problem:
                    errors.append(ConfigError(f"{path}.api_keys_file", f"key number {i + 1} {problem}"))


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, ``host`` or ``:port`` -> (host, port); ValueError if malformed."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"expected [ipv6]:port, got {text!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"write IPv6 addresses as [addr]:port, got {text!r}")
    else:
        host, port_text = text, ""
    host = host or "127.0.0.1"
    if not port_text:
        return host, DEFAULT_HTTP_PORT
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def check_host_port(value: str, where: str, example: str, errors: list[ConfigError]) -> None:
    """A listening address whose port must be given (no HTTP default): ``host:port`` or ``[v6]:port``."""
    if ":" not in value:
        errors.append(ConfigError(where, f"expected host:port (e.g. {example}), got {value!r}"))
        return
    try:
        parse_listen(value)
    except ValueError as exc:
        errors.append(ConfigError(where, str(exc)))


@dataclass(frozen=True)
class HttpConfig:
    enabled: bool = doc("serve the HTTP front door: endpoints, /status, /healthz, /readyz, /metrics", True)
    socket: str | None = doc("its Unix socket; default cruised-http.sock beside the native socket", None)
    listen: str | None = doc(
        f"also listen on TCP host:port (e.g. 127.0.0.1:{DEFAULT_HTTP_PORT}; a missing port is {DEFAULT_HTTP_PORT}, "
        "a missing host 127.0.0.1, port 0 picks a free one); unset: no TCP",
        None,
    )
    retry_after: Duration = doc("the Retry-After header of 503 answers (queue full, shutting down)", Duration(1))

    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if self.listen is not None:
            try:
                parse_listen(self.listen)
            except ValueError as exc:
                errors.append(ConfigError(f"{path}.listen", str(exc)))
        if self.retry_after < 0:
            errors.append(ConfigError(f"{path}.retry_after", f"must not be negative, got {self.retry_after}"))


@dataclass(frozen=True)
class RemoteConfig:
    """``remote``: the native door over TCP for clients on other hosts, mutual TLS only (daemon/doors/remote.py).

    There is no plaintext TCP door for shipped code: with ``listen`` set, every
    file below is required and checked at load (a certificate that does not
    match its key, an unreadable CA or CRL is an error here, not at the first
    connection). Certificates and the CRL are read again on reload (SIGHUP):
    new connections get the new context, open ones keep theirs.
    """

    listen: str | None = doc(
        "TCP host:port of the mutual-TLS native door for remote cruised.session(host=..., tls=...) clients (port 0 picks a free one); unset: off",
        None,
    )
    cert_file: str | None = doc("the daemon's PEM certificate chain (what clients verify against their ca_file)", None)
    key_file: str | None = doc("the PEM private key of cert_file", None)
    client_ca_file: str | None = doc(
        "PEM CA certificate(s) that sign the client certificates; a client without one signed by them is refused in the handshake", None
    )
    allowed_clients: list[str] = doc(
        "client certificate identities let in: a subject CN or a subjectAltName value (DNS name, IP address, e-mail, URI such as "
        "spiffe://team/alice); checked right after the handshake, before any frame is read; required",
        factory=list,
    )
    crl_file: str | None = doc("PEM certificate revocation list of client_ca_file: a revoked client certificate is refused in the handshake; optional", None)
    handshake_timeout: Duration = doc("a TLS handshake must be complete within this", Duration(10))

    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if self.handshake_timeout <= 0:
            errors.append(ConfigError(f"{path}.handshake_timeout", f"must be positive, got {self.handshake_timeout}"))
        if self.listen is None:
            return
        check_host_port(self.listen, f"{path}.listen", "0.0.0.0:7443", errors)
        missing = False
        for name in ("cert_file", "key_file", "client_ca_file", "crl_file"):
            value = getattr(self, name)
            if value is None:
                if name != "crl_file":
                    errors.append(ConfigError(f"{path}.{name}", "is required with remote.listen (the door is mutual TLS only)"))
                    missing = True
            elif not os.path.isfile(value):
                errors.append(ConfigError(f"{path}.{name}", f"no such file: {value}"))
                missing = True
        if not self.allowed_clients:
            errors.append(ConfigError(f"{path}.allowed_clients", "is required with remote.listen: the certificate identities (CN or SAN) that may connect"))
        for i, name in enumerate(self.allowed_clients):
            if not name.strip():
                errors.append(ConfigError(f"{path}.allowed_clients[{i}]", "is empty"))
        if not missing:
            from cruised.doors.mtls import TlsSetupError, server_context

            try:
                server_context(self)
            except TlsSetupError as exc:
                errors.append(ConfigError(f"{path}.{exc.setting}", exc.message))


@dataclass(frozen=True)
class QipcConfig:
    listen: str | None = doc(
        "kdb+ IPC listener host:port, for q (hopen`:host:port) and pykx clients (port 0 picks a free one); unset: off",
        None,
    )
    unix: bool = doc("also listen on the abstract Unix socket @/tmp/kx.<port>, what q's hopen`:unix://<port> dials", True)
    users_file: str | None = doc(
        "q -U style password file: one user:password per line, the password plain, or its MD5 or SHA-1 in hex; "
        "re-read when it changes; unset: only loopback and Unix-socket peers may connect",
        None,
    )
    allow_loopback_without_password: bool = doc(
        "a loopback or Unix-socket peer that sends no password is let in as the user it names; a password it does send is checked", True
    )
    tls_cert: str | None = doc("PEM certificate: the TCP listener then speaks TLS only (q's hopen`:tcps://); the Unix socket stays plain", None)
    tls_key: str | None = doc("PEM private key for tls_cert", None)
    endpoint_users: dict[str, list[str]] = doc('"service/endpoint" -> the handshake users allowed to call it; unlisted endpoints are open', factory=dict)
    remote_functions: bool = doc(
        "run unmodified pykx.remote sessions' Python functions and library imports (arbitrary code, as the workers' user, "
        "with their q connections) on this door; even then only after a password login checked against users_file, or "
        "on the abstract Unix socket from a peer uid/gid in daemon.allow_uids/allow_gids (the daemon's own uid when both "
        "are empty): loopback trust never covers code",
        False,
    )
    remote_pool: str = doc("the pool that runs unmodified pykx.remote sessions' functions (with remote_functions: true)", "default")
    callback_concurrency: int = doc("deferred-sync (callback) calls of one handle that may run at once; 1 runs them in order", 64)
    max_pending: int = doc("messages read ahead on one handle while earlier ones run; more wait in the socket", 256)

    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.listen) if self.listen else None

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if self.listen is not None:
            check_host_port(self.listen, f"{path}.listen", "127.0.0.1:5010", errors)
        if (self.tls_cert is None) != (self.tls_key is None):
            errors.append(ConfigError(f"{path}.tls_cert", "tls_cert and tls_key go together"))
        for name in ("tls_cert", "tls_key"):
            value = getattr(self, name)
            if value is not None and not os.path.isfile(value):
                errors.append(ConfigError(f"{path}.{name}", f"no such file: {value}"))
        if self.users_file is not None:
            from cruised.doors.qipc.auth import UsersFileError, read_users_file

            try:
                read_users_file(self.users_file)
            except UsersFileError as exc:
                errors.append(ConfigError(f"{path}.users_file", str(exc)))
        if self.listen is not None and self.users_file is None and not self.allow_loopback_without_password:
            errors.append(ConfigError(f"{path}.allow_loopback_without_password", "is false and there is no users_file: nobody could log in"))
        for name in ("callback_concurrency", "max_pending"):
            if getattr(self, name) < 1:
                errors.append(ConfigError(f"{path}.{name}", f"must be positive, got {getattr(self, name)}"))

    def check_references(self, config: Config, errors: list[ConfigError]) -> None:
        """Names that must exist elsewhere in the config: the remote pool, the endpoints of endpoint_users."""
        if self.listen is None:
            return
        if self.remote_pool not in config.pools:
            errors.append(ConfigError("qipc.remote_pool", f"no pool named {self.remote_pool!r} (configured: {', '.join(sorted(config.pools))})"))
        known = config.endpoints()
        for name in self.endpoint_users:
            if name not in known:
                errors.append(ConfigError(f"qipc.endpoint_users.{name}", f"no endpoint {name!r} (configured: {', '.join(sorted(known)) or 'none'})"))


@dataclass(frozen=True)
class MetricsConfig:
    caller_labels: bool = doc(
        "add a caller label to cruised_requests_total (the top_callers callers of each pool by name, the rest as other); off: one series less per caller",
        False,
    )
    top_callers: int = doc('callers shown by name in cruised_caller_queue_depth and the caller label; the rest are summed as caller="other"', 10)

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if not 1 <= self.top_callers <= 1000:
            errors.append(ConfigError(f"{path}.top_callers", f"must be between 1 and 1000, got {self.top_callers}"))


@dataclass(frozen=True)
class HealthConfig:
    """What a load balancer asks of this daemon: /livez and /readyz live on the HTTP door; this is the agent."""

    agent: str | None = doc(
        "HAProxy agent-check listener host:port (agent-check agent-port): one line per connection, "
        "'up ready maxconn:<warm workers>', 'drain' or 'down' (docs/operations.md); port 0 picks a free one; unset: off",
        None,
    )
    pools: list[str] = doc("the pools whose warm workers the agent's maxconn counts (the pools HAProxy's traffic uses); empty: every pool", factory=list)

    def address(self) -> tuple[str, int] | None:
        return parse_listen(self.agent) if self.agent else None

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if self.agent is not None:
            check_host_port(self.agent, f"{path}.agent", "127.0.0.1:9581", errors)

    def check_references(self, config: Config, errors: list[ConfigError]) -> None:
        for i, name in enumerate(self.pools):
            if name not in config.pools:
                errors.append(ConfigError(f"health.pools[{i}]", f"no pool named {name!r} (configured: {', '.join(sorted(config.pools))})"))


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = doc("the supervisor process", factory=DaemonConfig)
    pools: dict[str, PoolConfig] = doc("named worker pools", factory=lambda: {"default": PoolConfig()})
    services: dict[str, ServiceConfig] = doc("named endpoint services (Dataiku API-node style)", factory=dict)
    http: HttpConfig = doc("the HTTP front door", factory=HttpConfig)
    remote: RemoteConfig = doc("the native door over TCP for other hosts, mutual TLS only (docs/scaling.md)", factory=RemoteConfig)
    qipc: QipcConfig = doc("the kdb+ IPC front door (docs/q-developers.md)", factory=QipcConfig)
    metrics: MetricsConfig = doc("what /metrics shows beyond the fixed series", factory=MetricsConfig)
    health: HealthConfig = doc("load-balancer health: the HAProxy agent-check listener (docs/operations.md)", factory=HealthConfig)

    def validate(self, path: str, errors: list[ConfigError]) -> None:
        if not self.pools:
            errors.append(ConfigError("pools", "at least one pool is required"))
        for sname, service in self.services.items():
            if not _NAME.match(sname):
                errors.append(ConfigError(f"services.{sname}", "service names may use only letters, digits, '_', '-' and '.'"))
            for ename, ep in service.endpoints.items():
                if ep.pool not in self.pools:
                    known = ", ".join(sorted(self.pools))
                    errors.append(ConfigError(f"services.{sname}.endpoints.{ename}.pool", f"no pool named {ep.pool!r} (configured: {known})"))
                if len(f"{sname}/{ename}".encode()) > 255:
                    errors.append(ConfigError(f"services.{sname}.endpoints.{ename}", "service/endpoint name is longer than 255 bytes"))
        self.qipc.check_references(self, errors)
        self.health.check_references(self, errors)

    def endpoints(self) -> dict[str, tuple[str, str, EndpointConfig]]:
        """``"service/endpoint"`` -> (service, endpoint, its config), in config order."""
        return {f"{s}/{e}": (s, e, ep) for s, svc in self.services.items() for e, ep in svc.endpoints.items()}


# -- loading -------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is Duration:
        return "a duration (e.g. 10s, 500ms)"
    if tp is Size:
        return "a size (e.g. 64MiB)"
    if tp is FileMode:
        return 'an octal mode string (e.g. "0660")'
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict or is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", str: "a string", bool: "true or false", float: "a number"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, path: str, base: Path | None) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, base)
    if _is_section(tp):
        return _build(tp, value, path, base)
    if origin is dict:
        _, val_tp = typing.get_args(tp)  # the keys are names: str() below
        if tp == dict[str, str] and isinstance(value, list) and path.endswith(".libraries"):
            value = {str(m).split(".")[-1]: m for m in value}  # [numpy] == {numpy: numpy}
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__}")
        return {str(k): _convert(val_tp, v, f"{path}.{k}", base) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__}")
        return [_convert(item_tp, v, f"{path}[{i}]", base) for i, v in enumerate(value)]
    if tp is Duration:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return Duration(value)
        m = _DURATION.match(str(value))
        if not m:
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        return Duration(float(m.group(1)) * _DURATION_UNITS[m.group(2)])
    if tp is Size:
        if isinstance(value, int) and not isinstance(value, bool):
            return Size(value)
        m = _SIZE.match(str(value))
        if not m:
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        return Size(int(float(m.group(1)) * _SIZE_UNITS[m.group(2)]))
    if tp is FileMode:
        if isinstance(value, int) and not isinstance(value, bool):
            raise ConfigError(path, f"expected {_type_name(tp)} in quotes (YAML reads 0660 as a decimal number), got {value}")
        try:
            mode = int(str(value), 8)
        except ValueError:
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}") from None
        if not 0 <= mode <= 0o7777:
            raise ConfigError(path, f"mode out of range: {value!r}")
        return FileMode(mode)
    if tp is PythonSpec:
        if not isinstance(value, str):
            raise ConfigError(path, f'expected an interpreter path or a version in quotes, such as "3.11" (YAML reads 3.10 as the number 3.1), got {value!r}')
        return PythonSpec(value)
    if tp is JsonObject:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping (a JSON object: the request body), got {type(value).__name__}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(path, f"not expressible as JSON: {exc}") from None
        return JsonObject(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(path, f"expected {_type_name(tp)}, got {type(value).__name__}")
        return str(value)
    raise ConfigError(path, f"unsupported type {tp}")  # a schema bug, not a user error


_PATH_FIELDS = {
    "init",
    "code",
    "python",
    "password_file",
    "api_keys_file",
    "users_file",
    "ca_file",
    "tls_ca_file",
    "tls_cert",
    "tls_key",
    "cert_file",
    "key_file",
    "client_ca_file",
    "crl_file",
    "requirements_file",
    "env_dir",
}
#: lists of paths, each resolved like the fields above
_PATH_LIST_FIELDS = {"folders"}


class _Section(Protocol):
    """What ``_build`` needs of a config section: a dataclass with a ``validate``."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def validate(self, path: str, errors: list[ConfigError]) -> None: ...


_S = TypeVar("_S", bound=_Section)


def _is_section(tp: object) -> TypeGuard[type[_Section]]:
    return isinstance(tp, type) and is_dataclass(tp) and callable(getattr(tp, "validate", None))


def _build(cls: type[_S], raw: Any, path: str, base: Path | None) -> _S:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        where = path or "the top level"
        raise ConfigError(path, f"expected a mapping at {where}, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    errors: list[ConfigError] = []
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(sorted(known))})"
            errors.append(ConfigError(_join(path, str(key)), f"unknown key{hint}"))
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        sub = _join(path, f.name)
        try:
            value = _convert(hints[f.name], raw[f.name], sub, base)
        except ConfigErrors as many:
            errors.extend(many.errors)
            continue
        except ConfigError as exc:
            errors.append(exc)
            continue
        if f.name == "python" and isinstance(value, str):
            if cls is CodeEnvConfig and PYTHON_VERSION.match(value):
                pass  # a version: resolved when the env is built (core/envbuild.py)
            elif os.sep not in value:
                value = shutil.which(value) or value  # a bare command name: found on PATH, like a shell would
            elif base is not None:
                # not resolve(): a venv's bin/python is a symlink, and following it would leave the venv
                value = os.path.abspath(os.path.join(base, os.path.expanduser(value)))
        elif f.name in _PATH_FIELDS and isinstance(value, str) and base is not None:
            value = str((base / os.path.expanduser(value)).resolve())
        elif f.name in _PATH_LIST_FIELDS and isinstance(value, list) and base is not None:
            value = [str((base / os.path.expanduser(v)).resolve()) for v in value]
        elif cls is CodeEnvConfig and f.name == "requirements" and base is not None:
            from cruised.core import envbuild

            value = envbuild.resolve_paths(value, str(base))  # --find-links wheels, ./pkg: relative to the config file
        kwargs[f.name] = value
    if errors:
        raise ConfigErrors(errors)
    obj = cls(**kwargs)
    obj.validate(path, errors)
    if errors:
        raise ConfigErrors(errors)
    return obj


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class ConfigErrors(ConfigError):
    """Every problem found in one file; ``str()`` gives one line each."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("", "\n".join(str(e) for e in errors))


def parse(raw: Any, base: Path | None = None) -> Config:
    try:
        return _build(Config, raw, "", base)
    except ConfigErrors:
        raise
    except ConfigError as exc:
        raise ConfigErrors([exc]) from None


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigErrors([ConfigError("", f"cannot read config {p}: {exc.strerror}")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigErrors([ConfigError("", f"{p}: invalid YAML{where}: {problem}")]) from None
    return parse(raw, p.resolve().parent)


def describe(cls: Any = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, default, doc) for every setting: the reference table in the README."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        key = _join(prefix, f.name)
        tp = hints[f.name]
        if typing.get_origin(tp) in (Union, types.UnionType):  # an optional section, e.g. pools.<name>.q
            inner = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(inner) == 1 and is_dataclass(inner[0]):
                tp = inner[0]
        if is_dataclass(tp):
            rows.extend(describe(tp, key))
            continue
        if typing.get_origin(tp) is dict and is_dataclass(typing.get_args(tp)[1]):
            rows.extend(describe(typing.get_args(tp)[1], f"{key}.<name>"))
            continue
        # doc() gave every field a default or a factory (never both)
        default = f.default_factory() if callable(f.default_factory) else f.default
        rows.append((key, repr(default), f.metadata.get("doc", "")))
    return rows
