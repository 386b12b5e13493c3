"""Generations and the swap, in process: built like the daemon builds them, never started (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cruised import config as config_mod
from cruised.core.supervisor import Supervisor
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind

KEY = b"K" * 16


def pools(*names: str) -> config_mod.Config:
    return config_mod.parse({"pools": {name: {"min": 1, "cruise": 1, "max": 1} for name in names}})


async def test_the_first_generation_is_built_like_a_reloads_and_serves(tmp_path: Path) -> None:
    sup = Supervisor(pools("a", "b"), str(tmp_path / "s.sock"))
    gen = sup.serving
    assert gen.number == 1 and sup.config is gen.config
    assert sup.dispatcher("a") is gen.pools["a"].dispatcher and sup.dispatcher("nope") is None
    for pool in gen.pools.values():  # wired for readiness, metrics and the access log
        assert pool.dispatcher.on_change == sup._check_ready
        assert sup.metrics in pool.dispatcher.observers
    assert sup.all_pools() == list(gen.pools.values())


async def test_install_swaps_in_one_step_and_hands_back_the_old_generation(tmp_path: Path) -> None:
    sup = Supervisor(pools("a", "b"), str(tmp_path / "s.sock"))
    old = sup.serving
    define = bytearray(frames.frame(Kind.DEFINE, 0, frames.register_head("a", KEY, b"{}")))
    old.pools["a"].dispatcher.register(KEY, define)
    new = sup.new_generation(pools("a", "c"))
    assert new.number == 2 and sup.serving is old  # built, not serving
    assert sup.metrics in new.pools["c"].dispatcher.observers

    assert sup.install(new) is old
    assert sup.serving is new and sup.config is new.config
    assert sup.dispatcher("a") is new.pools["a"].dispatcher and sup.dispatcher("b") is None
    assert new.pools["a"].dispatcher.code[KEY] is define  # shipped functions stay registered
    assert not any(p.dispatcher.accepting for p in old.pools.values())
    assert all(p.dispatcher.accepting for p in new.pools.values())
    with pytest.raises(ValueError, match="already serving"):
        sup.install(new)


async def test_worker_ids_continue_across_generations_of_a_pool(tmp_path: Path) -> None:
    sup = Supervisor(pools("a"), str(tmp_path / "s.sock"))
    old = sup.serving.pools["a"].dispatcher
    new_gen = sup.new_generation(pools("a", "b"))
    new = new_gen.pools["a"].dispatcher
    # one counter for the pool's name: the two generations never hand out the same id
    assert new.worker_ids is old.worker_ids
    assert [next(old.worker_ids), next(new.worker_ids), next(old.worker_ids)] == [1, 2, 3]
    assert next(new_gen.pools["b"].dispatcher.worker_ids) == 1
