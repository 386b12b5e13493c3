"""The HTTP front door: Dataiku API-node style endpoint calls, status and probes.

One aiohttp application served on two kinds of site: the Unix socket
``http.socket`` (default ``cruised-http.sock`` beside the native socket) and,
when ``http.listen`` is set, a TCP address. Routes::

    POST /public/api/v1/<service>/<endpoint>/run   call an endpoint
    GET  /status    pools, workers, queues and every endpoint's state (JSON)
    GET  /livez     200 while the daemon's loop runs (a liveness probe)
    GET  /healthz   the same as /livez (its older name)
    GET  /readyz    200 once every required pool has ``min`` warm workers and
                    every endpoint's code loaded, and the daemon is not
                    draining (``cruised drain``); else 503 with the reasons
                    (a readiness probe, HAProxy's ``option httpchk``)
    GET  /metrics   Prometheus text (``DoorHost.render_metrics``)

The door sees the daemon only through ``DoorHost`` (daemon/doors/host.py).

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
    rest of its life. Both run the same steps (daemon/doors/http/steps.py:
    access, ``route``, ``admit``, ``submit``, ``answer``), so every answer in
    this table is the same either way.

Answers (errors are JSON ``{"errorType", "message", "detailedMessage"}``)::

    200  {"response": <result>, "timing": {"queue_ms", "exec_ms", "total_ms"}}
         (milliseconds on one monotonic clock: total_ms >= queue_ms + exec_ms)
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
    503  Draining            cruised drain is in force: never ran (Retry-After)
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
    once keys are configured; the probes (/livez, /healthz, /readyz) never
    do: a load balancer or kubelet has no key, and they reveal only whether
    the loop runs and whether the daemon takes calls (readyz's reasons name
    pools and endpoints, which the caller routes to anyway), nothing a call
    could not learn from a 503. There is no route for shipped functions:
    they exist only on the native Unix socket.

Probes on the fast path
    A probe is a GET, so the fast path hands its connection to aiohttp at
    once (a probe per fresh connection, as HAProxy and kubelet send them,
    costs one aiohttp handler); a keep-alive connection that made endpoint
    calls on the fast path first is handed over at its first probe. Either
    way the answer is these handlers', and a DRAINING refusal of a call is
    worded by steps.py for both paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import HttpVersion11, web

from cruised.core.dispatch import FutureReply
from cruised.doors import access
from cruised.doors.http.fast import FastConnection
from cruised.doors.http.steps import KEEPALIVE_TIMEOUT, Caller, Refusal, Steps, error_response, internal_error, json_response, now, on_unix
from cruised.doors.sockets import bind_tcp, bind_unix
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind

if TYPE_CHECKING:
    from cruised.doors.host import DoorHost

log = logging.getLogger("cruised.http")

RUN_PATH = "/public/api/v1/{service}/{endpoint}/run"
#: at shutdown, how long the server waits for handlers still writing answers
HANDLER_GRACE = 2.0

HttpReply = FutureReply  # the ReplySink of one call: the dispatcher's answer resolves a future


def caller_of(request: web.Request) -> Caller:
    """The access checks' view of an aiohttp request."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    return Caller(sock, request.remote, request.method, request.path, request.headers.get("Authorization"), on_unix(sock))


