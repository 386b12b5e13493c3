"""The services / http / pools.<name>.python settings: types, paths and cross-checks, with key paths in errors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cruised import config
from cruised.config import ConfigErrors, parse_listen


def load(tmp_path: Path, raw: dict[str, Any]) -> config.Config:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(raw))
    return config.load(p)


def errors(tmp_path: Path, raw: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigErrors) as info:
        load(tmp_path, raw)
    return [str(e) for e in info.value.errors]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "ep").mkdir()
    (tmp_path / "ep" / "code.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "data").mkdir()
    return tmp_path


def test_paths_resolve_relative_to_the_config_file(project: Path) -> None:
    cfg = load(
        project,
        {
            "pools": {"default": {}, "env": {"python": "venv/bin/python"}},
            "services": {
                "svc": {"endpoints": {"e": {"code": "ep/code.py", "function": "f", "pool": "env", "folders": ["data", "ep"], "test_queries": [{"x": 1}]}}}
            },
        },
    )
    ep = cfg.services["svc"].endpoints["e"]
    assert ep.code == str(project / "ep" / "code.py")
    assert ep.folders == [str(project / "data"), str(project / "ep")]
    assert ep.test_queries == [{"x": 1}]
    assert cfg.pools["env"].python == str(project / "venv" / "bin" / "python")
    assert cfg.endpoints() == {"svc/e": ("svc", "e", ep)}


def test_a_bare_interpreter_name_is_found_on_path(project: Path) -> None:
    name = os.path.basename(sys.executable)
    cfg = load(project, {"pools": {"default": {"python": name}}})
    assert cfg.pools["default"].python is not None and os.path.isabs(cfg.pools["default"].python)


def test_endpoint_errors_carry_key_paths(project: Path) -> None:
    errs = errors(project, {"services": {"svc": {"endpoints": {"e": {"code": "nope.py", "function": "not an id", "folders": ["data", "missing"]}}}}})
    assert errs == [
        f"services.svc.endpoints.e.code: no such file: {project / 'nope.py'}",
        "services.svc.endpoints.e.function: must be a Python identifier, got 'not an id'",
        f"services.svc.endpoints.e.folders[1]: no such directory: {project / 'missing'}",
    ]
    errs = errors(project, {"services": {"svc": {"endpoints": {"e": {"function": "f"}}}}})
    assert errs == ["services.svc.endpoints.e.code: required: the endpoint's .py file"]


def test_endpoint_pool_must_exist_and_names_are_url_safe(project: Path) -> None:
    ok = {"code": "ep/code.py", "function": "f"}
    errs = errors(project, {"pools": {"default": {}}, "services": {"svc": {"endpoints": {"e": {**ok, "pool": "gpu"}}}}})
    assert errs == ["services.svc.endpoints.e.pool: no pool named 'gpu' (configured: default)"]
    errs = errors(project, {"services": {"s v": {"endpoints": {"a/b": ok}}}})
    assert errs == ["services.s v.endpoints.a/b: endpoint names may use only letters, digits, '_', '-' and '.'"]


def test_test_queries_must_be_json_objects(project: Path) -> None:
    errs = errors(project, {"services": {"svc": {"endpoints": {"e": {"code": "ep/code.py", "function": "f", "test_queries": [{"x": 1}, [1, 2]]}}}}})
    assert errs == ["services.svc.endpoints.e.test_queries[1]: expected a mapping (a JSON object: the request body), got list"]


def test_api_keys_are_checked_without_being_echoed(project: Path) -> None:
    (project / "keys").write_text("# comment\n\ngood-key\nbad:key:more\nalice:named-key\n")
    errs = errors(project, {"services": {"svc": {"api_keys": ["fine", "with space", ":nameless"], "api_keys_file": "keys"}}})
    assert errs == [
        "services.svc.api_keys[1]: key contains whitespace or a second ':' (it is sent as an HTTP Basic user name; name:key names it)",
        "services.svc.api_keys[2]: key has an empty name or whitespace in its name (name:key)",
        "services.svc.api_keys_file: key number 2 contains whitespace or a second ':' (it is sent as an HTTP Basic user name; name:key names it)",
    ]
    assert not any("with space" in e or "key:more" in e or "nameless" in e for e in errs)


def test_a_named_api_key_is_its_caller_and_a_bare_one_a_digest(project: Path) -> None:
    from cruised.config import ServiceConfig

    svc = ServiceConfig(api_keys=["alice:k1", "k2"])
    (k1, alice), (k2, digest) = svc.named_keys()
    assert (k1, alice, k2) == ("k1", "alice", "k2")
    assert digest.startswith("key-") and len(digest) == 12 and "k2" not in digest
    errs = errors(project, {"services": {"svc": {"api_keys_file": "absent"}}})
    assert errs == [f"services.svc.api_keys_file: cannot read {project / 'absent'}: No such file or directory"]
    (project / "keys").write_text("good-key\nother\n")
    cfg = load(project, {"services": {"svc": {"api_keys": ["k1"], "api_keys_file": "keys"}}})
    assert cfg.services["svc"].keys() == ["k1", "good-key", "other"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("127.0.0.1:9580", ("127.0.0.1", 9580)),
        (":8080", ("127.0.0.1", 8080)),
        ("0.0.0.0", ("0.0.0.0", 9580)),
        ("[::1]:81", ("::1", 81)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


def test_bad_listen_address(tmp_path: Path) -> None:
    assert errors(tmp_path, {"http": {"listen": "host:http"}}) == ["http.listen: port must be a number from 0 to 65535, got 'http'"]
    assert errors(tmp_path, {"http": {"listen": "::1:80"}}) == ["http.listen: write IPv6 addresses as [addr]:port, got '::1:80'"]


def test_the_shipped_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    cfg = config.load(root / "config.yaml")
    assert set(cfg.endpoints()) == {"demo/hello", "demo/stats"}
    assert all(ep.test_queries for _, _, ep in cfg.endpoints().values())
    assert cfg.services["demo"].endpoints["stats"].folders == [str(root / "examples" / "demo" / "data")]


def test_every_new_setting_is_documented() -> None:
    rows = {key: text for key, _, text in config.describe()}
    for key in ("pools.<name>.python", "services.<name>.endpoints.<name>.code", "services.<name>.api_keys", "http.listen", "http.socket"):
        assert rows[key], key
