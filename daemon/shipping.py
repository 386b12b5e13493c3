"""Turning a client's function into bytes a worker can load.

Functions are shipped by value with dill: lambdas, closures, REPL and notebook
code and nested helpers all work, and nothing has to be importable in the
worker. A function from an importable module (a test module, a project file
next to a script) is shipped by value too, together with the same-module
helpers it references, because that module is usually not on the worker's
path; library functions (numpy, pandas, ...) stay references.

The content key is a hash of the dill bytes plus the session's libraries: the
daemon and workers cache code by it, so each function crosses the wire once.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from typing import Any, Callable

PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"


def _names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def _by_value(fn: types.FunctionType, module: str, memo: dict[int, Any]) -> types.FunctionType:
    """A copy of ``fn`` that dill pickles by value, with its same-module helpers copied too."""
    if id(fn) in memo:
        return memo[id(fn)]
    g: dict[str, Any] = {"__builtins__": __builtins__, "__name__": "__main__"}
    copy = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    memo[id(fn)] = copy
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__doc__ = fn.__doc__
    copy.__module__ = "__main__"
    copy.__dict__.update(fn.__dict__)
    for name in _names(fn.__code__):
        if name not in fn.__globals__:
            continue
        value = fn.__globals__[name]
        if isinstance(value, types.FunctionType) and value.__module__ == module:
            value = _by_value(value, module, memo)
        g[name] = value
    return copy


def dump_function(fn: Callable[..., Any]) -> bytes:
    import dill

    target: Any = fn
    if isinstance(fn, types.FunctionType) and fn.__module__ not in ("__main__", None):
        target = _by_value(fn, fn.__module__, {})
    return dill.dumps(target, protocol=5, recurse=True)


def function_key(blob: bytes, libraries: dict[str, str]) -> bytes:
    h = hashlib.blake2b(blob, digest_size=16)
    h.update(json.dumps(sorted(libraries.items())).encode())
    return h.digest()