class HttpDoor:
    def __init__(self, host: DoorHost, socket_path: str) -> None:
        self.host = host
        self.loop = host.loop
        self.steps = Steps(host)
        self.socket_path = socket_path
        self.tcp_address: str | None = None
        self.runner: web.AppRunner | None = None
        self.servers: list[asyncio.AbstractServer] = []
        #: open connections still on the fast path (daemon/doors/http/fast.py); handed-off ones are aiohttp's
        self.fast: set[FastConnection] = set()
        self._unix_bound = False

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind both sites; SocketInUse if either address is taken (nothing is left bound then)."""
        cfg = self.host.config
        app = web.Application(middlewares=[self._errors])
        app.router.add_post(RUN_PATH, self.run, expect_handler=self._expect)
        app.router.add_get("/status", self.status)
        app.router.add_get("/livez", self.healthz)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=HANDLER_GRACE, keepalive_timeout=KEEPALIVE_TIMEOUT)
        await self.runner.setup()

        def connection() -> asyncio.Protocol:
            # every connection starts on the fast path, which hands it to aiohttp (runner.server) at its
            # first request that is not a plain endpoint call
            return FastConnection(self.steps, self.fast, self.aiohttp_protocol)

        socks: list[socket.socket] = []
        try:
            socks.append(bind_unix(self.socket_path, cfg.daemon.socket_mode))
            self._unix_bound = True
            address = cfg.http.address()
            if address is not None:
                socks.append(self._bind_tcp(*address))
            for sock in socks:
                self.servers.append(await self.loop.create_server(connection, sock=sock, backlog=512))
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
        if self.tcp_address:
            cfg = self.host.config
            log.info("%s", access.http_line(cfg, self.tcp_address))
            exposure = access.http_exposure(cfg)
            if exposure is not None:
                log.warning("%s", exposure)

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
        return {"socket": self.socket_path, "listen": self.tcp_address, "auth": access.http_auth(self.host.config)}

    # -- middleware -----------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Every failure as the JSON error shape, including aiohttp's own 404/405/413; a Refusal as its response."""
        try:
            return await handler(request)
        except Refusal as refusal:
            return refusal.response
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
                return self.steps.too_large()
            return error_response(exc.status, "BadRequest" if exc.status < 500 else "InternalError", exc.reason or str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("http: internal error on %s %s", request.method, request.path)
            return internal_error(exc)

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse an oversized body before the client sends it."""
        if request.content_length is not None and request.content_length > self.steps.max_body():
            return self.steps.too_large()
        if request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0
            return None
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers.get('Expect')}")

    # -- endpoint calls -------------------------------------------------------------------

    async def _read_frame(self, request: web.Request, name: str) -> bytearray:
        """The ENDPOINT frame around the request body, read in chunks; Refusal (413) if it is too large."""
        limit = self.steps.max_body()
        if request.content_length is not None and request.content_length > limit:
            raise Refusal(self.steps.too_large())
        buf = bytearray(frames.HEADER_SIZE)
        buf += frames.pack_name(name)
        start = len(buf)
        async for chunk in request.content.iter_any():
            if len(buf) - start + len(chunk) > limit:
                raise Refusal(self.steps.too_large())
            buf += chunk
        frames.seal(buf, Kind.ENDPOINT)
        return buf

    async def run(self, request: web.Request) -> web.StreamResponse:
        t0 = now()
        steps = self.steps
        name, pool, who = steps.route(request.match_info["service"], request.match_info["endpoint"], caller_of(request))
        frame = await self._read_frame(request, name)
        disp = steps.admit(name, pool)
        sink = HttpReply(self.loop)
        job = steps.submit(disp, name, frame, sink, who)
        del frame
        try:
            status, buf, message = await sink.future
        except asyncio.CancelledError:
            disp.drop_client(sink)  # the caller hung up: a queued call never runs, a running one is cancelled (on_disconnect)
            raise
        return steps.answer(name, job, status, buf, message, t0)

    # -- status and probes ---------------------------------------------------------------

    async def status(self, request: web.Request) -> web.StreamResponse:
        self.steps.check_access(caller_of(request), None)
        return json_response(self.host.status())

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        return json_response({"status": "alive", "state": self.host.state})

    async def readyz(self, request: web.Request) -> web.StreamResponse:
        reasons = self.host.readiness()
        if reasons:
            return json_response({"ready": False, "draining": self.host.draining, "reasons": reasons}, status=503)
        return json_response({"ready": True, "draining": False})

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        self.steps.check_access(caller_of(request), None)
        from cruised.ops.metrics import CONTENT_TYPE

        body = self.host.render_metrics()  # on the loop thread: it reads dispatcher state without locks
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
