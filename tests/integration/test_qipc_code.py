"""Code on the kdb+ IPC door needs an opt-in and a login that proves who sent it (issue 21).

Unmodified pykx clients against the real daemon: a pykx.remote session, and
the q messages pykx 2.x sends for pykx.remote (over the abstract Unix socket,
which pykx.remote.session cannot dial). Endpoint calls keep working for
loopback peers without a password. Every TCP door says at start how it
authenticates, and an HTTP door beyond loopback names its keyless services.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support.daemon import Daemon, pool_config, wait_for
from support.qraw import kx, sym

ENV = {"PYKX_UNLICENSED": "true"}
PASSWORD = "s3cret"
EPS = "def add(x, y):\n    return x + y\n"
# what pykx 2.x's remote session sends: import a library, then run a function's source
LIBRARY = '{x:string x;  @[.pykx.pyexec;"import ",x;{\'"Failed to load package: ",x," with: ",y}[x]]}'
CALL = '{.pykx.pyexec "\\n" sv 1_"\\n" vs x; .pykx.get[y;<] . z}'
SOURCE = b"@kx.remote.function(session)\ndef twice(x):\n    return x * 2\n"


def config(tmp_path: Path, **qipc: Any) -> dict[str, Any]:
    code = tmp_path / "eps.py"
    code.write_text(EPS)
    return {
        "http": {"enabled": False},
        "pools": {"default": pool_config(min=1, cruise=1, max=2)},
        "services": {"demo": {"endpoints": {"add": {"code": str(code), "function": "add"}}}},
        "qipc": {"listen": "127.0.0.1:0", **qipc},
    }


def port(d: Daemon) -> int:
    return int(d.status()["qipc"]["port"])


def remote_twice(d: Daemon, **login: Any) -> Any:
    """An unmodified pykx.remote session from loopback: one function, called once."""
    session = kx.remote.session("127.0.0.1", port(d), **login)
    try:

        @kx.remote.function(session)
        def twice(x: int) -> int:
            return x * 2

        return twice(21).py()
    finally:
        session.close()


def refusal(fn: Callable[[], Any]) -> str:
    with pytest.raises(kx.QError) as info:
        fn()
    return str(info.value)


def test_default_q_door_runs_no_code_but_serves_endpoints(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(config(tmp_path), env=ENV)  # the defaults: no users_file, loopback trust on, remote_functions off
    assert "qipc.remote_functions: false" in refusal(lambda: remote_twice(d))
    with kx.SyncQConnection("127.0.0.1", port(d), no_ctx=True) as q:  # loopback, no password: endpoint calls as before
        assert q("demo/add", 2, 3).py() == 5
    st = d.status()["qipc"]
    assert st["auth"]["remote_functions"] is False and st["auth"]["code"].startswith("off")
    assert st["refused"].get("remote_functions") == 1
    line = next(ln for ln in d.log().splitlines() if "qipc door on 127.0.0.1:" in ln)
    assert "no users_file" in line and "loopback peers without a password trusted for endpoint calls" in line and "code: off" in line


def test_opted_in_code_still_needs_a_password_login(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text(f"alice:{PASSWORD}\n")
    d = start_daemon(config(tmp_path, users_file=str(users), remote_functions=True), env=ENV)
    text = refusal(lambda: remote_twice(d))  # loopback trust lets it in, but not to run code
    assert "password login from qipc.users_file" in text and "loopback" in text
    assert remote_twice(d, username="alice", password=PASSWORD) == 42
    with kx.SyncQConnection("127.0.0.1", port(d), no_ctx=True) as q:  # endpoint calls: loopback trust as before
        assert q("demo/add", 1, 1).py() == 2
    line = next(ln for ln in d.log().splitlines() if "qipc door on 127.0.0.1:" in ln)
    assert f"logins checked against {users}" in line and "password logins from the users file" in line


def _unix_remote(qport: int) -> Any:
    with kx.SyncQConnection(port=qport, unix=True, no_ctx=True) as q:  # the abstract socket, no password
        assert isinstance(q(LIBRARY, sym("math")), kx.Identity)
        return q(CALL, SOURCE, sym("twice"), [4]).py()


def _as_other_uid(fn: Callable[[], str], uid: int = 65534) -> str:
    """``fn()`` in a forked child that first becomes ``uid`` (modules already imported): its text, or its error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and never returns
        code = 0
        try:
            os.setgid(uid)
            os.setuid(uid)
            out = fn()
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as text
            out, code = f"{type(exc).__name__}: {exc}", 1
        os.write(write, out.encode()[:4096])
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        text = fh.read().decode()
    os.waitpid(pid, 0)
    return text


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run the second client as another uid")
def test_abstract_unix_socket_checks_the_peer_uid(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    d = start_daemon(config(tmp_path, remote_functions=True), env=ENV)
    qport = port(d)
    assert _unix_remote(qport) == 8  # our uid is the daemon's: allowed with no allowlist
    other = _as_other_uid(lambda: str(_unix_remote(qport)))
    assert "uid 65534 is not" in other and "QError" in other, other  # the daemon's own uid only
    cfg = config(tmp_path, remote_functions=True)
    cfg["daemon"] = {"allow_uids": [0, 65534]}  # the native door's allowlist (the harness is uid 0)
    listed = port(start_daemon(cfg, env=ENV))
    assert _as_other_uid(lambda: str(_unix_remote(listed))) == "8"


def test_http_door_beyond_loopback_names_its_keyless_services(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    cfg = config(tmp_path)
    del cfg["qipc"]
    cfg["http"] = {"listen": "0.0.0.0:0"}
    cfg["services"]["keyed"] = {"api_keys": ["k1"], "endpoints": dict(cfg["services"]["demo"]["endpoints"])}
    path = tmp_path / "exposed.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    checked = subprocess.run([sys.executable, "-m", "cruised", "check-config", str(path)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert "warning: http.listen 0.0.0.0:0 is reachable beyond this host and services demo have no api_keys" in checked.stderr
    d = start_daemon(cfg)
    wait_for(lambda: "have no api_keys" in d.log(), what="the exposure warning")
    warning = next(ln for ln in d.log().splitlines() if "have no api_keys" in ln)
    assert "WARNING" in warning and "services demo " in warning and "keyed" not in warning.split("services", 1)[1].split("have")[0]
    line = next(ln for ln in d.log().splitlines() if "http door on" in ln)
    assert "API keys for keyed" in line and "no key for demo" in line and "no shipped code" in line
    auth = d.status()["http"]["auth"]
    assert auth["tcp"] == {"api_keys_for": ["keyed"], "no_key_for": ["demo"]}


def test_loopback_http_door_says_how_it_authenticates_without_a_warning(start_daemon: Callable[..., Daemon], tmp_path: Path) -> None:
    cfg = config(tmp_path)
    del cfg["qipc"]
    cfg["http"] = {"listen": "127.0.0.1:0"}
    d = start_daemon(cfg)
    wait_for(lambda: "http door on 127.0.0.1:" in d.log(), what="the http door's auth line")
    assert "have no api_keys" not in d.log()
