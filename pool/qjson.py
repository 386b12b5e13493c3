"""pykx objects -> JSON-ready Python values: the rule the HTTP door applies to q results.

An endpoint or function may return what ``q(...)`` gave it; the HTTP door
cannot send a pykx object, so it converts it with :func:`to_jsonable` first.
The rule (documented for users in docs/kdb.md):

=======================  ===================================================
q value                  JSON
=======================  ===================================================
table                    list of records ``[{"col": value, ...}, ...]``
keyed table              the same, key columns first
dictionary               object (keys as strings) when every key is an atom;
                         otherwise a list of ``[key, value]`` pairs
general list             list (each item converted by this table)
vector                   list of the atom rule, element by element
boolean, byte, short,    number (booleans as true/false)
int, long, real, float
char vector / char       string (UTF-8; invalid bytes replaced)
symbol                   string
guid                     string ``"8c6b8b64-6815-6084-0a3e-178401251b68"``
timestamp                ISO 8601 ``"2024-01-02T09:30:00.25"`` (ns kept, no
                         trailing zeros; no time zone: q has none)
datetime (deprecated)    ISO 8601 timestamp, millisecond precision
date / month             ``"2024-01-02"`` / ``"2024-01"``
time / second / minute   ``"09:30:00.250"`` / ``"09:30:00"`` / ``"09:30"``; a
                         value outside 00:00..24:00 is an ISO 8601 duration
timespan                 ISO 8601 duration ``"PT9H30M0.25S"``, ``"-P1DT2H"``
generic null ``::``      null
any null (0N, 0n, 0Np,   null
0Nd, `` ` ``, 0Ng, ...)
float infinities         null (JSON has no infinity); integer infinities
                         stay numbers (q's 0W is the largest integer)
function, foreign, ...   TypeError naming the q type
=======================  ===================================================

Works in unlicensed pykx: it reads values only through ``.np()``, ``.py()``,
iteration and ``keys()``/``values()``, never by running q. pykx is not
imported here until a pykx object is actually seen.
"""

from __future__ import annotations

import math
import sys
import uuid
from typing import Any

import numpy as np

_NANOS_PER_DAY = 86_400_000_000_000
#: q integer nulls, by numpy dtype (the most negative value)
_INT_NULL = {np.dtype(np.int16): -(2**15), np.dtype(np.int32): -(2**31), np.dtype(np.int64): -(2**63)}


def is_k(obj: Any) -> bool:
    """True for a pykx object (without importing pykx if nothing has)."""
    kx = sys.modules.get("pykx")
    return kx is not None and isinstance(obj, kx.K)


def to_jsonable(k: Any) -> Any:
    """Convert a pykx object to plain JSON-serialisable Python values (see the module table)."""
    import pykx as kx

    if isinstance(k, kx.KeyedTable):
        return _keyed_records(k)
    if isinstance(k, kx.Table):
        return _records(k)
    if isinstance(k, kx.Dictionary):
        return _dictionary(k)
    if isinstance(k, kx.Identity):  # :: (generic null); projections' placeholders too
        return None
    if isinstance(k, kx.List):  # general list: any mix of items
        return [to_jsonable(x) for x in k]
    if isinstance(k, (kx.CharVector, kx.CharAtom)):
        raw = k.py()
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    if isinstance(k, kx.Vector):
        return _vector(k)
    if isinstance(k, kx.Atom):
        return _atom(k)
    raise TypeError(f"cannot convert a q {type(k).__name__} to JSON (tables, dictionaries, lists, vectors and atoms only)")


def _records(table: Any) -> list[dict[str, Any]]:
    names = [str(n) for n in table.keys().py()]
    columns = [to_jsonable(col) for col in table.values()]
    # a q table: one name per column, every column as long as the table
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)] if columns else []


def _keyed_records(kt: Any) -> list[dict[str, Any]]:
    keys = _records(kt.keys())
    values = _records(kt.values())
    return [{**k, **v} for k, v in zip(keys, values, strict=True)]  # one key row per value row


def _dictionary(d: Any) -> Any:
    import pykx as kx

    keys_k = d.keys()
    keys = to_jsonable(keys_k)
    values = to_jsonable(d.values())
    if isinstance(values, dict):  # a dictionary of a table's rows is a table; cannot pair by key
        values = list(values.values())
    if not isinstance(keys, list) or not isinstance(values, list):
        raise TypeError(f"cannot convert a q dictionary with {type(keys_k).__name__} keys to JSON")
    if isinstance(keys_k, kx.Vector) or all(not isinstance(x, (list, dict)) for x in keys):
        return {("" if key is None else str(key)): value for key, value in zip(keys, values, strict=True)}
    return [[key, value] for key, value in zip(keys, values, strict=True)]  # a q dictionary: as many keys as values


def _vector(v: Any) -> list[Any]:
    import pykx as kx

    if isinstance(v, kx.SymbolVector):
        return [s if s else None for s in (str(x) for x in v.np())]
    if isinstance(v, kx.GUIDVector):
        return [_guid(x) for x in v.np()]
    if isinstance(v, kx.TimespanVector):
        return [_duration_ns(x) for x in _nat_masked(v.np(), "ns")]
    if isinstance(v, (kx.TimeVector, kx.SecondVector, kx.MinuteVector)):
        arr = v.np()
        unit = np.datetime_data(arr.dtype)[0]
        return [_time_of_day(x, unit) for x in _nat_masked(arr, unit)]
    arr = v.np()
    return _array(arr)


