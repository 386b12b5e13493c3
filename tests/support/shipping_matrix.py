# The shipping matrix (issue 16): everything a script, REPL or notebook defines in `__main__`,
# shipped to a worker and back. This file is never imported: it is run AS `__main__` (a script,
# a `python` REPL fed line by line through a pty, IPython's run_cell, a Jupyter kernel's cells;
# tests/support/shipping_envs.py drives each), so every class and function here lives in the
# caller's `__main__`, as a user's would. Cells are separated by `# %%` lines; inside a cell,
# no blank lines (the plain REPL ends a block at a blank line) and no multi-line strings.
# Each case prints `MATRIX|<name>|ok` or `MATRIX|<name>|FAIL|<reason>`; the last line is
# `MATRIX|END|<count>`. The backend is cruised (a session on CRUISED_SOCKET) unless
# SHIPPING_BACKEND=cloudpickle, the reference: plain cloudpickle to a subprocess and back
# (tests/support/shipping_reference.py), what Ray, Dask and PySpark do.
# %%
import abc
import collections
import dataclasses
import enum
import functools
import os
import sys
import typing
import numpy as np
import json as js
if os.environ.get("SHIPPING_BACKEND") == "cloudpickle":
    sys.path.insert(0, os.environ["SHIPPING_SUPPORT_PATH"])
    from support.shipping_reference import ReferenceSession
    s = ReferenceSession()
else:
    import cruised
    s = cruised.session()
CASES = []
def case(fn):
    CASES.append(fn)
    return fn
# %%
class Point:
    kind = "point"
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return self.x * self.x + self.y * self.y
    def scaled(self, k):
        return Point(self.x * k, self.y * k)
    def __eq__(self, other):
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)
    def __hash__(self):
        return hash((self.x, self.y))
    def __repr__(self):
        return f"Point({self.x}, {self.y})"
@case
def class_with_methods_and_class_attrs():
    assert s.call(lambda p: (p.norm2(), p.kind), Point(3, 4)) == (25, "point")
    assert s.call(lambda: Point.kind + "!") == "point!"
@case
def instance_as_argument_and_result():
    out = s.call(lambda p, k: p.scaled(k), Point(1, 2), 3)
    assert type(out) is Point, type(out)
    assert isinstance(out, Point) and out == Point(3, 6)
@case
def class_itself_comes_back_as_the_callers_class():
    assert s.call(lambda: Point) is Point
    assert s.call(lambda p: type(p), Point(0, 0)) is Point
@case
def the_callers_class_is_left_as_it_was():
    before = dict(vars(Point))
    assert s.call(lambda p: p, Point(5, 6)) == Point(5, 6)
    assert all(vars(Point)[k] is v for k, v in before.items()), "the round trip replaced the class's attributes"
    assert Point.scaled.__globals__ is globals(), "a method's globals are no longer the caller's"
@case
def instances_in_containers_both_ways():
    out = s.call(lambda d: {k: [p.scaled(2) for p in v] for k, v in d.items()}, {"a": [Point(1, 1)], "b": [Point(2, 0), Point(0, 2)]})
    assert out == {"a": [Point(2, 2)], "b": [Point(4, 0), Point(0, 4)]}
    assert s.call(lambda ps: len(set(ps)), [Point(1, 1), Point(1, 1), Point(2, 2)]) == 2
# %%
class Slotted:
    __slots__ = ("a", "b")
    def __init__(self, a, b):
        self.a, self.b = a, b
    def total(self):
        return self.a + self.b
@case
def slots():
    out = s.call(lambda o: Slotted(o.total(), o.a), Slotted(2, 5))
    assert type(out) is Slotted and (out.a, out.b) == (7, 2)
    assert not hasattr(out, "__dict__")
# %%
class Shape:
    def __init__(self, name):
        self.name = name
    def describe(self):
        return f"shape {self.name}"
    def area(self):
        raise NotImplementedError
class Rect(Shape):
    def __init__(self, w, h):
        super().__init__("rect")
        self.w, self.h = w, h
    def describe(self):
        return super().describe() + f" {self.w}x{self.h}"
    def area(self):
        return self.w * self.h
class Square(Rect):
    def __init__(self, side):
        super().__init__(side, side)
@case
def inheritance_and_super():
    assert s.call(lambda r: (r.describe(), r.area()), Rect(2, 3)) == ("shape rect 2x3", 6)
    out = s.call(lambda n: Square(n), 4)
    assert type(out) is Square and isinstance(out, Rect) and isinstance(out, Shape)
    assert out.area() == 16 and out.describe() == "shape rect 4x4"
    assert s.call(lambda sq: (isinstance(sq, Shape), Square.__mro__[1] is Rect), Square(1)) == (True, True)
# %%
class Temperature:
    scale = "C"
    def __init__(self, c):
        self._c = c
    @property
    def f(self):
        return self._c * 9 / 5 + 32
    @f.setter
    def f(self, value):
        self._c = (value - 32) * 5 / 9
    @classmethod
    def boiling(cls):
        return cls(100)
    @staticmethod
    def valid(c):
        return c >= -273.15
