"""The code cache on its own: what a worker is sent before a call, and what is forgotten first."""

from __future__ import annotations

from collections import OrderedDict

import pytest

from cruised.core import codecache
from cruised.core.codecache import CodeCache


def frame(n: int, tag: bytes = b"f") -> bytearray:
    return bytearray(tag * n)


def test_a_worker_gets_the_define_frame_once_then_nothing() -> None:
    cache = CodeCache()
    cache.register(b"k", frame(10))
    known: OrderedDict[bytes, None] = OrderedDict()
    assert cache.parts_for(known, b"k") == [frame(10)]
    assert cache.parts_for(known, b"k") == []
    CodeCache.forget(known, b"k")  # the worker answered UNKNOWN_FUNCTION
    assert cache.parts_for(known, b"k") == [frame(10)]
    assert cache.parts_for(OrderedDict(), b"gone") is None


def test_the_pool_forgets_the_least_recently_registered_by_size_but_keeps_the_newest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecache, "CODE_CACHE_BYTES", 25)
    cache = CodeCache()
    cache.register(b"a", frame(10))
    cache.register(b"b", frame(10))
    cache.register(b"a", frame(10))  # registered again: now the most recent
    cache.register(b"c", frame(10))
    assert list(cache.frames) == [b"a", b"c"] and cache.nbytes == 20
    cache.register(b"huge", frame(100))  # larger than the limit: kept alone, its client calls it next
    assert list(cache.frames) == [b"huge"] and cache.nbytes == 100


def test_a_workers_mirror_is_bounded_least_recently_used_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codecache, "KNOWN_PER_WORKER", 2)
    cache = CodeCache()
    for key in (b"a", b"b", b"c"):
        cache.register(key, frame(1, key))
    known: OrderedDict[bytes, None] = OrderedDict()
    cache.parts_for(known, b"a")
    cache.parts_for(known, b"b")
    cache.parts_for(known, b"a")  # used: b is now the oldest
    cache.parts_for(known, b"c")
    assert list(known) == [b"a", b"c"]


def test_carry_over_keeps_every_frame_and_its_order() -> None:
    old, new = CodeCache(), CodeCache()
    for key in (b"a", b"b", b"c"):
        old.register(key, frame(3, key))
    new.register(b"b", frame(3, b"b"))
    new.carry_over(old)
    assert list(new.frames) == [b"a", b"b", b"c"] and new.nbytes == 9