def _array(arr: Any) -> list[Any]:
    if isinstance(arr, np.ma.MaskedArray):  # pykx masks integer nulls
        data = arr.filled(0).tolist()
        return [None if m else x for x, m in zip(data, np.ma.getmaskarray(arr).tolist(), strict=True)]
    kind = arr.dtype.kind
    if kind == "M":
        return [_timestamp(x) for x in arr]
    if kind == "f":
        return [x if math.isfinite(x) else None for x in arr.tolist()]
    if kind == "i" and arr.dtype in _INT_NULL:
        null = _INT_NULL[arr.dtype]
        return [None if x == null else x for x in arr.tolist()]
    if kind == "O":
        return [_python_scalar(x) for x in arr.tolist()]
    plain: list[Any] = arr.tolist()  # a vector: a flat list of Python scalars
    return plain


def _atom(a: Any) -> Any:
    import pykx as kx

    if isinstance(a, kx.SymbolAtom):
        s = str(a.py())
        return s if s else None
    if isinstance(a, kx.GUIDAtom):
        return _guid(a.py())
    if isinstance(a, kx.TimespanAtom):
        x = a.np()
        return None if np.isnat(x) else _duration_ns(int(x.astype("timedelta64[ns]").astype(np.int64)))
    if isinstance(a, (kx.TimeAtom, kx.SecondAtom, kx.MinuteAtom)):
        x = a.np()
        unit = np.datetime_data(x.dtype)[0]
        return None if np.isnat(x) else _time_of_day(int(x.astype(np.int64)), unit)
    if isinstance(a, (kx.DateAtom, kx.MonthAtom, kx.TimestampAtom, kx.DatetimeAtom)):
        x = a.np()
        return _timestamp(x)
    x = a.np()
    if isinstance(x, np.generic):
        (value,) = _array(np.asarray([x]))
        return value
    return _python_scalar(a.py())


def _nat_masked(arr: Any, unit: str) -> list[int | None]:
    """Integers in ``unit`` for a timedelta64 array, None for NaT."""
    ints = arr.astype(f"timedelta64[{unit}]").astype(np.int64).tolist()
    return [None if nat else x for x, nat in zip(ints, np.isnat(arr).tolist(), strict=True)]


def _timestamp(x: Any) -> str | None:
    if np.isnat(x):
        return None
    unit = np.datetime_data(x.dtype)[0]
    if unit in ("D", "M", "Y"):
        return str(np.datetime_as_string(x))  # in its own unit: "2024-01-02", "2024-01", "2024"
    text = str(np.datetime_as_string(x.astype("datetime64[ns]"), unit="ns"))
    head, _, frac = text.partition(".")
    frac = frac.rstrip("0")
    return f"{head}.{frac}" if frac else head


def _time_of_day(value: int | None, unit: str) -> str | None:
    if value is None:
        return None
    per_ns = {"ms": 1_000_000, "s": 1_000_000_000, "m": 60_000_000_000}[unit]
    ns = value * per_ns
    if not 0 <= ns < _NANOS_PER_DAY:
        return _duration_ns(ns)
    secs, rem = divmod(ns // 1_000_000, 1000)
    h, m, s = secs // 3600, secs // 60 % 60, secs % 60
    if unit == "m":
        return f"{h:02d}:{m:02d}"
    if unit == "s":
        return f"{h:02d}:{m:02d}:{s:02d}"
    return f"{h:02d}:{m:02d}:{s:02d}.{rem:03d}"


def _duration_ns(ns: int | None) -> str | None:
    """ISO 8601 duration with days (a q day is exactly 24h), nanoseconds kept, zeros left out."""
    if ns is None:
        return None
    sign = "-" if ns < 0 else ""
    days, rest = divmod(abs(ns), _NANOS_PER_DAY)
    secs, frac = divmod(rest, 1_000_000_000)
    h, m, s = secs // 3600, secs // 60 % 60, secs % 60
    out = f"{sign}P{days}D" if days else f"{sign}P"
    if not rest and days:
        return out
    out += "T"
    if h:
        out += f"{h}H"
    if m:
        out += f"{m}M"
    if s or frac or not (h or m):
        out += f"{s}.{frac:09d}".rstrip("0").rstrip(".") + "S"
    return out


def _guid(x: Any) -> str | None:
    u = x if isinstance(x, uuid.UUID) else uuid.UUID(str(x))
    return None if u.int == 0 else str(u)


def _python_scalar(x: Any) -> Any:
    """Items of object arrays and .py() results: make them JSON-ready too."""
    if is_k(x):
        return to_jsonable(x)
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, uuid.UUID):
        return _guid(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _array(np.asarray([x]))[0]
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    try:
        import pandas as pd

        if x is pd.NA or x is pd.NaT:
            return None
    except ImportError:  # pragma: no cover - pykx depends on pandas
        pass
    if hasattr(x, "isoformat"):
        return x.isoformat()
    return str(x)
