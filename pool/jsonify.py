"""An endpoint's result as JSON: the one conversion rule, applied in the worker.

The worker turns whatever the endpoint function returned into UTF-8 JSON
bytes, so the supervisor and the HTTP door only ever copy bytes. The rule:

=====================================  ==========================================
returned value                         JSON
=====================================  ==========================================
None, bool, int, str                   null, true/false, number, string
float (also numpy.float64)             number; NaN and +-inf become null
dict                                   object; keys that are str stay; int,
                                       float, bool, None keys (and numpy scalars
                                       of those) become their JSON text, as
                                       ``json.dumps`` does (1 -> "1", True ->
                                       "true"); other keys are an error
list, tuple                            array
set, frozenset                         array (sorted when the items compare)
numpy scalar                           its Python value (``.item()``), then
                                       this rule
numpy.datetime64 / .timedelta64        ISO 8601 string / seconds; NaT -> null
numpy array                            nested arrays, element by element
                                       under this rule (so NaN -> null)
pandas.DataFrame                       array of row objects ``{column: value}``
                                       (the index is dropped: ``reset_index()``
                                       first to keep it)
pandas.Series                          object ``{index label: value}``
pandas.Index                           array
datetime, date, time, pandas.Timestamp ISO 8601 string (``isoformat()``)
timedelta, pandas.Timedelta            seconds as a number
pandas.NA, pandas.NaT                  null
pykx Table / KeyedTable                as the DataFrame ``.pd()`` (keyed
                                       tables: key columns first)
any other pykx object                  ``.py()``, then this rule
anything else                          error: bytes, Decimal, complex,
                                       custom objects, cycles, nesting too
                                       deep to encode
=====================================  ==========================================

An error names where the offending value sits and what it is, e.g.
``result is not JSON-serializable: $.rows[3].blob is of type bytes``; the HTTP door
turns it into a 500 ``ResultNotSerializable``.

Nothing is imported here beyond the standard library: numpy, pandas and pykx
are recognised only when the result's module is already loaded.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sys
from typing import Any

from cruised.pool import nesting

#: the walk (taken when the C encoder's fast path cannot finish) refuses deeper nesting; it
#: recurses once a level, so it takes the requests' limit (pool/nesting.py): a result may
#: nest as deep as a request, and no deeper than the interpreter's recursion limit allows
MAX_DEPTH = nesting.MAX_DEPTH

_HINTS = {
    "bytes": "return CustomResponse.create_binary_response(...) for binary data, or encode it as base64 text",
    "bytearray": "return CustomResponse.create_binary_response(...) for binary data, or encode it as base64 text",
    "Decimal": "convert it with str() or float() first",
    "complex": "return its real and imaginary parts separately",
}


class NotSerializable(TypeError):
    """The result holds a value the rule above cannot express; ``path`` says where."""

    def __init__(self, path: str, what: str, hint: str = "") -> None:
        self.path = path
        self.what = what
        super().__init__(f"result is not JSON-serializable: {path} is {what}" + (f" ({hint})" if hint else ""))


def to_json(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON bytes under the module's rule; raises NotSerializable."""
    if type(obj) is int:  # a scalar answer (a score, a count): the encoder would build a scanner for it
        return b"%d" % obj
    try:
        # fast path: plain data and finite numbers go straight through the C encoder
        text = _FAST.encode(obj)
    except (TypeError, ValueError, RecursionError):
        # NaN somewhere, an odd key, a cycle or something unsupported: walk it with paths
        text = _PLAIN.encode(_walk(obj, None, 0, set()))
    return text.encode("utf-8")


def _fast_default(o: Any) -> Any:
    converted = _convert_other(o, None)
    if converted is o:
        raise TypeError("unconvertible")
    return converted


#: the encoders, built once (json.dumps with any option builds one per call); encode() keeps no state
#: between calls, so one instance serves every call
_FAST = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_fast_default)
_PLAIN = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


#: where a value sits, built only when an error needs it: (parent, key) links, None = root
_Path = tuple[Any, Any] | None


def _format(path: _Path) -> str:
    keys = []
    while path is not None:
        path, key = path
        keys.append(key)
    out = "$"
    for key in reversed(keys):
        if isinstance(key, int) and not isinstance(key, bool):
            out += f"[{key}]"
        elif isinstance(key, str) and key.isidentifier():
            out += f".{key}"
        else:
            out += f"[{json.dumps(key) if isinstance(key, str) else repr(key)}]"
    return out


