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

Three changes to cloudpickle's way, all in ``Pickler.reducer_override``:

- A class whose tracker id the loading process already knows is left as it is.
  cloudpickle re-applies the pickled class dict to it, replacing the caller's own
  methods with copies whose globals are a snapshot of the worker's, and class
  attributes with the worker's values; and a worker would redo that for every
  call whose arguments hold an instance. ``_class_setstate`` fills a class in
  only once: the first time this process builds it.
- ``__slots__`` classes keep their slots. cloudpickle creates the class without
  them and sets ``__slots__`` afterwards, so instances built in the worker have a
  ``__dict__``, and their state does not load into the caller's slotted class.
- A class is pickled once per process and its bytes reused (``_blob``): a loader that
  already has the class skips them. A call whose arguments hold a ``__main__`` dataclass
  costs microseconds, not a millisecond.

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


#: class -> (tracker id, its own pickle stream): a class is pickled once per process (see _blob)
_blobs: weakref.WeakKeyDictionary[type, tuple[str, bytes]] = weakref.WeakKeyDictionary()
#: classes whose stream is being made (a cycle between two classes' methods goes inline instead)
_in_progress: set[type] = set()


def _class_from(tracker_id: str, blob: bytes) -> type:
    """A class pickled by ``_blob``: the one this process has under that tracker id, else loaded."""
    known = _cp._DYNAMIC_CLASS_TRACKER_BY_ID.get(tracker_id)
    if known is not None and known in _complete:
        return known  # type: ignore[no-any-return]  # cloudpickle's tracker holds classes
    return pickle.loads(blob)  # type: ignore[no-any-return]  # a stream of one class, by _blob


def _blob(cls: type) -> tuple[Any, ...]:
    """The reduction of a class pickled by value: ``_class_from(tracker id, its stream)``.

    cloudpickle writes a class's whole definition (every method's code, its globals) each
    time it is pickled, and a loader rebuilds all of it before its tracker id finds the class
    it already has: ~0.3 ms to pack and ~0.5 ms to load a small dataclass, for every call with
    one in its arguments. Here the definition is pickled once per process, its bytes reused;
    a loader that knows the tracker id skips them (a dict lookup), one that does not (a new
    worker) loads them once. A class is pickled as it was the first time: a class attribute
    changed later does not travel (a class defined again, a notebook cell run again, is a new
    class with a new tracker id, and does).
    """
    cached = _blobs.get(cls)
    if cached is None:
        _in_progress.add(cls)
        try:
            out = io.BytesIO()
            Pickler(out, protocol=5, inline=cls).dump(cls)
        finally:
            _in_progress.discard(cls)
        cached = _blobs[cls] = (_cp._get_or_create_tracker_id(cls), out.getvalue())  # the id the stream carries
    return (_class_from, cached)


class Pickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle ships no type information
    def __init__(self, *args: Any, inline: type | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the class this pickler writes in full (its stream for _blob); every other goes through _blob
        self.inline = inline

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, type) or obj is self.inline:
            pass
        elif (cached := _blobs.get(obj)) is not None:
            return (_class_from, cached)  # before cloudpickle builds the class's whole state again
        rv = super().reducer_override(obj)
        if type(rv) is tuple and len(rv) == 6 and rv[0] in _SKELETONS and rv[5] is _cp._class_setstate:
            _complete.add(obj)  # pickled from here: this process's class is the original
            if obj is not self.inline and obj not in _in_progress:
                return _blob(obj)
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
