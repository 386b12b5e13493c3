"""Turning a client's function into bytes a worker can load.

Functions are shipped by value with cloudpickle (pool/wire/byvalue.py, which
also explains how a class keeps its identity): lambdas, closures, REPL,
IPython and notebook code, nested helpers, and the classes, dataclasses,
enums, named tuples and exceptions the caller's ``__main__`` defines all
work, and nothing of theirs has to be importable in the worker. Arguments,
results and exceptions holding such objects go by value too (pool/wire/bundle.py
``pack``), both ways, so what comes back is the caller's own class.

Which modules go by value
    ``__main__``, always. A function from a module that is importable here but
    is not an installed library (a project file next to a script, a test
    module: ``_installed``) is shipped by value too, and so, from then on in
    this process, is everything that module defines (its helpers, its
    classes, in functions, arguments and results alike): that module is
    usually not on the worker's path. Installed libraries (site-packages, the
    standard library, cruised itself) travel by reference: the worker imports
    them. Another project module the worker cannot import either must be
    installed in the pool's env, or registered with
    ``cloudpickle.register_pickle_by_value(module)`` in the client.

A global named ``q`` that is a pykx connection (or pykx's embedded ``q``)
is left behind: it cannot be pickled (it holds a socket), and in a pool with
a ``q:`` section the worker's own ``q`` global takes its place, so code
developed against a local ``q = pykx.SyncQConnection(...)`` ships unchanged.

The content key is a hash of the pickled bytes plus the session's libraries:
the daemon and workers cache code by it, so each function crosses the wire
once. (A function that names a ``__main__`` class carries that class's
cloudpickle tracker id, random per client process, so its key is stable
within a process, not across processes.)
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import site
import sys
import sysconfig
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
    """A copy of ``fn`` that cloudpickle pickles by value (its module is ``__main__``), with minimal globals.

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
    copy.__annotations__ = fn.__annotations__
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


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def _installed(module: str | None) -> bool:
    """Whether ``module`` is a library the worker imports by itself (see the module docstring)."""
    if module is None or module == "__main__":
        return module is None
    top = module.partition(".")[0]
    if top == "cruised" or top in sys.stdlib_module_names:
        return True
    path = getattr(sys.modules.get(module), "__file__", None)
    if not path:
        return True  # a built-in or namespace module: nothing to ship by value
    return os.path.realpath(str(path)).startswith(_library_dirs())


def dump_function(fn: Callable[..., Any], captured: list[Capture] | None = None) -> bytes:
    """The pickled bytes of ``fn``; ``captured`` receives the globals it took, for ``still_current``."""
    from cruised.pool.wire import bundle, byvalue

    if isinstance(fn, types.FunctionType) and not _installed(fn.__module__):
        if fn.__module__ != "__main__":
            bundle.by_value(fn.__module__)  # its classes and helpers, in arguments and results too
        # the copy's globals are minimal: only what the code names, without a pykx q
        return byvalue.dumps(_by_value(fn, fn.__module__, {}, captured))
    return byvalue.dumps(fn)


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