def _walk(o: Any, path: _Path, depth: int, active: set[int]) -> Any:
    if o is None or isinstance(o, (bool, str)):
        return o
    if isinstance(o, int):
        return int(o)
    if isinstance(o, float):
        return float(o) if math.isfinite(o) else None
    if depth >= MAX_DEPTH:
        raise NotSerializable(_format(path), f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(o, (dict, list, tuple, set, frozenset)):
        if id(o) in active:
            raise NotSerializable(_format(path), "a reference to one of its own containers (a cycle)")
        active.add(id(o))
        try:
            if isinstance(o, dict):
                out: dict[str, Any] = {}
                for k, v in o.items():
                    out[_key(k, path)] = _walk(v, (path, k), depth + 1, active)
                return out
            items = list(o)
            if isinstance(o, (set, frozenset)):
                try:
                    items = sorted(items)
                except TypeError:
                    pass
            arr = []
            for i, v in enumerate(items):
                arr.append(_walk(v, (path, i), depth + 1, active))
            return arr
        finally:
            active.discard(id(o))
    converted = _convert_other(o, path)
    if converted is o:
        name = type(o).__name__
        module = type(o).__module__
        what = name if module in ("builtins", "decimal") else f"{module}.{name}"
        raise NotSerializable(_format(path), f"of type {what}", _HINTS.get(name, ""))
    return _walk(converted, path, depth + 1, active)


def _key(k: Any, path: _Path) -> str:
    if isinstance(k, str):
        return k
    np = sys.modules.get("numpy")
    if np is not None and isinstance(k, np.generic) and not isinstance(k, (np.datetime64, np.timedelta64)):
        k = k.item()
    if k is None or isinstance(k, (bool, int, float)):
        return json.dumps(k)  # as json.dumps writes such keys (NaN -> "NaN")
    raise NotSerializable(_format((path, k)), f"a dict key of type {type(k).__name__} (keys must be str, int, float, bool or None)")


def _convert_other(o: Any, path: _Path) -> Any:
    """One step toward plain data for a known non-plain type; ``o`` itself when unknown."""
    pd = sys.modules.get("pandas")
    if pd is not None:
        if o is pd.NaT or o is pd.NA:
            return None
        if isinstance(o, pd.DataFrame):
            return o.to_dict(orient="records")
        if isinstance(o, pd.Series):
            return o.to_dict()
        if isinstance(o, pd.Index):
            return o.tolist()
    if isinstance(o, (_dt.datetime, _dt.date, _dt.time)):
        return o.isoformat()
    if isinstance(o, _dt.timedelta):
        return o.total_seconds()
    np = sys.modules.get("numpy")
    if np is not None:
        if isinstance(o, np.ndarray):
            return _array(np, o, path)
        if isinstance(o, np.generic):
            return _numpy_scalar(np, o, path)
    kx = sys.modules.get("pykx")
    if kx is not None and isinstance(o, kx.K):
        # pykx: tables -> records, vectors -> lists, atoms -> scalars, temporal -> ISO (pool/qjson.py;
        # imported only now: it needs numpy, which this module must not require)
        from cruised.pool import qjson

        return qjson.to_jsonable(o)
    return o


def _numpy_scalar(np: Any, o: Any, path: _Path) -> Any:
    if isinstance(o, np.datetime64):
        return None if np.isnat(o) else str(np.datetime_as_string(o))
    if isinstance(o, np.timedelta64):
        return None if np.isnat(o) else float(o / np.timedelta64(1, "s"))
    if isinstance(o, np.complexfloating):
        raise NotSerializable(_format(path), "a numpy complex number", _HINTS["complex"])
    if isinstance(o, np.bytes_):
        raise NotSerializable(_format(path), "numpy bytes", _HINTS["bytes"])
    if isinstance(o, np.void):
        raise NotSerializable(_format(path), "a numpy structured (void) scalar")
    return o.item()


def _array(np: Any, a: Any, path: _Path) -> Any:
    kind = a.dtype.kind
    if kind == "M":
        strings = np.datetime_as_string(a)
        return np.where(np.isnat(a), None, strings).tolist()
    if kind == "m":
        seconds = a / np.timedelta64(1, "s")
        return np.where(np.isnat(a), None, seconds).tolist()
    if kind == "c":
        raise NotSerializable(_format(path), f"a numpy array of {a.dtype}", _HINTS["complex"])
    if kind in ("S", "V"):
        raise NotSerializable(_format(path), f"a numpy array of {a.dtype}")
    if kind == "f":
        finite = np.isfinite(a)
        if not finite.all():  # NaN -> null here, so the fast path needs no second walk
            return np.where(finite, a.astype(object), None).tolist()
    return a.tolist()
