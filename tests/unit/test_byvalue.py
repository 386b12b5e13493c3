"""Pickling by value (pool/wire/byvalue.py, bundle.pack's fallback): what the loading process
cannot import goes by value, a class comes back as the caller's own and is left as it was, and
``__slots__`` survive. The far side is a fresh interpreter, as a worker is."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest

import __main__
from cruised.pool.wire import bundle

#: the far side: load a stream from stdin, apply its function to its argument, pickle the result back
FAR_SIDE = (
    "import pickle, sys; from cruised.pool.wire import bundle; fn, arg = pickle.loads(sys.stdin.buffer.read()); sys.stdout.buffer.write(bundle.dumps(fn(arg)))"
)


def far_side(fn: object, arg: object) -> object:
    proc = subprocess.run([sys.executable, "-c", FAR_SIDE], input=bundle.dumps((fn, arg)), capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    return pickle.loads(proc.stdout)


@pytest.fixture
def in_main(monkeypatch: pytest.MonkeyPatch):
    """Define classes as a script's __main__ would: plain pickle finds them there, by reference."""

    def put(cls: type) -> type:
        cls.__module__ = "__main__"
        cls.__qualname__ = cls.__name__
        monkeypatch.setattr(__main__, cls.__name__, cls, raising=False)
        return cls

    return put


def test_plain_objects_stay_plain_pickle() -> None:
    data = bundle.dumps({"a": [1, 2.5, "x"], "b": (None, b"y")})
    assert b"cloudpickle" not in data
    assert bundle.pack(42)[1] == pickle.dumps(42, protocol=bundle.PROTOCOL)


def test_a_main_class_goes_by_value_and_comes_back_as_the_callers_own(in_main) -> None:
    @in_main
    @dataclasses.dataclass
    class Point:
        x: int
        y: int

        def moved(self, d: int) -> Point:
            return Point(self.x + d, self.y + d)

    assert pickle.loads(pickle.dumps(Point(1, 2))) == Point(1, 2), "plain pickle would refer to __main__"
    out = far_side(lambda p: p.moved(1), Point(1, 2))
    assert type(out) is Point and out == Point(2, 3)
    assert far_side(lambda p: type(p), Point(0, 0)) is Point


def test_the_callers_class_is_left_as_it_was(in_main) -> None:
    @in_main
    class Counter:
        hits = 0

        def bump(self) -> int:
            type(self).hits += 1
            return type(self).hits

    before = dict(vars(Counter))
    out = far_side(lambda c: (c.bump(), c)[1], Counter())
    assert type(out) is Counter
    assert Counter.hits == 0, "the far side's class attribute came back into the caller's class"
    assert all(vars(Counter)[k] is v for k, v in before.items())


def test_slots_survive_the_round_trip(in_main) -> None:
    @in_main
    class Slotted:
        __slots__ = ("a", "b")

        def __init__(self, a: int, b: int) -> None:
            self.a, self.b = a, b

    out = far_side(lambda o: (type(o)(o.b, o.a), hasattr(type(o)(1, 2), "__dict__")), Slotted(1, 2))
    made, has_dict = out
    assert type(made) is Slotted and (made.a, made.b) == (2, 1)
    assert has_dict is False, "the far side built the class without its slots"


def test_a_module_registered_by_value_is_searched_for(in_main) -> None:
    assert bundle._mark("__main__") == b"\x8c\x08__main__"
    assert bundle._mark("m" * 300).startswith(b"\x8d")


def test_a_class_is_pickled_once_per_process(in_main) -> None:
    @in_main
    @dataclasses.dataclass
    class Tick:
        sym: str

    first, second = bundle.dumps(Tick("a")), bundle.dumps(Tick("a"))
    assert first == second and b"_class_from" in first, "the class's stream is reused, not rebuilt"
    assert pickle.loads(second) == Tick("a") and type(pickle.loads(second)) is Tick
    assert far_side(lambda t: [t, t.sym], Tick("b")) == [Tick("b"), "b"]


def test_an_enum_class_is_found_by_its_tracker_id(in_main) -> None:
    import enum

    from cruised.pool.wire import byvalue

    @in_main
    class Side(enum.Enum):
        BUY = 1
        SELL = -1

    data = bundle.dumps(Side.SELL)
    assert pickle.loads(data) is Side.SELL
    tracker_id, _ = byvalue._blobs[Side]
    assert byvalue._class_from(tracker_id, b"not a pickle: never read for a known class") is Side
    assert far_side(lambda s: s, Side.BUY) is Side.BUY
