"""The HAProxy agent's line (daemon/ops/haproxy_agent.py) and the health config section."""

from __future__ import annotations

import pytest

from cruised import config
from cruised.client.errors import ConfigError
from cruised.ops.haproxy_agent import agent_line


def test_serving_says_up_ready_with_the_warm_workers_of_every_counted_pool() -> None:
    assert agent_line(False, False, [(True, 2), (True, 3)]) == "up ready maxconn:5\n"


def test_a_pool_still_warming_counts_its_warm_workers_while_another_is_ready() -> None:
    assert agent_line(False, False, [(True, 2), (False, 1)]) == "up ready maxconn:3\n"


def test_no_ready_pool_is_down() -> None:
    assert agent_line(False, False, [(False, 1), (False, 0)]) == "down\n"
    assert agent_line(False, False, []) == "down\n"


def test_draining_says_drain_whatever_the_pools() -> None:
    assert agent_line(False, True, [(True, 4)]) == "drain\n"
    assert agent_line(False, True, [(False, 0)]) == "drain\n"


def test_stopping_is_down_even_while_draining() -> None:
    assert agent_line(True, True, [(True, 4)]) == "down\n"


def test_maxconn_is_never_zero_which_haproxy_reads_as_no_limit() -> None:
    # a ready pool with min 0 and no worker yet: one call at a time starts one
    assert agent_line(False, False, [(True, 0)]) == "up ready maxconn:1\n"


def test_health_defaults_off() -> None:
    cfg = config.parse({})
    assert cfg.health.agent is None and cfg.health.address() is None and cfg.health.pools == []


def test_health_agent_address_and_pools() -> None:
    cfg = config.parse({"pools": {"a": {}, "b": {}}, "health": {"agent": "127.0.0.1:0", "pools": ["b"]}})
    assert cfg.health.address() == ("127.0.0.1", 0) and cfg.health.pools == ["b"]


@pytest.mark.parametrize(
    ("raw", "path", "words"),
    [
        ({"health": {"agent": "9581"}}, "health.agent", "expected host:port"),
        ({"health": {"agent": "127.0.0.1:99999"}}, "health.agent", "port must be"),
        ({"health": {"pools": ["nope"]}}, "health.pools[0]", "no pool named 'nope'"),
        ({"health": {"agnet": "127.0.0.1:1"}}, "health.agnet", ""),
    ],
)
def test_health_errors_carry_the_key_path(raw: dict[str, object], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.parse(raw)
    errors = getattr(info.value, "errors", [info.value])
    assert any(e.path == path and words in e.message for e in errors), [str(e) for e in errors]
