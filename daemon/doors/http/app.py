"""The HTTP front door: Dataiku API-node style endpoint calls, status and probes.

One aiohttp application served on two kinds of site: the Unix socket
``http.socket`` (default ``cruised-http.sock`` beside the native socket) and,
when ``http.listen`` is set, a TCP address. Routes::

    POST /public/api/v1/<service>/<endpoint>/run   call an endpoint
    GET  /status    pools, workers, queues and every endpoint's state (JSON)
    GET  /healthz   200 while the daemon's loop runs
    GET  /readyz    200 once every pool has ``min`` warm workers and every
                    endpoint's code loaded; else 503 with the reasons
    GET  /metrics   Prometheus text (``Supervisor.render_metrics``)

Data flow of a call
    check access -> read the body (at most ``daemon.max_message_bytes``,
    counted while it streams in, so a larger one is refused with 413 without
    being held) -> an ENDPOINT frame holding the body bytes unchanged -> a
    ``Job`` on the endpoint's pool's Dispatcher, exactly as the native door
    submits calls, with an ``HttpReply`` sink resolving a future -> the
    worker's REPLY -> the HTTP answer. The body is parsed, the parameters
    bound and the result turned into JSON by the worker (pool/endpoint.py):
    this process neither parses the request nor unpickles anything.

Two ways in, one behaviour
    Every connection starts on the fast path (daemon/doors/http/fast.py): plain
    keep-alive endpoint calls are parsed and answered there without aiohttp's
    per-request machinery (-45% supervisor CPU per call). The first request
    that is anything else (another route, chunked or oversized bodies,
    ``Expect``, HTTP/1.0, odd syntax) hands the connection to aiohttp for the
    rest of its life. Both run the same steps below (``route``, ``admit``,
    ``submit``, ``answer``), so every answer in this table is the same either way.

Answers (errors are JSON ``{"errorType", "message", "detailedMessage"}``)::

    200  {"response": <result>, "timing": {"queue_ms", "exec_ms", "total_ms"}}
    any  the function's CustomResponse: its status, headers and body
    4xx/5xx  the function raised an error with http_status_code: errorType = its class
    400  BadRequest          body is not a JSON object (invalid JSON, not UTF-8, an array, ...)
    400  BadArguments        a required parameter is missing or an attribute is unexpected
    401  Unauthorized        TCP call to a service with api_keys, without a valid key
    403  AccessDenied        Unix-socket peer not in daemon.allow_uids / allow_gids
    404  NotFound            unknown service, endpoint or route
    405  MethodNotAllowed
    413  PayloadTooLarge     body above daemon.max_message_bytes
    500  FunctionError       the function raised (remote traceback in detailedMessage)
    500  ResultNotSerializable / ResultTooLarge / InvalidCustomResponse
    502  WorkerCrashed       the worker died during the call (not retried)
    502  QConnectionError    the worker's q connection is down (the worker stays warm)
    503  QueueFull           the pool's queue is full (Retry-After)
    503  ShuttingDown        (Retry-After)
    503  EndpointUnavailable the endpoint's code failed to load (detailedMessage: traceback)
    503  PoolUnavailable     no worker is up and starting one fails (Retry-After)
    504  QueueTimeout        waited queue_timeout for a worker; never ran
    504  ExecutionTimeout    ran past exec_timeout; its worker was killed

Access
    The Unix socket is guarded by its file mode (``daemon.socket_mode``) and
    the optional peer allowlist ``daemon.allow_uids`` / ``allow_gids``
    (SO_PEERCRED), like the native socket; it needs no API key. Over TCP a
    service with ``api_keys`` (or ``api_keys_file``) needs one of them, as the
    HTTP Basic user with a blank password (as DSS clients send it) or as
    ``Authorization: Bearer <key>``; keys are compared in constant time and
    never logged. ``/status`` and ``/metrics`` over TCP need any service's key
    once keys are configured; the probes never do. There is no route for
    shipped functions: they exist only on the native Unix socket.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from cruised.config import Config
from cruised.core import services
from cruised.core.dispatch import Dispatcher, FutureReply, Job, ReplySink
from cruised.doors.sockets import (
    bind_tcp,
    bind_unix,
    next_job_id,
    peer_credentials,
)
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.core.supervisor import Supervisor
    from cruised.doors.http.fast import FastConnection

log = logging.getLogger("cruised.http")

RUN_PATH = "/public/api/v1/{service}/{endpoint}/run"
#: idle keep-alive connections close after this
KEEPALIVE_TIMEOUT = 75.0
#: at shutdown, how long the server waits for handlers still writing answers
HANDLER_GRACE = 2.0


def error_response(status: int, error_type: str, message: str, detailed: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    body = {"errorType": error_type, "message": message, "detailedMessage": detailed if detailed else message}
    return web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers)


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(obj).encode(), content_type="application/json")


HttpReply = FutureReply  # the ReplySink of one call: the dispatcher's answer resolves a future


#: daemon refusals -> (HTTP status, errorType, whether to send Retry-After)
_REFUSALS: dict[int, tuple[int, str, bool]] = {
    Status.QUEUE_FULL: (503, "QueueFull", True),
    Status.SHUTTING_DOWN: (503, "ShuttingDown", True),
    Status.QUEUE_TIMEOUT: (504, "QueueTimeout", False),
    Status.EXEC_TIMEOUT: (504, "ExecutionTimeout", False),
    Status.WORKER_CRASHED: (502, "WorkerCrashed", False),
    Status.Q_UNAVAILABLE: (502, "QConnectionError", False),  # the worker's kdb+ connection is down
}


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


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    ok = False
    for key in keys:  # every key is compared, so the time taken says nothing about which one (if any) matched
        ok |= hmac.compare_digest(presented, key)
    return ok


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

    @classmethod
    def of(cls, request: web.Request) -> Caller:
        sock = request.transport.get_extra_info("socket") if request.transport is not None else None
        return cls(sock, request.remote, request.method, request.path, request.headers.get("Authorization"), on_unix(sock))


def on_unix(sock: socket.socket | None) -> bool:
    """Whether ``sock`` is a Unix socket. ``sock.family`` builds an AddressFamily enum in Python
    (1.3 us with the comparison): the HTTP fast path asks once per connection."""
    return sock is not None and sock.family == socket.AF_UNIX


class HttpDoor:
    def __init__(self, supervisor: Supervisor, socket_path: str) -> None:
        self.sup = supervisor
        self.loop = supervisor.loop
        self.socket_path = socket_path
        self.tcp_address: str | None = None
        self.runner: web.AppRunner | None = None
        self.servers: list[asyncio.AbstractServer] = []
        #: open connections still on the fast path (daemon/doors/http/fast.py); handed-off ones are aiohttp's
        self.fast: set[FastConnection] = set()
        self._unix_bound = False
        self._keys_config: Config | None = None
        self._keys: dict[str, list[bytes]] = {}

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both sites; SocketInUse if either address is taken (nothing is left bound then)."""
        cfg = self.sup.config
        app = web.Application(middlewares=[self._errors])
        app.router.add_post(RUN_PATH, self.run, expect_handler=self._expect)
        app.router.add_get("/status", self.status)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=HANDLER_GRACE, keepalive_timeout=KEEPALIVE_TIMEOUT)
        await self.runner.setup()
        # imported here: httpfast imports this module's names (Caller, KEEPALIVE_TIMEOUT)
        from cruised.doors.http.fast import FastConnection

        socks: list[socket.socket] = []
        try:
            socks.append(bind_unix(self.socket_path, cfg.daemon.socket_mode))
            self._unix_bound = True
            address = cfg.http.address()
            if address is not None:
                socks.append(self._bind_tcp(*address))
            for sock in socks:
                # every connection starts on the fast path, which hands it to aiohttp (runner.server) at its
                # first request that is not a plain endpoint call
                self.servers.append(await self.loop.create_server(lambda: FastConnection(self), sock=sock, backlog=512))
        except BaseException:
            for server in self.servers:
                server.close()
            self.servers.clear()
            for sock in socks:
                sock.close()
            self._unlink()
            await self.runner.cleanup()
            raise
        log.info("http listening on %s%s", self.socket_path, f" and {self.tcp_address}" if self.tcp_address else "")

    def aiohttp_protocol(self) -> asyncio.Protocol:
        """A fresh aiohttp RequestHandler: a connection the fast path hands over is served by it from then on."""
        assert self.runner is not None and self.runner.server is not None
        return self.runner.server()

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        sock = bind_tcp(host, port, "http.listen")
        family = sock.family
        bound = sock.getsockname()
        self.tcp_address = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        return sock

    async def stop_listening(self) -> None:
        """Accept no new connections; requests on open ones are still answered."""
        for server in self.servers:
            server.close()  # listening sockets only: open connections stay
        self.servers.clear()
        self._unlink()

    def _unlink(self) -> None:
        if not self._unix_bound:
            return
        self._unix_bound = False
        try:
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass

    async def close(self) -> None:
        """After every job is answered: close the connections (handlers get HANDLER_GRACE to finish writing)."""
        await self.stop_listening()
        for conn in list(self.fast):
            conn.close()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def describe(self) -> dict[str, Any]:
        return {"socket": self.socket_path, "listen": self.tcp_address}

    # -- access -------------------------------------------------------------------------

    def _service_keys(self) -> dict[str, list[bytes]]:
        cfg = self.sup.config
        if cfg is not self._keys_config:  # a reload swapped the config: read the keys (and key files) again
            keys: dict[str, list[bytes]] = {}
            for name, service in cfg.services.items():
                try:
                    keys[name] = [k.encode() for k in service.keys()]
                except OSError as exc:
                    # validated at load; unreadable now: refuse everyone rather than open the service
                    log.error("service=%s api_keys_file %s unreadable (%s): refusing TCP calls", name, service.api_keys_file, exc.strerror)
                    keys[name] = [os.urandom(32).hex().encode()]
            self._keys, self._keys_config = keys, cfg
        return self._keys

    def _peer_refusal(self, caller: Caller) -> web.Response | None:
        cfg = self.sup.config.daemon
        if not (cfg.allow_uids or cfg.allow_gids):
            return None
        try:
            pid, uid, gid = peer_credentials(caller.sock)  # type: ignore[arg-type]
        except (OSError, AttributeError):
            pid = uid = gid = -1
        if uid in cfg.allow_uids or gid in cfg.allow_gids:
            return None
        log.warning("http: refused pid=%s uid=%s gid=%s on %s: not in daemon.allow_uids/allow_gids", pid, uid, gid, caller.path)
        return error_response(403, "AccessDenied", f"uid {uid} / gid {gid} may not use this daemon (daemon.allow_uids, daemon.allow_gids)")

    def _access(self, caller: Caller, service: str | None) -> web.Response | None:
        """None if the caller may go on; else the refusal. ``service`` None: any service's key will do."""
        if caller.over_unix:
            return self._peer_refusal(caller)
        all_keys = self._service_keys()
        keys = all_keys.get(service, []) if service is not None else [k for ks in all_keys.values() for k in ks]
        if not keys:
            return None
        what = f"service {service!r}" if service is not None else caller.path
        challenge = {"WWW-Authenticate": 'Basic realm="cruised", charset="UTF-8"'}
        presented = presented_key(caller.authorization)
        if presented is None:
            log.info("http: 401 %s %s from %s: no API key", caller.method, caller.path, caller.remote)
            self.sup.metrics.auth_failed("http")
            return error_response(
                401,
                "Unauthorized",
                f"{what} needs an API key: send it as the HTTP Basic user with a blank password, or as 'Authorization: Bearer <key>'",
                headers=challenge,
            )
        if not key_matches(presented, keys):
            log.info("http: 401 %s %s from %s: wrong API key", caller.method, caller.path, caller.remote)
            self.sup.metrics.auth_failed("http")
            return error_response(401, "Unauthorized", f"invalid API key for {what}", headers=challenge)
        return None

    # -- middleware -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every failure as the JSON error shape, including aiohttp's own 404/405/413."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                return error_response(
                    404, "NotFound", f"no route {request.method} {request.path}; endpoints are called with POST /public/api/v1/<service>/<endpoint>/run"
                )
            if exc.status == 405:
                allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
                return error_response(
                    405, "MethodNotAllowed", f"{request.method} is not allowed on {request.path} (allowed: {allowed})", headers={"Allow": allowed}
                )
            if exc.status == 413:
                return self.too_large()
            return error_response(exc.status, "BadRequest" if exc.status < 500 else "InternalError", exc.reason or str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("http: internal error on %s %s", request.method, request.path)
            return self.internal_error(exc)

    @staticmethod
    def internal_error(exc: Exception) -> web.Response:
        return error_response(500, "InternalError", f"internal error in cruised: {type(exc).__name__}: {exc}")

    def too_large(self) -> web.Response:
        limit = self.sup.config.daemon.max_message_bytes
        resp = error_response(413, "PayloadTooLarge", f"request body exceeds {int(limit)} bytes (daemon.max_message_bytes)")
        resp.force_close()
        return resp

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an oversized body before the client sends it."""
        if request.content_length is not None and request.content_length > self.sup.config.daemon.max_message_bytes:
            return self.too_large()
        if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
            return None
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers.get('Expect')}")

    # -- endpoint calls -------------------------------------------------------------------

    async def _read_frame(self, request: web.Request, name: str) -> bytearray | None:
        """The ENDPOINT frame around the request body, read in chunks; None if it is too large."""
        limit = self.sup.config.daemon.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            return None
        buf = bytearray(frames.HEADER_SIZE)
        buf += frames.pack_name(name)
        start = len(buf)
        async for chunk in request.content.iter_any():
            if len(buf) - start + len(chunk) > limit:
                return None
            buf += chunk
        frames.seal(buf, Kind.ENDPOINT)
        return buf

    async def run(self, request: web.Request) -> web.StreamResponse:
        t0 = self.loop.time()
        route = self.route(request.match_info["service"], request.match_info["endpoint"], Caller.of(request))
        if type(route) is not tuple:  # a refusal (web.Response: an ABC, so isinstance is slow)
            return route
        name, pool = route
        frame = await self._read_frame(request, name)
        if frame is None:
            return self.too_large()
        disp = self.admit(name, pool)
        if not isinstance(disp, Dispatcher):  # a refusal
            return disp
        sink = HttpReply(self.loop)
        job = self.submit(disp, name, frame, sink)
        del frame
        try:
            status, buf, message = await sink.future
        except asyncio.CancelledError:
            disp.drop_client(sink)  # the caller hung up: a queued call never runs
            raise
        return self.answer(name, job, status, buf, message, t0)

    # The steps of a call, shared by the aiohttp handler above and the keep-alive fast path
    # (daemon/doors/http/fast.py): route -> (read the body) -> admit -> submit -> answer. Each check
    # returns its refusal as a web.Response, so both paths answer every case identically.

    def route(self, service: str, endpoint: str, caller: Caller) -> tuple[str, str] | web.Response:
        """Service, access, endpoint: ("service/endpoint", its pool), or the refusal."""
        cfg = self.sup.config
        svc = cfg.services.get(service)
        if svc is None:
            known = ", ".join(sorted(cfg.services)) or "none configured"
            return error_response(404, "NotFound", f"no service {service!r} (services: {known})")
        refusal = self._access(caller, service)
        if refusal is not None:
            return refusal
        ep = svc.endpoints.get(endpoint)
        if ep is None:
            known = ", ".join(sorted(svc.endpoints)) or "none"
            return error_response(404, "NotFound", f"service {service!r} has no endpoint {endpoint!r} (endpoints: {known})")
        return f"{service}/{endpoint}", ep.pool

    def admit(self, name: str, pool: str) -> Dispatcher | web.Response:
        """The endpoint's dispatcher, or why the call cannot be queued (pool not running, code failed)."""
        disp = self.sup.dispatcher(pool)
        if disp is None:
            return error_response(500, "InternalError", f"endpoint {name} names pool {pool!r}, which is not running")
        state = services.endpoint_state(disp, name)
        if state.state == "failed":
            return error_response(503, "EndpointUnavailable", f"endpoint {name} is unavailable: its code failed to load: {state.error}", state.traceback)
        if state.state == "pool_unavailable":
            return error_response(503, "PoolUnavailable", f"endpoint {name} is unavailable: {state.error}", headers=self._retry_after())
        return disp

    @staticmethod
    def submit(disp: Dispatcher, name: str, frame: bytearray, sink: ReplySink) -> Job:
        """Queue the ENDPOINT frame; ``sink`` (also the job's client, for drop_client) gets the answer."""
        job = Job(next_job_id(), Kind.ENDPOINT, frame, sink, sink, 0, endpoint=name, door="http")
        disp.submit(job)
        return job

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(max(0, math.ceil(self.sup.config.http.retry_after)))}  # whole seconds (RFC 9110)

    def timing(self, job: Job, t0: float) -> tuple[float, float, float]:
        """(queue_ms, exec_ms, total_ms) of an answered job; ``t0``: when its request arrived."""
        now = self.loop.time()
        started = job.started if job.started is not None else now
        finished = job.finished if job.finished is not None else now
        queue_ms = max(0.0, (started - job.admitted) * 1e3)
        exec_ms = max(0.0, (finished - started) * 1e3) if job.started is not None else 0.0
        return queue_ms, exec_ms, (now - t0) * 1e3

    @staticmethod
    def server_timing(timing: tuple[float, float, float]) -> str:
        return "queue;dur=%.3f, exec;dur=%.3f, total;dur=%.3f" % timing

    @staticmethod
    def ok_body(buf: bytearray, timing: tuple[float, float, float]) -> bytes:
        """The 200 body around a worker's OK payload (already JSON): the response and its timing."""
        # the JSON by hand, not a dict through json.dumps; the figures are finite and >= 0, so
        # "%.3f" is valid JSON for each (and 3x cheaper than repr(round(x, 3)))
        timing_json = b'{"queue_ms":%.3f,"exec_ms":%.3f,"total_ms":%.3f}' % timing
        return b"".join((b'{"response":', memoryview(buf)[frames.HEADER_SIZE :], b',"timing":', timing_json, b"}"))

    def answer(self, name: str, job: Job, status: int, buf: bytearray | None, message: str, t0: float) -> web.Response:
        timing = self.timing(job, t0)
        if buf is not None and status == Status.OK:
            return web.Response(
                status=200, body=self.ok_body(buf, timing), content_type="application/json", headers={"Server-Timing": self.server_timing(timing)}
            )
        return self.other_answer(name, status, buf, message, timing)

    def other_answer(self, name: str, status: int, buf: bytearray | None, message: str, timing: tuple[float, float, float]) -> web.Response:
        """Every answer but OK: refusals by the daemon, custom responses, the function's errors."""
        server_timing = {"Server-Timing": self.server_timing(timing)}
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
            headers.update(server_timing)
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

    # -- status and probes ---------------------------------------------------------------

    async def status(self, request: web.Request) -> web.StreamResponse:
        refusal = self._access(Caller.of(request), None)
        if refusal is not None:
            return refusal
        return json_response(self.sup.status())

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return json_response({"status": "alive", "state": self.sup.state})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        reasons = services.readiness(self.sup)
        if reasons:
            return json_response({"ready": False, "reasons": reasons}, status=503)
        return json_response({"ready": True})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        refusal = self._access(Caller.of(request), None)
        if refusal is not None:
            return refusal
        from cruised.ops.metrics import CONTENT_TYPE

        body = self.sup.render_metrics()  # on the loop thread: it reads dispatcher state without locks
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
