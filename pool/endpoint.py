"""Named endpoints inside a worker: load their code once, then serve ENDPOINT frames.

Loading (once per worker, after the pool's preload, before READY)
    Each configured endpoint's code file is executed in a module of its own
    (registered in ``sys.modules`` so pickle and dataclasses work), whose
    globals start with the pool's library aliases and init-file names, plus:

    * ``folders``: the endpoint's folders, absolute paths, in config order
      (the Dataiku API node's managed-folder global);
    * ``DkuCustomApiException`` and ``DkuCustomHttpResponse`` (pool/api.py),
      so DSS endpoint code runs unchanged.

    The code file's directory is appended to ``sys.path`` so helper modules
    beside it import. A file that raises (or lacks the function, or whose
    function cannot be called by name) marks that endpoint failed with its
    traceback, printed to the worker's log and reported in READY; the others
    still load and the worker still serves them.

Calling
    The frame's body is the request's JSON bytes. An object's attributes fill
    the function's parameters by name: a missing required one or an
    unexpected one is BAD_ARGUMENTS, naming them, unless the function takes
    ``**kwargs`` (then unexpected ones land there). An empty body is ``{}``,
    so zero-argument functions need none. The result becomes JSON here
    (pool/jsonify.py), or a CustomResponse is passed through as status,
    headers and body.

Standard library only: this runs under each pool's own interpreter.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cruised.pool import api, interrupt, nesting, qconn
from cruised.pool.jsonify import NotSerializable, to_json
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Status


@dataclass
class Endpoint:
    name: str  # "service/endpoint"
    code: str
    function: str
    folders: list[str] = field(default_factory=list)
    fn: Callable[..., Any] | None = None
    error: str | None = None  # one line: why it is unavailable
    traceback: str | None = None
    params: frozenset[str] = frozenset()  # names a JSON attribute may fill
    required: tuple[str, ...] = ()
    required_set: frozenset[str] = frozenset()  # the same names, for a set test per call
    var_keyword: bool = False
    signature: str = ""
    load_s: float = 0.0


def load_all(specs: dict[str, dict[str, Any]], base: dict[str, Any]) -> dict[str, Endpoint]:
    """Load every endpoint; failures are recorded per endpoint, never raised."""
    loaded: dict[str, Endpoint] = {}
    for i, (name, spec) in enumerate(sorted(specs.items())):
        ep = Endpoint(name, str(spec["code"]), str(spec["function"]), [str(f) for f in spec.get("folders") or []])
        started = time.monotonic()
        try:
            _load(ep, i, base)
        except BaseException as exc:  # noqa: BLE001 - user code at import: anything can happen, none may stop the worker
            ep.fn = None
            ep.error = f"{type(exc).__name__}: {exc}"
            ep.traceback = _user_traceback(exc)
            # the worker's output is logged by the daemon with a worker= tag
            print(f"endpoint {name} failed to load from {ep.code}: {ep.error}", file=sys.stderr)
            for line in ep.traceback.rstrip().splitlines():
                print(f"endpoint {name}:   {line}", file=sys.stderr)
            sys.stderr.flush()
        ep.load_s = time.monotonic() - started
        loaded[name] = ep
    return loaded


def _load(ep: Endpoint, index: int, base: dict[str, Any]) -> None:
    path = os.path.abspath(ep.code)
    modname = f"cruised_endpoint_{index}_{re.sub(r'[^0-9A-Za-z_]', '_', ep.name)}"
    module = types.ModuleType(modname, f"cruised endpoint {ep.name}")
    g = module.__dict__
    for key, value in base.items():
        if not key.startswith("__"):
            g[key] = value
    g["__file__"] = path
    g["__builtins__"] = __builtins__
    g["folders"] = list(ep.folders)
    g["DkuCustomApiException"] = api.ApiError
    g["DkuCustomHttpResponse"] = api.CustomResponse
    sys.modules[modname] = module
    here = os.path.dirname(path)
    if here not in sys.path:
        sys.path.append(here)  # appended: helpers beside the code import, but never shadow installed modules
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    exec(compile(source, path, "exec"), g)
    fn = g.get(ep.function)
    if fn is None:
        defined = sorted(k for k, v in g.items() if callable(v) and not k.startswith("_") and getattr(v, "__module__", None) == modname)
        raise LookupError(f"{os.path.basename(path)} defines no function {ep.function!r} (functions defined there: {', '.join(defined) or 'none'})")
    if not callable(fn):
        raise TypeError(f"{ep.function!r} in {os.path.basename(path)} is a {type(fn).__name__}, not a function")
    _bind_plan(ep, fn)
    ep.fn = fn


def _bind_plan(ep: Endpoint, fn: Callable[..., Any]) -> None:
    """Which JSON attributes may fill which parameters, decided once at load."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the parameters of {ep.function!r}: {exc}") from None
    names: set[str] = set()
    required: list[str] = []
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            ep.var_keyword = True
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        elif p.kind is inspect.Parameter.POSITIONAL_ONLY:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"parameter {p.name!r} of {ep.function!r} is positional-only; JSON attributes fill parameters by name")
        else:
            names.add(p.name)
            if p.default is inspect.Parameter.empty:
                required.append(p.name)
    ep.params = frozenset(names)
    ep.required = tuple(required)
    ep.required_set = frozenset(required)
    ep.signature = f"{ep.function}{sig}"


