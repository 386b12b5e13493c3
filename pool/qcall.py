"""Calls that came in over kdb+ IPC, run in the worker: q bytes in, q bytes out.

The kdb+ IPC door (daemon/doors/qipc/door.py) never converts q data. It routes each
message by its head (an endpoint name, or one of the messages pykx.remote
sends) and forwards the argument bytes in a QCALL frame. Here they are
deserialized with pykx, converted to Python, the function runs, and its
result is converted back and serialized as the *complete* kdb+ IPC message
the q client receives: a response, an error, or a deferred-sync callback.
The supervisor writes those bytes to the client unchanged.

QCALL payload (pool/wire/frames.py)::

    u16 head length | head JSON (may end in padding spaces) | one kdb+ IPC message

    head = {"target": "endpoint" | "function",
            "name":   "svc/ep" | the function's name,
            "key":    hex function key (target "function" only),
            "cap":    the client's capability (0..6): the replies' serialization mode,
            "mode":   "sync" | "async" | "callback"}

The IPC message holds one q object whose items are the call's arguments; in
``callback`` mode its last two items are the callback's name and the caller's
request id (``neg[h](`ep; args...; `callback; reqid)``).

Reply payload, whatever the status::

    u32 info length | info JSON | the q message for the client (empty when none is owed)

    info = {} on success, else {"error": the q error text, "type": exception class,
                                "traceback": text (user code failures)}

Statuses: OK; ERROR (the function raised, or its result cannot be sent to
q); BAD_ARGUMENTS (wrong number of arguments, or keywords that do not fit);
ENDPOINT_UNAVAILABLE (the endpoint's code failed to load, or this pool does
not serve it); UNKNOWN_FUNCTION (a pykx.remote function this worker lacks:
JSON ``{"message"}`` only, as for CALL, and the door defines it again).

Conversions for endpoints (the documented mapping for q developers)::

    q -> Python                              Python -> q
    char vector, symbol, char atom -> str    str, bytes -> char vector (never a symbol)
    symbol vector -> list[str]               DataFrame -> table (keyed if indexed;
    other vectors -> numpy arrays              str columns -> symbols)
                                             numpy array, Series -> vector (str -> symbols)
    table, keyed table -> DataFrame          dict -> dictionary (str keys -> symbols)
    dictionary -> dict                       list/tuple -> vector when all bool, all
    general list -> list (items converted)     int or all float; else a general list
    other atoms -> Python scalars            None -> ::; other scalars -> atoms
    :: -> None                               pykx objects -> unchanged

pykx.remote functions follow pykx.q instead (``.pykx.todefault`` for the
arguments: general lists -> ``.py()``, tables -> DataFrames, everything
else -> ``.np()``; ``kx.toq`` for the result, so ``str`` becomes a symbol),
because that is what their callers' code expects.

Error texts are one line, at most ``ERROR_TEXT_MAX`` characters, and end in
the request id (the supervisor's job id, ``#<n>``) so a q developer can
quote it and the operator can find the traceback in the log.

pykx is imported on first use (unlicensed unless the environment says
otherwise). Standard library only at import time: this module runs under
each pool's own interpreter, and the supervisor imports it for the shared
helpers (``error_frame``, ``error_line``, ``wants_callback``).
"""

from __future__ import annotations

import builtins
import inspect
import json
import os
import struct
import sys
import traceback
from collections.abc import Callable
from typing import Any

from cruised.pool import interrupt, nesting
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Status

#: longest error text sent to q; q's own C API truncates error strings at 255
ERROR_TEXT_MAX = 200
HEAD_LEN = struct.Struct("<H")
INFO_LEN = struct.Struct("<I")
#: IPC header: endianness, message type, compressed flag, high length byte, u32 length
IPC_HEADER = struct.Struct("<BBBBI")
MSG_ASYNC, MSG_SYNC, MSG_RESPONSE = 0, 1, 2

_kx: Any = None


