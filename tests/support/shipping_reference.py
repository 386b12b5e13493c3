"""The reference the shipping matrix is held to: plain cloudpickle, to a subprocess and back.

What Ray, Dask and PySpark do: the caller pickles ``(fn, args, kwargs)`` with
cloudpickle, a separate Python process loads it, runs it and pickles the result
(or the exception) back with cloudpickle. ``ReferenceSession`` offers the part
of cruised's session API the matrix uses (``call``, ``submit``, ``map``), so
tests/support/shipping_matrix.py runs unchanged against it
(``SHIPPING_BACKEND=cloudpickle``). The worker is ``python -c`` (its
``__main__`` is empty, as a cruised worker's holds nothing of the caller's), and
it speaks length-prefixed frames on its stdin and stdout.
"""

from __future__ import annotations

import functools
import os
import signal
import struct
import subprocess
import sys
import types
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, BinaryIO

import cloudpickle

#: SHIPPING_REFERENCE_LIB=dill runs the same reference with dill (recurse=True) in place of cloudpickle
pickler: Any = cloudpickle
if os.environ.get("SHIPPING_REFERENCE_LIB") == "dill":
    import dill

    pickler = types.SimpleNamespace(loads=dill.loads, dumps=functools.partial(dill.dumps, recurse=True))

_LEN = struct.Struct("<Q")

_WORKER = "import sys; sys.path[:0] = {path!r}; from support.shipping_reference import serve; serve()"


def _send(out: BinaryIO, data: bytes) -> None:
    out.write(_LEN.pack(len(data)) + data)
    out.flush()


def _recv(inp: BinaryIO) -> bytes | None:
    head = inp.read(_LEN.size)
    if len(head) < _LEN.size:
        return None
    return inp.read(_LEN.unpack(head)[0])


def serve() -> None:
    """The worker: one (fn, args, kwargs) at a time; replies (ok, value-or-exception)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a kernel's shutdown interrupts its process group
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    while (blob := _recv(inp)) is not None:
        try:
            fn, args, kwargs = pickler.loads(blob)
            reply = pickler.dumps((True, fn(*args, **kwargs)))
        except BaseException as exc:  # noqa: BLE001 - the caller's exception, shipped back
            reply = pickler.dumps((False, exc))
        _send(out, reply)


def _in_process(blob: bytes) -> bytes:
    """``serve``'s step in this process: the round trip without a second process."""
    try:
        fn, args, kwargs = pickler.loads(blob)
        return bytes(pickler.dumps((True, fn(*args, **kwargs))))
    except BaseException as exc:  # noqa: BLE001 - the caller's exception, shipped back
        return bytes(pickler.dumps((False, exc)))


class ReferenceSession:
    def __init__(self) -> None:
        #: SHIPPING_REFERENCE_WHERE=in-process: loads in the very process that pickled, which
        #: has every class already (identity is then no test), for comparison only
        self.in_process = os.environ.get("SHIPPING_REFERENCE_WHERE") == "in-process"
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER.format(path=sys.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.in_process:
            ok, value = pickler.loads(_in_process(pickler.dumps((fn, args, kwargs))))
            if ok:
                return value
            raise value
        assert self.proc.stdin is not None and self.proc.stdout is not None
        _send(self.proc.stdin, pickler.dumps((fn, args, kwargs)))
        reply = _recv(self.proc.stdout)
        if reply is None:
            raise RuntimeError("the reference worker died")
        ok, value = pickler.loads(reply)
        if ok:
            return value
        raise value

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(self.call(fn, *args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - the future's exception
            fut.set_exception(exc)
        return fut

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> Iterator[Any]:
        for args in zip(*iterables, strict=False):
            yield self.call(fn, *args)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
