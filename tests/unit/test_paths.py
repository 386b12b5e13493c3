"""Socket lookup order (daemon/client/paths.py): the daemon's bind location and the client's search.

The system runtime directory and the environment are injected, so these run
as any user and never look at the real /run/cruised.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cruised.client import paths


@pytest.fixture
def system_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Unix socket paths must stay short: not under pytest's tmp_path
    d = Path(tempfile.mkdtemp(prefix="crp", dir="/tmp"))
    monkeypatch.setattr(paths, "SYSTEM_RUNTIME_DIR", str(d))
    for name in ("CRUISED_SOCKET", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """/run is not writable, as for any user but root."""
    real = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode, **kw: False if p == "/run" else real(p, mode, **kw))


def listening(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    return s


def test_client_prefers_an_existing_system_socket_to_per_user_locations(system_dir: Path, not_root: None, tmp_path: Path) -> None:
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    env = {"XDG_RUNTIME_DIR": str(xdg)}
    assert paths.client_socket(env) == str(xdg / "cruised" / paths.SOCKET_NAME)  # no system daemon: the user's own
    with listening(system_dir / paths.SOCKET_NAME):
        assert paths.client_socket(env) == str(system_dir / paths.SOCKET_NAME)
        assert paths.client_socket({}) == str(system_dir / paths.SOCKET_NAME)
        # a command run by a unit of another service with a RuntimeDirectory= of its own still finds the system daemon
        assert paths.client_socket({"RUNTIME_DIRECTORY": str(tmp_path)}) == str(system_dir / paths.SOCKET_NAME)


def test_cruised_socket_comes_first(system_dir: Path) -> None:
    with listening(system_dir / paths.SOCKET_NAME):
        assert paths.client_socket({"CRUISED_SOCKET": "/elsewhere/c.sock"}) == "/elsewhere/c.sock"


def test_only_a_socket_counts_as_the_system_daemon(system_dir: Path, not_root: None, tmp_path: Path) -> None:
    (system_dir / paths.SOCKET_NAME).write_text("not a socket")
    env = {"RUNTIME_DIRECTORY": str(tmp_path)}
    assert paths.client_socket(env) == str(tmp_path / paths.SOCKET_NAME)
    (system_dir / paths.SOCKET_NAME).unlink()
    assert paths.client_socket({}) == os.path.join(tempfile.gettempdir(), f"cruised-{os.getuid()}", paths.SOCKET_NAME)


def test_client_follows_the_environment_the_daemon_binds_by(system_dir: Path, not_root: None, tmp_path: Path) -> None:
    # no system socket: the client looks where a daemon with the same environment binds
    for env in ({"RUNTIME_DIRECTORY": f"{tmp_path}:/other"}, {"XDG_RUNTIME_DIR": str(tmp_path)}, {}):
        assert paths.client_socket(env) == os.path.join(paths.runtime_dir(env), paths.SOCKET_NAME)
    assert paths.runtime_dir({"RUNTIME_DIRECTORY": f"{tmp_path}:/other"}) == str(tmp_path)


def test_the_daemon_binds_in_its_own_runtime_dir_even_with_a_system_daemon_running(
    system_dir: Path, not_root: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    with listening(system_dir / paths.SOCKET_NAME):
        assert paths.default_socket() == str(tmp_path / "cruised" / paths.SOCKET_NAME)
        assert paths.default_socket("/etc/x.sock") == "/etc/x.sock"
        monkeypatch.setenv("CRUISED_SOCKET", "/mine.sock")
        assert paths.default_socket("/etc/x.sock") == "/mine.sock"


def test_root_binds_in_the_system_runtime_dir(system_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    monkeypatch.setattr(paths.os, "access", lambda p, mode, **kw: True if p == "/run" else real(p, mode, **kw))
    assert paths.runtime_dir({}) == str(system_dir)
    assert paths.default_socket() == str(system_dir / paths.SOCKET_NAME)
    assert paths.client_socket({}) == str(system_dir / paths.SOCKET_NAME)