def report(endpoints: dict[str, Endpoint]) -> dict[str, dict[str, Any]]:
    """Per-endpoint load result for the READY frame."""
    out: dict[str, dict[str, Any]] = {}
    for name, ep in endpoints.items():
        if ep.fn is not None:
            out[name] = {"ok": True, "load_s": round(ep.load_s, 4)}
        else:
            out[name] = {"ok": False, "error": ep.error, "traceback": ep.traceback}
    return out


# -- calls --------------------------------------------------------------------------


def _json_parts(obj: dict[str, Any]) -> list[bytes | memoryview]:
    return [json.dumps(obj).encode()]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


#: built once: json.loads(..., parse_constant=...) would build a decoder per call
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
_TOO_DEEP = f"nested deeper than {nesting.MAX_DEPTH} levels of arrays and objects, the most a request may nest"
#: this process's interrupt state (pool/interrupt.py), read as a global on every request
_INTERRUPTS = interrupt.STATE


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as the attributes object; ValueError says what is wrong with it."""
    # "{" then no NUL is what json.detect_encoding calls UTF-8: the usual body skips the detection
    usual = body[:1] == b"{" and body[1:2] != b"\x00"
    if not usual and not body.strip():
        return {}
    try:
        # what json.loads does with bytes (UTF-8, -16 or -32, detected), on the cached decoder
        text = body.decode("utf-8" if usual else json.detect_encoding(body), "surrogatepass")
    except UnicodeDecodeError:
        raise ValueError("request body is not UTF-8 text") from None
    # measured before the decoder sees it: a body nested deeper than the worker's stack allows
    # must be the caller's error, never the worker's death (pool/nesting.py)
    if nesting.json_depth_exceeds(text):
        raise ValueError(f"request body is {_TOO_DEEP}")
    try:
        data = _DECODER.decode(text)
    except RecursionError:  # within MAX_DEPTH, yet deeper than this interpreter's stack allows now
        raise ValueError(f"request body is {_TOO_DEEP}") from None
    except ValueError as exc:
        raise ValueError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ValueError(f"request body must be a JSON object whose attributes fill the function's parameters, got {kind}")
    return data


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def handle(endpoints: dict[str, Endpoint], buf: bytearray, limit: int) -> tuple[int, list[bytes | memoryview]]:
    """Run one ENDPOINT frame; returns the reply's (status, payload parts)."""
    name, off = frames.parse_endpoint(buf)
    ep = endpoints.get(name)
    if ep is None:
        return Status.ENDPOINT_UNAVAILABLE, _json_parts({"message": f"endpoint {name} is not configured in this pool", "traceback": None})
    if ep.fn is None:
        return Status.ENDPOINT_UNAVAILABLE, _json_parts({"message": f"endpoint {name} failed to load from {ep.code}: {ep.error}", "traceback": ep.traceback})
    try:
        data = parse_body(bytes(memoryview(buf)[off:]))
    except ValueError as exc:
        return Status.BAD_REQUEST, _json_parts({"message": str(exc)})
    keys = data.keys()
    if not (keys >= ep.required_set and (ep.var_keyword or keys <= ep.params)):  # set tests in C first
        missing = [n for n in ep.required if n not in data]
        unexpected = [] if ep.var_keyword else [k for k in data if k not in ep.params]
        problems = []
        if missing:
            problems.append(f"missing required parameter{'s' if len(missing) > 1 else ''} {_quoted(missing)}")
        if unexpected:
            problems.append(f"unexpected parameter{'s' if len(unexpected) > 1 else ''} {_quoted(unexpected)}")
        message = f"{'; '.join(problems)} for endpoint {name}: the function is {ep.signature}"
        return Status.BAD_ARGUMENTS, _json_parts({"message": message, "missing": missing, "unexpected": unexpected})
    # interrupt.STATE.run_user, inline: a cancel (its caller left) interrupts the function. The
    # call through run_user packed the arguments into a dict twice: 1.5k instructions a request
    intr = _INTERRUPTS
    try:
        intr.in_user = True
        try:
            if intr.hit:  # cancelled before it could start
                raise KeyboardInterrupt("cancelled by its client")
            result = ep.fn(**data)
        finally:
            intr.in_user = False
    except BaseException as exc:  # noqa: BLE001 - every failure of user code goes back to its caller
        return _failure(exc)
    if isinstance(result, api.CustomResponse):
        try:
            head, body = result.encode()
        except (TypeError, ValueError) as exc:
            return _error("InvalidCustomResponse", exc, with_traceback=False)
        head_json = json.dumps(head).encode()
        if len(head_json) + len(body) + frames.HEADER_SIZE + 4 > limit:
            return _too_large(len(body), limit)
        return Status.CUSTOM_RESPONSE, [*frames.error_payload(head_json, b""), body]
    try:
        payload = to_json(result)
    except NotSerializable as exc:
        return _error("ResultNotSerializable", exc, with_traceback=False)
    except Exception as exc:  # noqa: BLE001 - a converter (e.g. .pd() of a q object) that failed
        return _error("ResultNotSerializable", exc)
    if len(payload) + frames.HEADER_SIZE > limit:
        return _too_large(len(payload), limit)
    return Status.OK, [payload]


