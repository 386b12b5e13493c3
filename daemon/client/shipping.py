"""Turning a client's function into bytes a worker can load.

Functions are shipped by value with dill: lambdas, closures, REPL and notebook
code and nested helpers all work, and nothing has to be importable in the
worker. A function from an importable module (a test module, a project file
next to a script) is shipped by value too, together with the same-module
helpers it references, because that module is usually not on the worker's
path; library functions (numpy, pandas, ...) stay references.

A global named ``q`` that is a pykx connection (or pykx's embedded ``q``)
is left behind: it cannot be pickled (it holds a socket), and in a pool with
a ``q:`` section the worker's own ``q`` global takes its place, so code
developed against a local ``q = pykx.SyncQConnection(...)`` ships unchanged.

The content key is a hash of the dill bytes plus the session's libraries: the
daemon and workers cache code by it, so each function crosses the wire once.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from collections.abc import Callable
from typing import Any

PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


#: (the globals dict, a name, the object it was bound to when shipped)
Capture = tuple[dict[str, Any], str, Any]


def _by_value(fn: types.FunctionType, module: str, memo: dict[int, types.FunctionType], captured: list[Capture] | None = None) -> types.FunctionType:
    """A copy of ``fn`` that dill pickles by value, with minimal globals.

    Same-module functions it references (as globals or through its closure)
    are copied too, so helpers travel along; ``memo`` makes recursive and
    mutually recursive functions terminate.
    """
    if id(fn) in memo:
        return memo[id(fn)]
    g: dict[str, Any] = {"__builtins__": __builtins__, "__name__": "__main__"}
    cells = tuple(types.CellType() for _ in fn.__closure__) if fn.__closure__ else None
    copy = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, cells)
    memo[id(fn)] = copy
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    copy.__module__ = "__main__"
    copy.__dict__.update(fn.__dict__)

    def carry(value: Any) -> Any:
        if isinstance(value, types.FunctionType) and value.__module__ == module:
            return _by_value(value, module, memo, captured)
        return value

    if cells is not None and fn.__closure__ is not None:
        for new, old in zip(cells, fn.__closure__, strict=True):  # cells has one per closure cell
            try:
                new.cell_contents = carry(old.cell_contents)
            except ValueError:  # an empty cell (a name assigned later): leave it empty
                pass
    for name in _names(fn.__code__):
        if name in fn.__globals__:
            value = fn.__globals__[name]
            if name == "q" and _is_pykx_q(value):
                continue  # the worker's q global stands in for it
            if captured is not None:
                captured.append((fn.__globals__, name, value))
            g[name] = carry(value)
    return copy


def _is_pykx_q(value: Any) -> bool:
    kx = sys.modules.get("pykx")  # never import it here: a client without pykx has no such objects
    q_type = getattr(kx, "Q", None) if kx is not None else None
    return isinstance(q_type, type) and isinstance(value, q_type)


def dump_function(fn: Callable[..., Any], captured: list[Capture] | None = None) -> bytes:
    """dill bytes of ``fn``; ``captured`` receives the globals it took, for ``still_current``."""
    import dill

    if isinstance(fn, types.FunctionType):
        # The copy's globals are already minimal, so dill need not trace them
        # (recurse=True loops forever on self-referencing closures).
        data: bytes = dill.dumps(_by_value(fn, fn.__module__, {}, captured), protocol=5, recurse=False)
    else:
        data = dill.dumps(fn, protocol=5, recurse=True)
    return data


_MISSING = object()


def still_current(captured: list[Capture]) -> bool:
    """True while every global a shipped function captured is still bound to the same object.

    A notebook user who rebinds ``threshold = 2`` after shipping a function
    that reads ``threshold`` gets the function shipped again, with the new
    value. (Mutating an object in place is not seen: identity, not equality,
    keeps this check cheap enough for every call.)
    """
    for namespace, name, value in captured:
        if namespace.get(name, _MISSING) is not value:
            return False
    return True


def function_key(blob: bytes, libraries: dict[str, str]) -> bytes:
    h = hashlib.blake2b(blob, digest_size=16)
    h.update(json.dumps(sorted(libraries.items())).encode())
    return h.digest()