@case
def properties_classmethods_staticmethods():
    def remote(t):
        t.f = 212
        return t.f, t._c, Temperature.boiling()._c, Temperature.valid(-300)
    assert s.call(remote, Temperature(0)) == (212.0, 100.0, 100, False)
    assert s.call(Temperature.boiling)._c == 100
    assert s.call(Temperature.valid, 5) is True
# %%
@dataclasses.dataclass
class Trade:
    sym: str
    px: float
    qty: int = 1
    tags: list = dataclasses.field(default_factory=list)
    def notional(self):
        return self.px * self.qty
@dataclasses.dataclass(frozen=True)
class Quote:
    sym: str
    bid: float
    ask: float
@case
def dataclasses_compare_equal_to_local_ones():
    out = s.call(lambda t: dataclasses.replace(t, qty=t.qty * 2, tags=t.tags + ["x"]), Trade("AAPL", 10.0, 3))
    assert out == Trade("AAPL", 10.0, 6, ["x"]), out
    assert s.call(lambda t: t.notional(), Trade("MSFT", 2.5, 4)) == 10.0
    assert s.call(lambda: dataclasses.fields(Trade)[2].default) == 1
@case
def frozen_dataclass():
    q = s.call(lambda sym: Quote(sym, 1.0, 1.5), "IBM")
    assert q == Quote("IBM", 1.0, 1.5) and hash(q) == hash(Quote("IBM", 1.0, 1.5))
    try:
        q.bid = 2.0
    except dataclasses.FrozenInstanceError:
        pass
    else:
        raise AssertionError("the frozen dataclass that came back is not frozen")
    def remote(q):
        try:
            q.bid = 0.0
        except dataclasses.FrozenInstanceError:
            return "frozen"
        return "mutable"
    assert s.call(remote, Quote("X", 1.0, 2.0)) == "frozen"
# %%
class Color(enum.Enum):
    RED = 1
    GREEN = 2
class Level(enum.IntEnum):
    LOW = 1
    HIGH = 10
class Perm(enum.Flag):
    R = 4
    W = 2
    X = 1
@case
def enums_intenum_flag():
    assert s.call(lambda c: c, Color.RED) is Color.RED
    assert s.call(lambda: Color(2)) is Color.GREEN
    assert s.call(lambda c: c is Color.GREEN, Color.GREEN) is True
    assert s.call(lambda lv: lv + 1, Level.HIGH) == 11
    assert s.call(lambda: Level.LOW) is Level.LOW
    out = s.call(lambda p: p | Perm.X, Perm.R | Perm.W)
    assert out == Perm.R | Perm.W | Perm.X and type(out) is Perm
    assert s.call(lambda p: Perm.W in p, Perm.R | Perm.W) is True
# %%
class Bar(typing.NamedTuple):
    sym: str
    close: float
    volume: int = 0
Tick = collections.namedtuple("Tick", ["sym", "px"])
@case
def typing_namedtuple():
    out = s.call(lambda b: b._replace(close=b.close * 2), Bar("A", 1.5, 7))
    assert type(out) is Bar and out == Bar("A", 3.0, 7) and out.volume == 7
    assert s.call(lambda: Bar("B", 1.0)) == Bar("B", 1.0, 0)
@case
def collections_namedtuple():
    out = s.call(lambda t: Tick(t.sym.lower(), t.px + 1), Tick("X", 1))
    assert type(out) is Tick and out == Tick("x", 2)
# %%
class PricingError(Exception):
    pass
class StaleQuote(PricingError):
    def __init__(self, sym, age):
        super().__init__(sym, age)
        self.sym, self.age = sym, age
@case
def exception_classes_are_caught_by_the_callers_except():
    def fail(sym):
        raise StaleQuote(sym, 42)
    try:
        s.call(fail, "IBM")
    except StaleQuote as exc:
        assert type(exc) is StaleQuote and (exc.sym, exc.age) == ("IBM", 42), exc
    else:
        raise AssertionError("no exception")
    try:
        s.call(fail, "X")
    except PricingError:
        pass
    def plain():
        raise PricingError("no price")
    try:
        s.call(plain)
    except PricingError as exc:
        assert str(exc) == "no price"
@case
def exception_instance_as_argument_and_result():
    out = s.call(lambda e: StaleQuote(e.sym + "!", e.age + 1), StaleQuote("A", 1))
    assert type(out) is StaleQuote and (out.sym, out.age) == ("A!", 2)
# %%
class Book:
    def __init__(self, side):
        self.side = side
        self.levels = []
    def add(self, px):
        self.levels.append(px)
        return len(self.levels)
    def best(self, extra=0):
        return (max if self.side == "bid" else min)(self.levels) + extra
@case
def bound_methods():
    b = Book("bid")
    b.add(1.0)
    b.add(3.0)
    assert s.call(b.best, 0.5) == 3.5
    assert s.call(lambda m: m(1), b.best) == 4.0
    out = s.call(lambda m: m.__self__, b.best)
    assert type(out) is Book and out.levels == [1.0, 3.0]
# %%
def scale(k, x):
    return k * x
