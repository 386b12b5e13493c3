"""The steps of an HTTP endpoint call, shared by both ways in (app.py's aiohttp handlers, fast.py's fast path).

::

    check access -> route -> (read the body) -> admit -> submit -> (the worker) -> answer

Each step that can refuse raises ``Refusal``, which carries the response to
send: the caller catches it and sends ``refusal.response`` the way it sends
every answer (aiohttp returns it, the fast path renders it), so a refusal
needs no type test on the normal path and both paths answer every case with
the same status, headers and body. Every answer is a ``web.Response``: aiohttp
writes it, and fast.py renders it byte for byte as aiohttp would (fast.render,
fast.render_ok; tests/unit/test_httpfast_units.py holds them to it).

This module sees the daemon only through ``DoorHost`` (daemon/doors/host.py)
and imports neither app.py nor fast.py: both import it.

Clock
    Every figure and deadline a caller sees (``timing`` in a 200 body, the
    ``Server-Timing`` header) is on ``now``: ``time.monotonic``, the clock the
    dispatcher stamps ``job.admitted``, ``started`` and ``finished`` with
    (core/supervisor.py LoopClock.time), so the three figures compare. Not the
    event loop's ``loop.time()``: under uvloop it has millisecond resolution
    (``total_ms`` read 0.000 or 1.000 for every call), and on a different base
    from the job's stamps it could make ``total_ms`` smaller than its parts.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from multidict import CIMultiDict

from cruised.core import services
from cruised.core.dispatch import Dispatcher, Job, ReplySink
from cruised.doors.sockets import next_job_id, peer_caller, peer_credentials
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.config import Config
    from cruised.doors.host import DoorHost


log = logging.getLogger("cruised.http")

#: idle keep-alive connections close after this (aiohttp's keepalive_timeout and the fast path's idle timer)
KEEPALIVE_TIMEOUT = 75.0

#: the clock of every duration a caller sees: the dispatcher's (see the module docstring). The C
#: function itself, no Python frame around it: it is read twice per call.
now = time.monotonic

#: (queue_ms, exec_ms, total_ms)
Timing = tuple[float, float, float]


def error_response(status: int, error_type: str, message: str, detailed: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON error shape of every non-OK answer the door itself words: ``{"errorType", "message", "detailedMessage"}``."""
    body = {"errorType": error_type, "message": message, "detailedMessage": detailed if detailed else message}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(obj).encode(), content_type="application/json")


def internal_error(exc: Exception) -> web.Response:
    return error_response(500, "InternalError", f"internal error in cruised: {type(exc).__name__}: {exc}")


class Refusal(Exception):
    """A request the door answers itself, without running it: ``response`` is that answer."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


#: daemon refusals -> (HTTP status, errorType, whether to send Retry-After)
_REFUSALS: dict[int, tuple[int, str, bool]] = {
    Status.QUEUE_FULL: (503, "QueueFull", True),
    Status.SHUTTING_DOWN: (503, "ShuttingDown", True),
    Status.DRAINING: (503, "Draining", True),  # cruised drain: another daemon can take it
    Status.QUEUE_TIMEOUT: (504, "QueueTimeout", False),
    Status.EXEC_TIMEOUT: (504, "ExecutionTimeout", False),
    Status.WORKER_CRASHED: (502, "WorkerCrashed", False),
    Status.Q_UNAVAILABLE: (502, "QConnectionError", False),  # the worker's kdb+ connection is down
}


# -- who is calling -----------------------------------------------------------------------


def presented_key(authorization: str | None) -> bytes | None:
    """The API key in an Authorization header: the Basic user name, or the Bearer token."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    scheme = scheme.lower()
    value = value.strip()
    if scheme == "bearer" and value:
        return value.encode()
    if scheme == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        user = decoded.partition(":")[0]
        return user.encode() if user else None
    return None