def pykx() -> Any:
    """pykx, imported once; unlicensed unless the operator configured a licence."""
    global _kx
    if _kx is None:
        os.environ.setdefault("PYKX_UNLICENSED", "true")
        os.environ.setdefault("PYKX_SUPPRESS_WARNINGS", "true")
        import pykx as kx

        _kx = kx
    return _kx


# -- shared with the door (no pykx needed) -------------------------------------------


def one_line(text: str) -> str:
    """Collapse whitespace and NULs: a q error is a NUL-terminated single line."""
    return " ".join(text.replace("\0", " ").split())


def error_line(text: str, request_id: int | None = None) -> str:
    """``text`` shortened to one line, with `` #<id>`` appended when there is an id."""
    line = one_line(text)
    suffix = f" #{request_id}" if request_id is not None else ""
    room = ERROR_TEXT_MAX - len(suffix)
    if len(line) > room:
        line = line[: max(0, room - 3)] + "..."
    return line + suffix


def error_frame(text: str) -> bytes:
    """A kdb+ IPC error response: header, -128 (0x80), the NUL-terminated text."""
    body = b"\x80" + one_line(text).encode("utf-8", "replace") + b"\0"
    return IPC_HEADER.pack(1, MSG_RESPONSE, 0, 0, 8 + len(body)) + body


def callback_possible(nargs: int, arity: dict[str, Any] | None) -> bool:
    """Could an async ``(`ep; a1..an)`` be KX's deferred-sync form, judged by its count alone?

    When the endpoint's positional range is known (``arity``, from
    ``describe``), a message its function could take as it stands, but not
    without the last two items, is a plain call: the door need not look at
    the items at all (a tickerplant's ``neg[h](`upd; `trade; data)`` costs
    nothing extra).
    """
    if nargs < 2:
        return False
    if not arity:
        return True
    return not (_fits(nargs, arity) and not _fits(nargs - 2, arity))


def wants_callback(nargs: int, second_last_is_symbol: bool, arity: dict[str, Any] | None) -> bool:
    """Is an async ``(`ep; a1..an)`` the deferred-sync form ``(`ep; args...; `cb; reqid)``?

    The second last item must be a symbol and the count must allow it
    (``callback_possible``); when the function could take the message
    either way, the callback form wins, so errors (even "wrong number of
    arguments") reach the caller's callback.
    """
    return second_last_is_symbol and callback_possible(nargs, arity)


def _fits(n: int, arity: dict[str, Any]) -> bool:
    hi = arity.get("max")
    return arity["min"] <= n and (hi is None or n <= hi)


