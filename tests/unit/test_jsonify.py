"""The JSON conversion rule for endpoint results (pool/jsonify.py), row by row."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cruised.pool.jsonify import NotSerializable, to_json


def j(obj: object) -> object:
    return json.loads(to_json(obj))


def test_plain_values_pass_through() -> None:
    assert to_json({"a": [1, 2.5, "x", None, True]}) == b'{"a":[1,2.5,"x",null,true]}'
    # a bare int takes a shortcut past the encoder; bools (an int subclass) must not
    for v in (0, -7, 10**40, True, False):
        assert to_json(v) == json.dumps(v).encode()
    assert j("héllo") == "héllo"


def test_non_finite_floats_become_null() -> None:
    assert j([1.0, float("nan"), float("inf"), -float("inf")]) == [1.0, None, None, None]


def test_dict_keys() -> None:
    assert j({1: "a", 2.5: "b", None: "d", np.int64(7): "e"}) == {"1": "a", "2.5": "b", "null": "d", "7": "e"}
    assert j({True: "c", np.float64(0.5): "f"}) == {"true": "c", "0.5": "f"}
    with pytest.raises(NotSerializable, match=r"\$\.a\[\(1, 2\)\] is a dict key of type tuple"):
        to_json({"a": {(1, 2): 3}})


def test_tuples_and_sets() -> None:
    assert j((1, 2)) == [1, 2]
    assert j({3, 1, 2}) == [1, 2, 3]
    assert sorted(j({1, "a"}), key=str) == [1, "a"]  # not comparable: any order


def test_numpy_scalars_and_arrays() -> None:
    assert j({"i": np.int32(3), "f": np.float32(0.5), "b": np.bool_(False), "s": np.str_("x")}) == {"i": 3, "f": 0.5, "b": False, "s": "x"}
    assert j(np.arange(6).reshape(2, 3)) == [[0, 1, 2], [3, 4, 5]]
    assert j(np.array([1.0, np.nan])) == [1.0, None]
    assert j(np.array(["2024-01-02", "NaT"], dtype="datetime64[D]")) == ["2024-01-02", None]
    assert j(np.array([1500, 0], dtype="timedelta64[ms]")) == [1.5, 0.0]
    assert j(np.datetime64("2024-01-02T03:04")) == "2024-01-02T03:04"
    assert j(np.array([{"a": np.int64(1)}], dtype=object)) == [{"a": 1}]


def test_pandas() -> None:
    df = pd.DataFrame({"sym": ["a", "b"], "px": [1.5, np.nan], "t": pd.to_datetime(["2024-01-02", None])}, index=[10, 20])
    assert j(df) == [{"sym": "a", "px": 1.5, "t": "2024-01-02T00:00:00"}, {"sym": "b", "px": None, "t": None}]
    assert j(pd.Series([1, 2], index=["x", "y"])) == {"x": 1, "y": 2}
    assert j(pd.Index([3, 4])) == [3, 4]
    assert j([pd.NA, pd.NaT, pd.Timedelta(seconds=2)]) == [None, None, 2.0]


def test_datetimes() -> None:
    assert j([dt.date(2024, 1, 2), dt.datetime(2024, 1, 2, 3, 4, 5), dt.time(1, 2), dt.timedelta(minutes=1)]) == [
        "2024-01-02",
        "2024-01-02T03:04:05",
        "01:02:00",
        60.0,
    ]


def test_pykx_objects() -> None:
    kx = pytest.importorskip("pykx")
    assert j({"v": kx.toq([1, 2, 3])}) == {"v": [1, 2, 3]}
    table = kx.toq(pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}))
    assert j(table) == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


@pytest.mark.parametrize(
    "value, message",
    [
        ({"rows": [{}, {"blob": b"x"}]}, r"\$\.rows\[1\]\.blob is of type bytes \(return CustomResponse"),
        (decimal.Decimal("1.5"), r"\$ is of type Decimal"),
        ({"z": 1j}, r"\$\.z is of type complex"),
        ({"z": np.array([1j])}, r"\$\.z is a numpy array of complex128"),
        ({"o": object()}, r"\$\.o is of type object"),
        ({"weird key": type("Thing", (), {})()}, r'\$\["weird key"\] is of type .*Thing'),
    ],
)
def test_unsupported_values_say_where_and_what(value: object, message: str) -> None:
    with pytest.raises(NotSerializable, match=message):
        to_json(value)


def test_cycles_and_depth_are_errors_not_crashes() -> None:
    a: list[object] = []
    a.append(a)
    with pytest.raises(NotSerializable, match="cycle"):
        to_json({"a": a})
    deep: list[object] = []
    cur = deep
    for _ in range(5000):  # beyond what the encoder can follow
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    with pytest.raises(NotSerializable, match="nested deeper"):
        to_json(deep)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@given(json_values)
def test_plain_data_round_trips_with_nan_as_null(value: object) -> None:
    def expected(v: object) -> object:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, list):
            return [expected(x) for x in v]
        if isinstance(v, dict):
            return {k: expected(x) for k, x in v.items()}
        return v

    assert json.loads(to_json(value)) == expected(value)