def key_caller(presented: bytes, keys: list[tuple[bytes, str]]) -> str | None:
    """The caller name of the (key, name) ``presented`` matches; None if it matches none."""
    found: str | None = None
    for key, name in keys:  # every key is compared, so the time taken says nothing about which one (if any) matched
        if hmac.compare_digest(presented, key) and found is None:
            found = name
    return found


@dataclass(slots=True)
class Caller:
    """Who sent a request, as the access checks need it (from aiohttp's request or the fast path's parse)."""

    sock: socket.socket | None  # None if the transport has none (closed meanwhile)
    remote: str | None
    method: str
    path: str
    authorization: str | None
    #: it came over a Unix socket: peer credentials apply, not API keys (``on_unix(sock)``)
    over_unix: bool
    #: over a Unix socket: who the peer is (``peer_caller(sock)``), if the door already knows it. The
    #: fast path asks once per connection: a connected socket's peer credentials never change, and
    #: asking per request (uvloop's socket wraps and unwraps a socket object for getsockopt) cost
    #: about 10k instructions of the supervisor's 193k per HTTP request (callgrind)
    peer: str | None = None


def on_unix(sock: socket.socket | None) -> bool:
    """Whether ``sock`` is a Unix socket. ``sock.family`` builds an AddressFamily enum in Python
    (1.3 us with the comparison): the HTTP fast path asks once per connection."""
    return sock is not None and sock.family == socket.AF_UNIX


# -- the 200 answer ---------------------------------------------------------------------------


def server_timing(timing: Timing) -> str:
    return f"queue;dur={timing[0]:.3f}, exec;dur={timing[1]:.3f}, total;dur={timing[2]:.3f}"


def ok_body(buf: bytearray, timing: Timing) -> bytes:
    """The 200 body around a worker's OK payload (already JSON): the response and its timing."""
    # the JSON by hand, not a dict through json.dumps; the figures are finite and >= 0, so
    # "%.3f" is valid JSON for each (and 3x cheaper than repr(round(x, 3)))
    timing_json = b'{"queue_ms":%.3f,"exec_ms":%.3f,"total_ms":%.3f}' % timing
    return b"".join((b'{"response":', memoryview(buf)[frames.HEADER_SIZE :], b',"timing":', timing_json, b"}"))


def timing(job: Job, t0: float) -> Timing:
    """(queue_ms, exec_ms, total_ms) of an answered job; ``t0``: ``now()`` when its request arrived.

    All on one clock, so total_ms >= queue_ms + exec_ms: the request arrived
    before the job was admitted, and the answer comes after it finished.
    """
    end = now()
    started = job.started if job.started is not None else end
    finished = job.finished if job.finished is not None else end
    queue_ms = max(0.0, (started - job.admitted) * 1e3)
    exec_ms = max(0.0, (finished - started) * 1e3) if job.started is not None else 0.0
    return queue_ms, exec_ms, (end - t0) * 1e3