@case
def functools_partial():
    assert s.call(functools.partial(scale, 3), 5) == 15
    assert s.call(lambda f: f(2), functools.partial(scale, 10)) == 20
    assert s.call(lambda: functools.partial(scale, 2))(4) == 8
# %%
def logged(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return ("logged", fn(*args, **kwargs))
    return wrapper
@logged
def add_one(x):
    return x + 1
@case
def functools_wraps_decorator():
    assert s.call(add_one, 1) == ("logged", 2)
    assert s.call(lambda: (add_one.__name__, add_one(5))) == ("add_one", ("logged", 6))
# %%
def squares(n):
    for i in range(n):
        yield i * i
@case
def generator_functions():
    assert s.call(lambda n: list(squares(n)), 4) == [0, 1, 4, 9]
    assert s.call(lambda g, n: sum(g(n)), squares, 5) == 30
    assert list(s.call(lambda: squares)(3)) == [0, 1, 4]
# %%
def make_multiplier(k):
    def mul(x):
        return x * k
    return mul
@case
def closures_returned_as_results():
    f = s.call(make_multiplier, 7)
    assert f(6) == 42
    g = s.call(lambda base: (lambda x: Point(x, base)), 9)
    assert g(1) == Point(1, 9) and type(g(1)) is Point
    assert s.call(lambda h: h(3), f) == 21
# %%
K = 4
@case
def lambdas_with_defaults():
    assert s.call(lambda x, k=K, p=Point(1, 1): p.scaled(x * k), 2) == Point(8, 8)
    assert s.call(lambda x, *, y=Color.RED: (x, y), 1) == (1, Color.RED)
# %%
def annotated(p: Point, c: Color = Color.RED) -> Trade:
    return annotated.__annotations__["p"] is type(p) and annotated.__annotations__["return"] is Trade
@case
def annotations_naming_main_classes():
    assert s.call(annotated, Point(1, 2)) is True
    assert s.call(lambda: annotated.__annotations__["c"]) is Color
# %%
def is_even(n):
    return True if n == 0 else is_odd(n - 1)
def is_odd(n):
    return False if n == 0 else is_even(n - 1)
@case
def mutual_recursion():
    assert s.call(is_even, 10) is True
    assert s.call(is_odd, 7) is True
    assert s.call(lambda n: [is_even(i) for i in range(n)], 4) == [True, False, True, False]
# %%
@case
def module_aliases_bound_in_main():
    out = s.call(lambda n: np.arange(n).sum() + len(js.dumps([1])), 5)
    assert out == 13
    assert s.call(lambda: np.__name__ + js.__name__) == "numpyjson"
# %%
class Registry(abc.ABC):
    @abc.abstractmethod
    def get(self):
        ...
class Impl(Registry):
    def get(self):
        return "impl"
@case
def abstract_base_classes():
    assert s.call(lambda r: (r.get(), isinstance(r, Registry)), Impl()) == ("impl", True)
    assert type(s.call(lambda: Impl())) is Impl
# %%
def remember(p):
    import builtins
    prev = getattr(builtins, "_matrix_kept", None)
    builtins._matrix_kept = p
    return None if prev is None else (isinstance(prev, Point), type(prev) is type(p), type(p) is Point)
def check_kept():
    import builtins
    return isinstance(builtins._matrix_kept, Point), type(builtins._matrix_kept) is Point
@case
def one_class_across_calls_in_the_worker():
    s.call(remember, Point(0, 0))
    assert s.call(remember, Point(1, 1)) == (True, True, True)
    assert s.call(check_kept) == (True, True)
# %%
@case
def submit_and_map_with_main_objects():
    fut = s.submit(lambda t: t.notional(), Trade("A", 2.0, 5))
    assert fut.result(timeout=60) == 10.0
    out = list(s.map(lambda p: p.scaled(2), [Point(i, i) for i in range(5)]))
    assert out == [Point(2 * i, 2 * i) for i in range(5)] and all(type(p) is Point for p in out)
    try:
        s.submit(lambda: (_ for _ in ()).throw(StaleQuote("F", 1))).result(timeout=60)
    except StaleQuote as exc:
        assert exc.sym == "F"
# %%
@case
def importable_classes_travel_by_reference():
    import fractions
    import decimal
    def remote(f, d):
        import sys
        return f * 2, d + 1, type(f) is sys.modules["fractions"].Fraction
    out = s.call(remote, fractions.Fraction(1, 3), decimal.Decimal("1.5"))
    assert out == (fractions.Fraction(2, 3), decimal.Decimal("2.5"), True)
    assert type(out[0]) is fractions.Fraction
    od = s.call(lambda: collections.OrderedDict(a=1))
    assert type(od) is collections.OrderedDict
# %%
def run_all():
    for fn in CASES:
        try:
            fn()
        except BaseException as exc:
            print(f"MATRIX|{fn.__name__}|FAIL|{type(exc).__name__}: {exc}"[:400].replace(chr(10), " "), flush=True)
        else:
            print(f"MATRIX|{fn.__name__}|ok", flush=True)
    print(f"MATRIX|END|{len(CASES)}", flush=True)
# %%
run_all()