def _too_large(size: int, limit: int) -> tuple[int, list[bytes | memoryview]]:
    exc = ValueError(f"the result is {size} bytes, more than daemon.max_message_bytes ({limit}) allows")
    return _error("ResultTooLarge", exc, with_traceback=False)


def _failure(exc: BaseException) -> tuple[int, list[bytes | memoryview]]:
    if isinstance(exc, qconn.QConnectionError):  # q is unreachable: not the function's fault
        return Status.Q_UNAVAILABLE, [qconn.error_payload(exc)]
    status = api.http_status_of(exc)
    if status is not None:
        message = str(getattr(exc, "message", None) or exc)
        error_type = getattr(exc, "error_type", None) or type(exc).__name__
        return Status.API_ERROR, _json_parts({"http_status": status, "errorType": str(error_type), "message": message, "detailedMessage": message})
    return _error("FunctionError", exc)


def _error(error_type: str, exc: BaseException, with_traceback: bool = True) -> tuple[int, list[bytes | memoryview]]:
    info = {
        "errorType": error_type,
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": _user_traceback(exc) if with_traceback else "",
    }
    parts: list[bytes | memoryview] = [*frames.error_payload(json.dumps(info).encode(), b"")]
    return Status.ERROR, parts


def _user_traceback(exc: BaseException) -> str:
    """The traceback from the user's code down, without this module's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))