class Steps:
    """The steps of an endpoint call against one daemon (``host``); one instance per HTTP door."""

    def __init__(self, host: DoorHost) -> None:
        self.host = host
        self._keys_config: Config | None = None
        self._keys: dict[str, list[tuple[bytes, str]]] = {}  # per service: (key, its caller name)

    # -- access -------------------------------------------------------------------------

    def _service_keys(self) -> dict[str, list[tuple[bytes, str]]]:
        cfg = self.host.config
        if cfg is not self._keys_config:  # a reload swapped the config: read the keys (and key files) again
            keys: dict[str, list[tuple[bytes, str]]] = {}
            for name, service in cfg.services.items():
                try:
                    keys[name] = [(k.encode(), caller) for k, caller in service.named_keys()]
                except OSError as exc:
                    # validated at load; unreadable now: refuse everyone rather than open the service
                    log.error("service=%s api_keys_file %s unreadable (%s): refusing TCP calls", name, service.api_keys_file, exc.strerror)
                    keys[name] = [(os.urandom(32).hex().encode(), "")]
            self._keys, self._keys_config = keys, cfg
        return self._keys

    def _check_peer(self, caller: Caller) -> None:
        cfg = self.host.config.daemon
        if not (cfg.allow_uids or cfg.allow_gids):
            return
        try:
            pid, uid, gid = peer_credentials(caller.sock)  # type: ignore[arg-type]
        except (OSError, AttributeError):
            pid = uid = gid = -1
        if uid in cfg.allow_uids or gid in cfg.allow_gids:
            return
        log.warning("http: refused pid=%s uid=%s gid=%s on %s: not in daemon.allow_uids/allow_gids", pid, uid, gid, caller.path)
        raise Refusal(error_response(403, "AccessDenied", f"uid {uid} / gid {gid} may not use this daemon (daemon.allow_uids, daemon.allow_gids)"))

    def check_access(self, caller: Caller, service: str | None) -> str:
        """Refusal unless the caller may go on: peer credentials over the Unix socket, API keys over TCP.
        Returns who it is (daemon/core/fairness.py "Callers"): the peer's user over the Unix socket,
        the API key's name over TCP (``http:<address>`` where no key is needed).

        ``service`` None (``/status``, ``/metrics``): any service's key will do.
        """
        if caller.over_unix:
            self._check_peer(caller)
            return caller.peer if caller.peer is not None else peer_caller(caller.sock)
        all_keys = self._service_keys()
        keys = all_keys.get(service, []) if service is not None else [k for ks in all_keys.values() for k in ks]
        if not keys:
            return f"http:{caller.remote}"
        what = f"service {service!r}" if service is not None else caller.path
        challenge = {"WWW-Authenticate": 'Basic realm="cruised", charset="UTF-8"'}
        presented = presented_key(caller.authorization)
        if presented is None:
            log.info("http: 401 %s %s from %s: no API key", caller.method, caller.path, caller.remote)
            self.host.auth_failed("http")
            raise Refusal(
                error_response(
                    401,
                    "Unauthorized",
                    f"{what} needs an API key: send it as the HTTP Basic user with a blank password, or as 'Authorization: Bearer <key>'",
                    headers=challenge,
                )
            )
        name = key_caller(presented, keys)
        if name is None:
            log.info("http: 401 %s %s from %s: wrong API key", caller.method, caller.path, caller.remote)
            self.host.auth_failed("http")
            raise Refusal(error_response(401, "Unauthorized", f"invalid API key for {what}", headers=challenge))
        return name

    # -- a call -------------------------------------------------------------------------

    def route(self, service: str, endpoint: str, caller: Caller) -> tuple[str, str, str]:
        """Service, access, endpoint: ("service/endpoint", its pool, who calls); else Refusal (404, 401, 403)."""
        cfg = self.host.config
        svc = cfg.services.get(service)
        if svc is None:
            known = ", ".join(sorted(cfg.services)) or "none configured"
            raise Refusal(error_response(404, "NotFound", f"no service {service!r} (services: {known})"))
        who = self.check_access(caller, service)
        ep = svc.endpoints.get(endpoint)
        if ep is None:
            known = ", ".join(sorted(svc.endpoints)) or "none"
            raise Refusal(error_response(404, "NotFound", f"service {service!r} has no endpoint {endpoint!r} (endpoints: {known})"))
        return f"{service}/{endpoint}", ep.pool, who

    def max_body(self) -> int:
        """The largest request body accepted (daemon.max_message_bytes of the serving config)."""
        return int(self.host.config.daemon.max_message_bytes)

    def too_large(self) -> web.Response:
        """413 for a body above the limit; the connection closes after it (the body is not read)."""
        resp = error_response(413, "PayloadTooLarge", f"request body exceeds {self.max_body()} bytes (daemon.max_message_bytes)")
        resp.force_close()
        return resp

    def admit(self, name: str, pool: str) -> Dispatcher:
        """The endpoint's dispatcher; else Refusal: its pool is not running, or its code failed to load."""
        disp = self.host.dispatcher(pool)
        if disp is None:
            raise Refusal(error_response(500, "InternalError", f"endpoint {name} names pool {pool!r}, which is not running"))
        state = services.endpoint_state(disp, name)
        if state is services.LOADED:  # nearly every call: no string comparisons
            return disp
        if state.state == "failed":
            raise Refusal(
                error_response(503, "EndpointUnavailable", f"endpoint {name} is unavailable: its code failed to load: {state.error}", state.traceback)
            )
        if state.state == "pool_unavailable":
            raise Refusal(error_response(503, "PoolUnavailable", f"endpoint {name} is unavailable: {state.error}", headers=self._retry_after()))
        return disp

    @staticmethod
    def submit(disp: Dispatcher, name: str, frame: bytearray, sink: ReplySink, caller: str = "") -> Job:
        """Queue the ENDPOINT frame for ``caller``; ``sink`` (also the job's client, for drop_client) gets the answer."""
        job = Job(id=next_job_id(), kind=Kind.ENDPOINT, frame=frame, sink=sink, client=sink, client_reqid=0, endpoint=name, door="http", caller=caller)
        disp.submit(job)
        return job

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(max(0, math.ceil(self.host.config.http.retry_after)))}  # whole seconds (RFC 9110)

    # -- answers --------------------------------------------------------------------------

    def answer(self, name: str, job: Job, status: int, buf: bytearray | None, message: str, t0: float) -> web.Response:
        """The HTTP answer to a job's outcome (the fast path renders OK answers itself: fast.render_ok)."""
        figures = timing(job, t0)
        if buf is not None and status == Status.OK:
            return web.Response(status=200, body=ok_body(buf, figures), content_type="application/json", headers={"Server-Timing": server_timing(figures)})
        return self.other_answer(name, status, buf, message, figures)

    def other_answer(self, name: str, status: int, buf: bytearray | None, message: str, figures: Timing) -> web.Response:
        """Every answer but OK: refusals by the daemon, custom responses, the function's errors."""
        if buf is None:
            http_status, error_type, retry = _REFUSALS.get(status, (500, "InternalError", False))
            if http_status >= 500:
                log.warning("http: %s %s: %s", http_status, name, message)
            return error_response(http_status, error_type, message, headers=self._retry_after() if retry else None)
        payload = memoryview(buf)[frames.HEADER_SIZE :]
        if status == Status.CUSTOM_RESPONSE:
            head_raw, body_view = frames.parse_error(buf)
            head = json.loads(head_raw)
            headers = CIMultiDict((str(k), str(v)) for k, v in head["headers"])
            headers.update({"Server-Timing": server_timing(figures)})
            return web.Response(status=int(head["status"]), body=bytes(body_view), headers=headers)
        if status == Status.ERROR:
            info_raw, _ = frames.parse_error(buf)
            info = json.loads(info_raw)
            error_type = info.get("errorType", "FunctionError")
            text = f"{info['type']}: {info['message']}" if error_type == "FunctionError" else info["message"]
            log.info("http: 500 %s %s: %s", name, error_type, text)
            return error_response(500, error_type, f"endpoint {name} failed: {text}", info.get("traceback") or None)
        info = json.loads(bytes(payload))
        if status == Status.API_ERROR:
            return error_response(int(info["http_status"]), str(info["errorType"]), str(info["message"]), str(info.get("detailedMessage") or ""))
        if status == Status.BAD_ARGUMENTS:
            return error_response(400, "BadArguments", info["message"])
        if status == Status.BAD_REQUEST:
            return error_response(400, "BadRequest", info["message"])
        if status == Status.ENDPOINT_UNAVAILABLE:
            return error_response(503, "EndpointUnavailable", info["message"], info.get("traceback"))
        if status == Status.Q_UNAVAILABLE:
            return error_response(502, "QConnectionError", f"q is unavailable: {info['message']}")
        log.error("http: %s: unexpected reply status %s from the worker", name, status)
        return error_response(500, "InternalError", f"unexpected reply status {status} from the worker")
