"""The config schema: defaults, units, and one precise error line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cruised import config
from cruised.config import ConfigErrors


def errors_of(raw: object) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        config.parse(raw)
    return [str(e) for e in info.value.errors]


def test_defaults_follow_dss() -> None:
    cfg = config.parse({})
    pool = cfg.pools["default"]
    assert (pool.min, pool.cruise, pool.max, pool.queue_size) == (1, 2, 8, 16)
    assert pool.queue_timeout == 10.0 and pool.exec_timeout == 60.0 and pool.idle_timeout == 30.0
    assert pool.max_requests == 0
    assert cfg.daemon.socket_mode == 0o660


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0), (3, 3.0), ("1.5s", 1.5), ("10000ms", 10.0)],
)
def test_durations(text: object, seconds: float) -> None:
    cfg = config.parse({"pools": {"p": {"queue_timeout": text}}})
    assert cfg.pools["p"].queue_timeout == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "size"), [("64MiB", 64 << 20), ("512KiB", 512 << 10), ("10MB", 10_000_000), (8192, 8192), ("1GiB", 1 << 30)])
def test_sizes(text: object, size: int) -> None:
    assert config.parse({"daemon": {"max_message_bytes": text}}).daemon.max_message_bytes == size


def test_cruise_above_max_names_the_key_and_values() -> None:
    assert errors_of({"pools": {"default": {"cruise": 12, "max": 8}}}) == ["pools.default.cruise: must be <= max (8), got 12"]


def test_min_above_cruise() -> None:
    assert errors_of({"pools": {"p": {"min": 3, "cruise": 2}}}) == ["pools.p.min: must be <= cruise (2), got 3"]


def test_unknown_key_suggests_the_right_one() -> None:
    (line,) = errors_of({"pools": {"default": {"crusie": 2}}})
    assert line.startswith("pools.default.crusie: unknown key") and "'cruise'" in line


def test_unknown_top_level_key() -> None:
    (line,) = errors_of({"daemons": {}})
    assert line.startswith("daemons: unknown key")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"pools": {"p": {"max": 0}}}, "pools.p.max: must be positive, got 0"),
        ({"pools": {"p": {"cruise": -1}}}, "pools.p.cruise: must be positive, got -1"),
        ({"pools": {"p": {"queue_size": -2}}}, "pools.p.queue_size: must not be negative, got -2"),
        ({"pools": {"p": {"prefetch": 65}}}, "pools.p.prefetch: must be between 0 and 64, got 65"),
        ({"pools": {"p": {"prefetch": -1}}}, "pools.p.prefetch: must be between 0 and 64, got -1"),
        ({"pools": {"p": {"prefetch": "some"}}}, "pools.p.prefetch: expected an integer, got 'some'"),
        ({"pools": {"p": {"max": "eight"}}}, "pools.p.max: expected an integer, got 'eight'"),
        ({"pools": {"p": {"max": True}}}, "pools.p.max: expected an integer, got True"),
        ({"pools": {"p": {"queue_timeout": "soon"}}}, "pools.p.queue_timeout: expected a duration (e.g. 10s, 500ms), got 'soon'"),
        ({"pools": {"p": {"exec_timeout": "0s"}}}, "pools.p.exec_timeout: must be positive, got 0.0"),
        ({"daemon": {"max_message_bytes": "lots"}}, "daemon.max_message_bytes: expected a size (e.g. 64MiB), got 'lots'"),
        ({"pools": {"p": {"libraries": ["numpy"], "init": "/nonexistent/init.py"}}}, "pools.p.init: no such file: /nonexistent/init.py"),
        ({"pools": {"p": {"libraries": {"not an alias": "numpy"}}}}, "pools.p.libraries.not an alias: alias must be a Python identifier"),
        ({"pools": []}, "pools: expected a mapping, got list"),
        ({"pools": {}}, "pools: at least one pool is required"),
    ],
)
def test_each_problem_is_one_precise_line(raw: object, expected: str) -> None:
    assert expected in errors_of(raw)


def test_socket_mode_must_be_a_quoted_octal_string() -> None:
    (line,) = errors_of({"daemon": {"socket_mode": 660}})
    assert line.startswith("daemon.socket_mode: expected an octal mode string") and "quotes" in line
    assert config.parse({"daemon": {"socket_mode": "0600"}}).daemon.socket_mode == 0o600


def test_several_problems_are_all_reported() -> None:
    lines = errors_of({"pools": {"a": {"cruise": 9, "max": 8}, "b": {"bogus": 1}}})
    assert any(line.startswith("pools.a.cruise") for line in lines) or any(line.startswith("pools.b.bogus") for line in lines)


def test_library_list_means_same_name_aliases() -> None:
    cfg = config.parse({"pools": {"p": {"libraries": ["numpy", "os.path"]}}})
    assert cfg.pools["p"].libraries == {"numpy": "numpy", "path": "os.path"}


def test_relative_init_path_resolves_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "init.py").write_text("X = 1\n")
    (tmp_path / "c.yaml").write_text("pools:\n  p:\n    init: init.py\n")
    assert config.load(tmp_path / "c.yaml").pools["p"].init == str(tmp_path / "init.py")


def test_invalid_yaml_says_where(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  p: [1, 2\n")
    with pytest.raises(ConfigErrors) as info:
        config.load(bad)
    assert "invalid YAML at line" in str(info.value)


def test_the_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    config.load(root / "config.yaml")


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("pools:\n  default:\n    cruise: 2\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  default:\n    cruise: 12\n    max: 8\n")
    ok = subprocess.run([sys.executable, "-m", "cruised", "check-config", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    fail = subprocess.run([sys.executable, "-m", "cruised", "check-config", str(bad)], capture_output=True, text=True)
    assert fail.returncode == 2
    assert fail.stderr.strip().splitlines() == [f"{bad}: pools.default.cruise: must be <= max (8), got 12"]


def test_serve_with_bad_config_exits_2_with_the_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  default:\n    max: 0\n")
    proc = subprocess.run([sys.executable, "-m", "cruised", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "pools.default.max: must be positive, got 0" in proc.stderr


def test_describe_lists_every_setting_once() -> None:
    keys = [k for k, _, _ in config.describe()]
    assert "pools.<name>.cruise" in keys and "daemon.socket_mode" in keys
    assert len(keys) == len(set(keys))


# -- pools.<name>.q -------------------------------------------------------------------


def test_q_section_defaults_and_worker_spec() -> None:
    assert config.parse({}).pools["default"].q is None
    pool = config.parse({"pools": {"p": {"exec_timeout": "45s", "q": {"port": 5010, "password": "pw-in-config"}}}}).pools["p"]
    q = pool.q
    assert q is not None and (q.host, q.port, q.username, q.tls, q.unix, q.required) == ("127.0.0.1", 5010, "", False, False, False)
    assert (q.reconnect.initial, q.reconnect.max, q.connect_timeout) == (0.5, 30.0, 5.0)
    assert "pw-in-config" not in repr(pool) and "pw-in-config" not in repr(q)
    spec = q.worker_spec(pool.exec_timeout)
    assert spec["timeout"] == 45.0 and spec["password"] == "pw-in-config"  # default: the pool's exec_timeout
    assert spec["reconnect_initial"] == 0.5 and spec["reconnect_max"] == 30.0 and "reconnect" not in spec
    assert q.endpoint == "127.0.0.1:5010"
    assert config.parse({"pools": {"p": {"q": {"port": 5010, "unix": True}}}}).pools["p"].q.endpoint == "unix:/tmp/kx.5010"


def test_q_password_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "q.pw").write_text("secret\n")
    (tmp_path / "c.yaml").write_text("pools:\n  p:\n    q: {port: 5010, password_file: q.pw, reconnect: {initial: 100ms, max: 2s}}\n")
    q = config.load(tmp_path / "c.yaml").pools["p"].q
    assert q is not None and q.password_file == str(tmp_path / "q.pw")
    assert (q.reconnect.initial, q.reconnect.max) == (0.1, 2.0)


def test_q_section_errors_name_the_key() -> None:
    assert errors_of({"pools": {"p": {"q": {"port": 70000}}}}) == ["pools.p.q.port: must be a port number 1..65535, got 70000"]
    assert errors_of({"pools": {"p": {"q": {"port": 1, "password_env": "A", "password_file": "/nonexistent/q.pw"}}}}) == [
        "pools.p.q.password_env: give only one of password, password_file, password_env (also set: password_file)",
        "pools.p.q.password_file: no such file: /nonexistent/q.pw",
    ]
    assert errors_of({"pools": {"p": {"q": {"port": 1, "reconnect": {"initial": "1m", "max": "1s"}}}}}) == [
        "pools.p.q.reconnect.initial: must be <= max (1s), got 60s"
    ]
    assert errors_of({"pools": {"p": {"q": {"port": 1, "tls": True, "unix": True, "connect_timeout": 0}}}}) == [
        "pools.p.q.tls: TLS is for TCP; a unix: true connection is local and cannot use it",
        "pools.p.q.connect_timeout: must be positive, got 0.0",
    ]
    (line,) = errors_of({"pools": {"p": {"q": {"port": 1, "pasword": "x"}}}})
    assert line.startswith("pools.p.q.pasword: unknown key") and "'password'" in line
    assert errors_of({"pools": {"p": {"q": "localhost:5010"}}}) == ["pools.p.q: expected a mapping at pools.p.q, got str"]


def test_describe_includes_the_q_section() -> None:
    keys = [k for k, _, _ in config.describe()]
    assert "pools.<name>.q.port" in keys and "pools.<name>.q.reconnect.max" in keys
