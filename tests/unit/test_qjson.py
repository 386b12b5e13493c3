"""pykx objects -> JSON (pool/qjson.py), built with unlicensed pykx from numpy and pandas."""

from __future__ import annotations

import datetime as dt
import json
import os
import uuid

import pytest

os.environ.setdefault("PYKX_UNLICENSED", "true")  # before pykx: no licence probe, no prompt

import numpy as np
import pandas as pd
import pykx as kx

from cruised.pool.qjson import is_k, to_jsonable


def j(k: object) -> object:
    """Convert, and prove the result is strict JSON (no NaN or Infinity sneaks through)."""
    out = to_jsonable(k)
    return json.loads(json.dumps(out, allow_nan=False))


def trade() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sym": ["AAPL", "MSFT", ""],
            "time": pd.to_datetime(["2024-01-02 09:30:00.250", "2024-01-02 09:30:01.000000001", "2024-01-02 09:30:02"], format="ISO8601"),
            "price": [101.5, np.nan, 99.0],
            "size": [100, 200, 300],
        }
    )


def test_table_becomes_records_in_column_order() -> None:
    assert j(kx.toq(trade())) == [
        {"sym": "AAPL", "time": "2024-01-02T09:30:00.25", "price": 101.5, "size": 100},
        {"sym": "MSFT", "time": "2024-01-02T09:30:01.000000001", "price": None, "size": 200},
        {"sym": None, "time": "2024-01-02T09:30:02", "price": 99.0, "size": 300},
    ]


def test_keyed_table_puts_key_columns_first() -> None:
    kt = kx.toq(pd.DataFrame({"v": [1.5, 2.5], "sym": ["a", "b"], "d": [1, 2]}).set_index(["sym", "d"]))
    assert isinstance(kt, kx.KeyedTable)
    assert j(kt) == [{"sym": "a", "d": 1, "v": 1.5}, {"sym": "b", "d": 2, "v": 2.5}]


def test_empty_table() -> None:
    assert j(kx.toq(trade().iloc[:0])) == []


def test_dictionaries() -> None:
    assert j(kx.toq({"a": 1, "b": [1, 2], "c": "sym"})) == {"a": 1, "b": [1, 2], "c": "sym"}
    assert j(kx.toq({1: "x", 2: "y"})) == {"1": "x", "2": "y"}  # JSON keys are strings


def test_vectors_and_their_nulls() -> None:
    assert j(kx.toq(np.array([1, -(2**63), 3]), kx.LongVector)) == [1, None, 3]
    assert j(kx.toq(np.array([-(2**31), 7], dtype=np.int32))) == [None, 7]
    assert j(kx.toq(np.array([-(2**15), 7], dtype=np.int16))) == [None, 7]
    assert j(kx.toq(np.array([1.5, np.nan, np.inf, -np.inf]))) == [1.5, None, None, None]
    assert j(kx.toq(np.array([0.5, np.nan], dtype=np.float32))) == [0.5, None]
    assert j(kx.toq(np.array([True, False]))) == [True, False]
    assert j(kx.toq(np.array([0, 255], dtype=np.uint8))) == [0, 255]
    assert j(kx.toq(np.array(["a", ""], dtype=object))) == ["a", None]
    assert j(kx.toq(np.array([uuid.UUID(int=0), uuid.UUID(int=7)], dtype=object))) == [None, "00000000-0000-0000-0000-000000000007"]
    assert j(kx.LongVector(np.array([2**63 - 1]))) == [2**63 - 1]  # 0W stays a number


def test_atoms() -> None:
    assert j(kx.toq(5)) == 5
    assert j(kx.toq(-(2**63), kx.LongAtom)) is None
    assert j(kx.toq(2.5)) == 2.5
    assert j(kx.toq(float("nan"))) is None
    assert j(kx.toq(True)) is True
    assert j(kx.toq("AAPL")) == "AAPL"
    assert j(kx.toq("")) is None  # the null symbol
    assert j(kx.toq(None)) is None  # ::
    assert j(kx.toq(uuid.UUID(int=5))) == "00000000-0000-0000-0000-000000000005"


def test_text() -> None:
    assert j(kx.toq(b"hello")) == "hello"  # char vector
    assert j(kx.toq(b"x")) == "x"  # char atom
    assert j(kx.CharVector("h\u00e9")) == "h\u00e9"
    assert j(kx.toq([1, "sym", 2.5, b"chars"])) == [1, "sym", 2.5, "chars"]  # general list


def test_temporal_types_are_iso_strings() -> None:
    assert j(kx.toq(pd.Timestamp("2024-01-02 09:30:00.123456789"))) == "2024-01-02T09:30:00.123456789"
    assert j(kx.toq(dt.date(2024, 1, 2))) == "2024-01-02"
    assert j(kx.toq(np.array(["2024-01-02", "2024-02-29"], dtype="datetime64[D]"))) == ["2024-01-02", "2024-02-29"]
    assert j(kx.toq(np.datetime64("2024-01", "M"), kx.MonthAtom)) == "2024-01"
    assert j(kx.toq(np.array(["2024-01"], dtype="datetime64[M]"), kx.MonthVector)) == ["2024-01"]
    assert j(kx.toq(np.timedelta64(34200250, "ms"), kx.TimeAtom)) == "09:30:00.250"
    assert j(kx.toq(np.array([34200250, -(2**31)], dtype="timedelta64[ms]"), kx.TimeVector)) == ["09:30:00.250", None]
    assert j(kx.toq(np.array([34200], dtype="timedelta64[s]"), kx.SecondVector)) == ["09:30:00"]
    assert j(kx.toq(np.array([570], dtype="timedelta64[m]"), kx.MinuteVector)) == ["09:30"]
    assert j(kx.toq(np.timedelta64(-5, "m"), kx.MinuteAtom)) == "-PT5M"  # outside a day: a duration
    assert j(kx.toq(dt.timedelta(days=2, hours=1))) == "P2DT1H"  # timespan
    assert j(kx.toq(np.array([34200250000001, "NaT"], dtype="timedelta64[ns]"))) == ["PT9H30M0.250000001S", None]
    nat = kx.toq(pd.DataFrame({"ts": pd.Series([pd.Timestamp("2024-01-02"), pd.NaT])}), handle_nulls=True)
    assert j(nat) == [{"ts": "2024-01-02T00:00:00"}, {"ts": None}]


def test_is_k() -> None:
    assert is_k(kx.toq(1)) and not is_k(1) and not is_k("x")


def test_results_over_ipc_convert_too() -> None:
    """What a worker actually holds: objects deserialized from q's reply bytes."""
    src = kx.toq(trade())
    back = kx.deserialize(kx.serialize(src, mode=6, wait=2).copy())
    assert j(back) == j(src)


def test_unconvertible_types_name_the_q_type() -> None:
    class NotK:
        pass

    with pytest.raises(TypeError, match="cannot convert a q NotK"):
        to_jsonable(NotK())
