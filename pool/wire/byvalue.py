"""Pickling by value what the receiving process cannot import: cloudpickle, with two fixes.

Whatever lives in the caller's ``__main__`` (a script, a REPL, IPython, a Jupyter
kernel) -- functions, classes, dataclasses, enums, named tuples, exceptions -- and
whatever comes from a module registered by value (``cloudpickle.register_pickle_by_value``,
which the client does for the module of a function it ships from a project file)
is pickled by value; everything importable travels by reference. Functions, call
arguments, results and exceptions all go through here (``bundle.pack`` falls back
to ``dumps`` when plain pickle cannot, or would refer to ``__main__``), in the
client and in the worker alike, so a class makes the round trip by value both ways.
Loading needs nothing but ``pickle.loads`` (with cloudpickle and this module
importable).

Identity. cloudpickle gives every class it pickles by value a tracker id (a uuid,
kept per process), and a process that loads a class whose id it already knows gets
its own class back. So a ``__main__`` class that went to a worker and came back in
a result or a raised exception *is* the caller's class (``except MyError``,
``isinstance``, dataclass ``==``), and in a worker one class shipped by one client
process is one class across calls and across functions.

The two fixes, both in ``Pickler.reducer_override``:

- A class whose tracker id the loading process already knows is left as it is.
  cloudpickle re-applies the pickled class dict to it, replacing the caller's own
  methods with copies whose globals are a snapshot of the worker's, and class
  attributes with the worker's values; and a worker would redo that for every
  call whose arguments hold an instance. ``_class_setstate`` fills a class in
  only once: the first time this process builds it.
- ``__slots__`` classes keep their slots. cloudpickle creates the class without
  them and sets ``__slots__`` afterwards, so instances built in the worker have a
  ``__dict__``, and their state does not load into the caller's slotted class.

Imported only where something is pickled by value (the wire package stays
standard-library only for the supervisor, which never unpickles payloads).
"""

from __future__ import annotations

import io
import pickle
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle
from cloudpickle import cloudpickle as _cp

#: classes whose dict is complete in this process: built here by _class_setstate, or pickled from
#: here (the caller's own). Weak: a class nobody uses any more may go.
_complete: weakref.WeakSet[type] = weakref.WeakSet()
_SKELETONS = (_cp._make_skeleton_class, _cp._make_skeleton_enum)


def _class_setstate(obj: type, state: Any) -> type:
    """cloudpickle's class state setter, applied once per class per process (see the docstring)."""
    if obj in _complete:
        return obj
    _cp._class_setstate(obj, state)
    _complete.add(obj)
    return obj


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle ships no type information
    def reducer_override(self, obj: Any) -> Any:
        rv = super().reducer_override(obj)
        if type(rv) is tuple and len(rv) == 6 and rv[0] in _SKELETONS and rv[5] is _cp._class_setstate:
            _complete.add(obj)  # pickled from here: this process's class is the original
            newargs = rv[1]
            slots = obj.__dict__.get("__slots__") if rv[0] is _cp._make_skeleton_class else None
            if slots:  # not empty: typing.NamedTuple's `__slots__ = ()` may not be set at creation
                # (type_constructor, name, bases, type_kwargs, tracker_id, extra): slots at creation
                newargs = (*newargs[:3], {**newargs[3], "__slots__": slots}, *newargs[4:])
            rv = (rv[0], newargs, rv[2], rv[3], rv[4], _class_setstate)
        return rv


def dumps(obj: Any, protocol: int = 5, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None) -> bytes:
    out = io.BytesIO()
    Pickler(out, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
    return out.getvalue()


def register_module(name: str) -> None:
    """Pickle the functions and classes of module ``name`` by value from now on (in this process)."""
    import sys

    module = sys.modules.get(name)
    if module is not None and name not in _cp._PICKLE_BY_VALUE_MODULES:
        cloudpickle.register_pickle_by_value(module)