def positional_range(fn: Callable[..., Any]) -> dict[str, Any]:
    """How a function can be called from q: positional min/max (None = *args), names, **kwargs."""
    sig = inspect.signature(fn)
    lo = 0
    hi: int | None = 0
    names: list[str] = []
    required: list[str] = []
    var_kw = False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if hi is not None:
                hi += 1
            if p.default is p.empty:
                lo += 1
            if p.kind is p.POSITIONAL_OR_KEYWORD:
                names.append(p.name)
                if p.default is p.empty:
                    required.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            hi = None
        elif p.kind is p.KEYWORD_ONLY:
            names.append(p.name)
        elif p.kind is p.VAR_KEYWORD:
            var_kw = True
    required_kw = [p.name for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    return {
        "min": lo,
        "max": hi,
        "names": names,
        "required": required + required_kw,
        "var_keyword": var_kw,
        "required_keywords": required_kw,
        "signature": f"{getattr(fn, '__name__', 'function')}{sig}",
    }


def describe(endpoints: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each loaded endpoint's positional range, for the READY frame (the door's callback rule)."""
    out: dict[str, dict[str, Any]] = {}
    for name, ep in endpoints.items():
        fn = getattr(ep, "fn", None)
        if fn is None:
            continue
        try:
            out[name] = positional_range(fn)
        except (TypeError, ValueError):
            continue
    return out


# -- conversions ----------------------------------------------------------------------


class NotConvertible(TypeError):
    """A result (or argument) with no q (or Python) counterpart."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


def to_python(k: Any) -> Any:
    """A q object as the endpoint's argument (the mapping in the module docstring)."""
    kx = pykx()
    if isinstance(k, kx.CharVector):
        return bytes(k.py()).decode("utf-8", "replace")
    if isinstance(k, kx.CharAtom):
        return bytes(k.py()).decode("utf-8", "replace")
    if isinstance(k, kx.SymbolAtom):
        return str(k.py())
    if isinstance(k, kx.SymbolVector):
        return [str(s) for s in k.py()]
    if isinstance(k, (kx.Table, kx.KeyedTable)):
        return k.pd()
    if isinstance(k, kx.Dictionary):
        return {_key(key): to_python(value) for key, value in zip(k.keys(), k.values(), strict=True)}  # a q dictionary: as many keys as values
    if isinstance(k, kx.List):  # before Vector: pykx's List is a Vector
        return [to_python(item) for item in k]
    if isinstance(k, kx.Vector):
        return k.np()
    if isinstance(k, kx.Identity):
        return None
    if isinstance(k, kx.Atom):
        return k.py()
    raise NotConvertible(f"q type {type(k).__name__}")


def _key(k: Any) -> Any:
    value = to_python(k)
    return value if isinstance(value, (str, int, float, bool, bytes)) or value is None else repr(value)


def to_default(k: Any) -> Any:
    """pykx.q's ``.pykx.todefault``: the argument conversion pykx.remote callers get."""
    kx = pykx()
    if isinstance(k, kx.List):
        return k.py()
    if isinstance(k, (kx.Table, kx.KeyedTable)):
        return k.pd()
    return k.np()


def to_q(obj: Any) -> Any:
    """A Python result as q (the mapping in the module docstring); NotConvertible names the type."""
    kx = pykx()
    if isinstance(obj, kx.K):
        return obj
    if obj is None:
        return kx.toq(None)
    if isinstance(obj, (str, bytes, bytearray)):
        return kx.toq(bytes(obj) if not isinstance(obj, str) else obj, strings_as_char=True)
    if isinstance(obj, dict):
        if all(isinstance(key, str) for key in obj):
            return kx.toq({key: to_q(value) for key, value in obj.items()})
        return _toq(obj)
    if isinstance(obj, (list, tuple)):
        return _list_to_q(list(obj))
    # an object of a library nobody imported cannot be a result: look, do not import
    pd, np = sys.modules.get("pandas"), sys.modules.get("numpy")
    if pd is not None and isinstance(obj, pd.DataFrame):
        return _toq(obj, handle_nulls=True)
    if (pd is not None and isinstance(obj, pd.Series)) or (np is not None and isinstance(obj, np.ndarray)):
        # a numpy or pandas array of str becomes a symbol vector: the one way to ask for symbols
        return _toq(obj)
    return _toq(obj, strings_as_char=True)


def _list_to_q(items: list[Any]) -> Any:
    kx = pykx()
    if items:
        # licensed pykx collapses uniform lists into vectors, unlicensed does not: do it here
        # so a q caller gets 1 2 3 either way
        kinds = {type(x) for x in items}
        if kinds == {bool}:
            return kx.toq(_np().array(items, dtype=bool))
        if kinds == {int} and all(-(2**63) < x < 2**63 for x in items):
            return kx.toq(_np().array(items, dtype="int64"))
        if kinds <= {float, int} and float in kinds and bool not in kinds:
            return kx.toq(_np().array(items, dtype="float64"))
    return kx.toq([to_q(x) for x in items])


def _np() -> Any:
    import numpy

    return numpy


def _toq(obj: Any, **kw: Any) -> Any:
    try:
        return pykx().toq(obj, **kw)
    except Exception as exc:
        raise NotConvertible(_type_name(obj)) from exc


def _type_name(obj: Any) -> str:
    t = type(obj)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


# -- pykx.remote source functions -------------------------------------------------------


def load_source(
    meta: dict[str, Any], blob: bytes | memoryview, base: dict[str, Any], import_libraries: Callable[[dict[str, str]], dict[str, Any]]
) -> Callable[..., Any]:
    """Compile a pykx.remote function from the source its client sent; called once per key.

    pykx.q runs ``trim "\\n" sv 1_"\\n" vs code``: the first line (the
    ``@kx.remote.function(session)`` decorator) is dropped and the rest
    trimmed, which also makes an indented (nested) function valid. The code
    runs in a fresh namespace holding the pool's names and the session's
    libraries (``import module as alias``), not in a shared ``__main__``, so
    two clients' functions of the same name never collide.
    """
    source = bytes(blob).decode("utf-8", "replace")
    name = str(meta.get("name") or "")
    code = "\n".join(source.split("\n")[1:]).strip()
    g: dict[str, Any] = {k: v for k, v in base.items() if not k.startswith("__")}
    g.update(import_libraries(meta.get("libraries") or {}))
    g["__name__"] = "__main__"
    g["__builtins__"] = builtins
    exec(compile(code, f"<pykx.remote {name}>", "exec"), g)
    fn: object = g.get(name)
    if not callable(fn):
        raise NameError(f"the source sent for {name!r} does not define a function of that name")
    return fn


# -- the call ----------------------------------------------------------------------------


class Call:
    """One QCALL: its head, its request id, and how to answer."""

    def __init__(self, reqid: int, head: dict[str, Any]) -> None:
        self.reqid = reqid
        self.head = head
        self.cap = int(head.get("cap", 6))
        self.mode = str(head.get("mode", "sync"))
        self.callback: Any = None  # the callback's SymbolAtom, in callback mode
        self.caller_id: Any = None  # the caller's request id, a q object, in callback mode

    def answer(self, ok: bool, value: Any) -> Any:
        """The q message for the client: a pykx ``serialize`` object, bytes, or None."""
        kx = pykx()
        if self.mode == "callback":
            payload = kx.toq([kx.toq(not ok), value if ok else kx.toq(str(value), strings_as_char=True)])
            return kx.serialize(kx.toq([self.callback, self.caller_id, payload]), mode=self.cap, wait=MSG_ASYNC)
        if self.mode == "async":
            return None
        if ok:
            return kx.serialize(value, mode=self.cap, wait=MSG_RESPONSE)
        return error_frame(str(value))


def handle(worker: Any, reqid: int, buf: bytearray, limit: int) -> None:
    """Run one QCALL frame and reply on the worker's channel."""
    (n,) = HEAD_LEN.unpack_from(buf, frames.HEADER_SIZE)
    qoff = frames.HEADER_SIZE + HEAD_LEN.size + n
    head = json.loads(bytes(buf[frames.HEADER_SIZE + HEAD_LEN.size : qoff]))
    call = Call(reqid, head)
    kx = pykx()
    # Measured before pykx sees it: its deserializer (q's d9, in C) recurses once a level and
    # dies of a stack overflow near 100,000 levels, its .np() already at a few hundred
    # (pool/nesting.py). The message's own list holds the arguments: one level more.
    if nesting.q_depth_exceeds(buf, qoff, nesting.MAX_DEPTH + 1):
        if call.mode == "callback" and not _take_callback(kx, call, buf, qoff):
            call.mode = "async"  # no callback to answer through: refused like a plain async message
        text = error_line(f"cruised: arguments nested deeper than {nesting.MAX_DEPTH} levels (lists, dictionaries, tables)", reqid)
        _reply(worker, call, Status.BAD_ARGUMENTS, {"error": text}, limit)
        return
    try:
        items = list(kx.deserialize(memoryview(buf)[qoff:]))
    except Exception as exc:  # noqa: BLE001 - the door checked the framing; the contents are the client's
        _reply(worker, call, Status.BAD_ARGUMENTS, {"error": error_line(f"cruised: cannot read the arguments: {exc}", reqid)}, limit)
        return
    del buf
    if call.mode == "callback":
        call.callback, call.caller_id = items[-2], items[-1]
        items = items[:-2]
    if head.get("target") == "function":
        _run_function(worker, call, items, limit)
    else:
        _run_endpoint(worker, call, items, limit)


def _take_callback(kx: Any, call: Call, buf: bytearray, qoff: int) -> bool:
    """``call``'s callback name and caller's id, read from the message's last two items alone
    (the rest is too deep to deserialize); False if they cannot be read, or nest too deep too."""
    offsets = nesting.q_item_offsets(buf, qoff)
    if offsets is None or len(offsets) < 3:
        return False
    tail = bytes(buf[offsets[-3] : offsets[-1]])
    little = buf[qoff] == 1
    msg = bytes([buf[qoff], MSG_SYNC, 0, 0]) + (14 + len(tail)).to_bytes(4, "little" if little else "big")  # IPC header, list header, items
    msg += bytes([0, 0]) + (2).to_bytes(4, "little" if little else "big", signed=True) + tail
    if nesting.q_depth_exceeds(msg, 0, 2):  # a symbol and an atom, in a list: anything deeper is not a callback
        return False
    try:
        call.callback, call.caller_id = list(kx.deserialize(msg))
    except Exception:  # noqa: BLE001 - unreadable: the caller is answered as for a plain async message
        return False
    return True


def _run_endpoint(worker: Any, call: Call, items: list[Any], limit: int) -> None:
    name = str(call.head.get("name"))
    ep = getattr(worker, "endpoints", {}).get(name)
    if ep is None or getattr(ep, "fn", None) is None:
        why = "is not served by this pool" if ep is None else f"failed to load: {ep.error}"
        _reply(worker, call, Status.ENDPOINT_UNAVAILABLE, {"error": error_line(f"cruised: endpoint {name} {why}", call.reqid)}, limit)
        return
    arity = _ARITY.get(ep.fn)
    if arity is None:
        arity = _ARITY[ep.fn] = positional_range(ep.fn)
    try:
        args, kwargs = _bind(name, items, arity)
    except _RankError as exc:
        _reply(worker, call, Status.BAD_ARGUMENTS, {"error": str(exc)}, limit)
        return
    except NotConvertible as exc:
        _reply(worker, call, Status.BAD_ARGUMENTS, {"error": error_line(f"cruised: cannot convert {exc.what} to Python", call.reqid)}, limit)
        return
    except RecursionError:  # within MAX_DEPTH, yet deeper than this interpreter's stack allows now
        text = f"cruised: arguments nested too deep to convert to Python (the limit is {nesting.MAX_DEPTH} levels)"
        _reply(worker, call, Status.BAD_ARGUMENTS, {"error": error_line(text, call.reqid)}, limit)
        return
    _invoke(worker, call, ep.fn, args, kwargs, to_q, limit)


#: endpoint function -> its positional_range (a worker's endpoints never change)
_ARITY: dict[Callable[..., Any], dict[str, Any]] = {}


class _RankError(Exception):
    pass


def _bind(name: str, items: list[Any], arity: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """q items -> (args, kwargs): ``::`` alone is no arguments, a symbol-keyed dictionary keywords."""
    kx = pykx()
    if len(items) == 1 and isinstance(items[0], kx.Identity):
        items = []
    if len(items) == 1 and isinstance(items[0], kx.Dictionary) and isinstance(items[0].keys(), kx.SymbolVector):
        keys = [str(s) for s in items[0].keys().py()]
        if arity["var_keyword"] or (keys and set(keys) <= set(arity["names"])):
            kwargs = to_python(items[0])
            missing = [n for n in arity["required"] if n not in kwargs]
            if missing:
                raise _RankError(f"rank: {name} needs {', '.join(missing)}")
            return [], kwargs
    n = len(items)
    if not _fits(n, arity):
        lo, hi = arity["min"], arity["max"]
        takes = f"{lo}" if lo == hi else (f"at least {lo}" if hi is None else f"{lo} to {hi}")
        raise _RankError(f"rank: {name} takes {takes} args, got {n}")
    if arity["required_keywords"]:
        raise _RankError(f"rank: {name} needs keywords {', '.join(arity['required_keywords'])}: call it with a dictionary")
    return [to_python(x) for x in items], {}


def _run_function(worker: Any, call: Call, items: list[Any], limit: int) -> None:
    key = bytes.fromhex(str(call.head.get("key", "")))
    fn = worker.functions.get(key)
    if fn is None:
        _reply(worker, call, Status.UNKNOWN_FUNCTION, None, limit)
        return
    worker.functions.move_to_end(key)
    try:
        args = [to_default(x) for x in items]
    except Exception as exc:  # noqa: BLE001 - a q type pykx cannot convert
        _reply(worker, call, Status.BAD_ARGUMENTS, {"error": error_line(f"cruised: cannot convert an argument to Python: {exc}", call.reqid)}, limit)
        return
    _invoke(worker, call, fn, args, {}, _toq_default, limit)


def _toq_default(obj: Any) -> Any:
    kx = pykx()
    if isinstance(obj, kx.K):
        return obj
    return _toq(obj)


def _invoke(worker: Any, call: Call, fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any], convert: Callable[[Any], Any], limit: int) -> None:
    try:
        result = interrupt.STATE.run_user(fn, *args, **kwargs)  # a cancel (its q client left) interrupts it
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            if interrupt.STATE.hit:  # cancelled (on_disconnect: cancel): nobody reads the answer
                worker.channel.reply(call.reqid, Status.CANCELLED, [interrupt.INTERRUPTED])
                return
            raise
        text = error_line(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, call.reqid)
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        _reply(worker, call, Status.ERROR, {"error": text, "type": type(exc).__qualname__, "traceback": tb}, limit)
        return
    del args, kwargs
    try:
        value = convert(result)
        message = call.answer(True, value)
    except RecursionError:  # the conversion recurses once or more a level; the result is the function's
        text = f"cruised: cannot convert {_type_name(result)} to q: nested deeper than Python's recursion limit allows"
        _reply(worker, call, Status.ERROR, {"error": error_line(text, call.reqid), "type": "NotConvertible"}, limit)
        return
    except NotConvertible as exc:
        _reply(worker, call, Status.ERROR, {"error": error_line(f"cruised: cannot convert {exc.what} to q", call.reqid), "type": "NotConvertible"}, limit)
        return
    except Exception as exc:  # noqa: BLE001 - serialization refused it (e.g. a GUID at capability < 3)
        what = type(value).__name__ if "value" in locals() else _type_name(result)
        _reply(
            worker,
            call,
            Status.ERROR,
            {"error": error_line(f"cruised: cannot convert {what} to q ({one_line(str(exc))})", call.reqid), "type": "NotConvertible"},
            limit,
        )
        return
    _reply(worker, call, Status.OK, {}, limit, message)


def _reply(worker: Any, call: Call, status: int, info: dict[str, Any] | None, limit: int, message: Any = None) -> None:
    """Send the REPLY; ``message`` (a pykx serialize object) stays referenced until it is written."""
    if info is None:  # UNKNOWN_FUNCTION: JSON only, as for CALL
        worker.channel.reply(call.reqid, status, [b'{"message": "function not defined in this worker"}'])
        return
    if message is None and "error" in info:
        message = call.answer(False, info["error"])
    data = memoryview(b"")
    if message is not None:
        data = message.data if hasattr(message, "data") else memoryview(message)
    info_json = json.dumps(info).encode()
    if data.nbytes + len(info_json) + frames.HEADER_SIZE + INFO_LEN.size > limit:
        text = error_line(f"cruised: result too large ({data.nbytes} bytes; daemon.max_message_bytes is {limit})", call.reqid)
        info = {"error": text, "type": "ResultTooLarge"}
        message = call.answer(False, text)
        data = memoryview(b"") if message is None else (message.data if hasattr(message, "data") else memoryview(message))
        status = Status.ERROR
        info_json = json.dumps(info).encode()
    worker.channel.reply(call.reqid, status, [INFO_LEN.pack(len(info_json)), info_json, data])
    del message  # the serialized result is freed only after it was written
