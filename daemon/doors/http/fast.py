"""The HTTP door's fast path: keep-alive endpoint calls parsed and answered without aiohttp.

Why: aiohttp costs about 150 µs of supervisor CPU per request on the 2-core
reference VM (request and response objects, router, middleware, a task per
request, header serialisation), as much as the native door's whole
supervisor share of a call; a bare protocol doing the same parse and answer
costs under 20 µs (bench/hotpath.py --http). Endpoint calls are nearly all
of the door's traffic, so every connection of the door starts here.

What this module serves itself: ``POST /public/api/v1/<service>/<endpoint>/run
HTTP/1.1`` with CRLF-terminated, well-formed headers, exactly one
Content-Length of at most ``daemon.max_message_bytes``, no
Transfer-Encoding, Expect or Upgrade, a plain path (no query, no
percent-escape, no dot segment) and a head of at most ``MAX_HEAD`` bytes.
Anything else (another route or method, HTTP/1.0, chunked or oversized
bodies, ``Expect: 100-continue``, odd syntax) hands the connection, with
every byte not yet consumed, to aiohttp's RequestHandler for the rest of its
life, so daemon/doors/http/app.py's routes, limits and errors answer it as before.

Invariants:

* one request is in flight per connection: pipelined bytes wait in the
  buffer, so answers leave in request order;
* every answer comes from HttpDoor's own steps (``route``, ``admit``,
  ``submit``, ``answer``): the two paths cannot disagree on a status or a
  body; only the wire bytes are rendered here, with the headers aiohttp
  sends (Content-Length, Date, Server, ``Connection: close`` when closing);
* a hang-up (or a half-close, as with aiohttp) drops the caller's call
  (``Dispatcher.drop_client``): a queued call never runs;
* the buffer is bounded: a request's head by MAX_HEAD and its body by the
  message limit; while a call is in flight, reading pauses once
  ``PIPELINE_BYTES`` more have arrived, and no new call starts while the
  transport's write buffer is over its high-water mark.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import socket
import time
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_nodelay

from cruised.core.channel import batch_for
from cruised.core.dispatch import Dispatcher
from cruised.doors.http.app import KEEPALIVE_TIMEOUT, Caller, on_unix
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.core.dispatch import Job
    from cruised.doors.http.app import HttpDoor

log = logging.getLogger("cruised.http")

#: a longer head goes to aiohttp (its own line and field limits are 8190 bytes)
MAX_HEAD = 8190
#: while a call runs, read at most this much of what the client sends next before pausing
PIPELINE_BYTES = 256 << 10
_PREFIX = b"POST /public/api/v1/"
# RFC 3986 pchar without pct-encoded: what aiohttp's router would match unchanged
_SEGMENT = rb"[A-Za-z0-9._~!$&'()*+,;=:@-]+"
# The whole head in one pass (C regex engine, no per-line Python): the request line, then
# header lines of a token name and visible-ASCII/tab value (no obs-fold, no bare CR or LF).
_HEAD = re.compile(
    rb"POST /public/api/v1/(" + _SEGMENT + rb")/(" + _SEGMENT + rb")/run HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)
#: the header lines the fast path acts on, found in the validated header block
_FIELDS = re.compile(rb"(?im)^(content-length|authorization|connection|transfer-encoding|expect|upgrade):[ \t]*([^\r]*?)[ \t]*\r$")
_DIGITS = re.compile(rb"[0-9]{1,19}")
_SERVER = SERVER_SOFTWARE.encode()


class _Date:
    """The Date header value, formatted once per second (as aiohttp caches it)."""

    second = -1
    value = b""

    @classmethod
    def now(cls) -> bytes:
        t = int(time.time())
        if t != cls.second:
            cls.value = email.utils.formatdate(t, usegmt=True).encode()
            cls.second = t
        return cls.value


#: the bytes of an OK body besides the worker's payload and the three timing figures
_OK_BODY_FIXED = len(b'{"response":,"timing":{"queue_ms":,"exec_ms":,"total_ms":}}')


def render_ok(payload: bytes | memoryview, timing: tuple[float, float, float], close: bool) -> bytes:
    """A 200 answer around a worker's OK payload (JSON): byte for byte what aiohttp writes for
    HttpDoor.answer's Response (HttpDoor.ok_body, HttpDoor.server_timing), in one format
    with each timing figure formatted once."""
    q, e, t = b"%.3f" % timing[0], b"%.3f" % timing[1], b"%.3f" % timing[2]
    return (
        b"HTTP/1.1 200 OK\r\nServer-Timing: queue;dur=%b, exec;dur=%b, total;dur=%b\r\nContent-Type: application/json\r\n"
        b'Content-Length: %d\r\nDate: %b\r\nServer: %b\r\n%b\r\n{"response":%b,"timing":{"queue_ms":%b,"exec_ms":%b,"total_ms":%b}}'
    ) % (
        q, e, t,
        len(payload) + _OK_BODY_FIXED + len(q) + len(e) + len(t),
        _Date.now(),
        _SERVER,
        b"Connection: close\r\n" if close else b"",
        payload, q, e, t,
    )  # fmt: skip


def render(resp: web.Response, close: bool) -> bytes:
    """Any of HttpDoor's answers as aiohttp would put it on the wire (its headers, then Content-Length, Date, Server)."""
    body = resp.body
    assert isinstance(body, (bytes, bytearray)), "HttpDoor answers are built from bytes"
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
    seen: set[str] = set()
    for name, value in resp.headers.items():
        lower = name.lower()
        if lower in ("content-length", "connection"):  # set below, from the body and the connection's state
            continue
        seen.add(lower)
        lines.append(f"{name}: {value}")
    if resp.status not in (204, 304):  # aiohttp sends no Content-Length with these bodiless statuses
        lines.append(f"Content-Length: {len(body)}")
    if "date" not in seen:
        lines.append("Date: " + _Date.now().decode())
    if "server" not in seen:
        lines.append("Server: " + SERVER_SOFTWARE)
    if close:
        lines.append("Connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8") + bytes(body)


class FastReply:
    """The ReplySink (and drop_client identity) of one fast-path call."""

    __slots__ = ("close", "conn", "disp", "name", "t0")

    def __init__(self, conn: FastConnection, disp: Dispatcher, name: str, t0: float, close: bool) -> None:
        self.conn = conn
        self.disp = disp
        self.name = name
        self.t0 = t0
        self.close = close

    def forward(self, job: Job, buf: bytearray, status: int) -> None:
        self.conn.answered(self, job, status, buf, "")

    def refuse(self, job: Job, status: int, message: str) -> None:
        self.conn.answered(self, job, status, None, message)


class _Request:
    """A parsed head, waiting for its body: [body_start, end) of the buffer."""

    __slots__ = ("authorization", "body_start", "close", "end", "endpoint", "service")

    def __init__(self, service: str, endpoint: str, authorization: str | None, close: bool, body_start: int, end: int) -> None:
        self.service = service
        self.endpoint = endpoint
        self.authorization = authorization
        self.close = close
        self.body_start = body_start
        self.end = end


def parse_head(buf: bytearray, limit: int) -> _Request | bool | None:
    """The request at the start of ``buf``: a _Request, None if more bytes are needed, False if it is not ours."""
    n = len(buf)
    if n < len(_PREFIX):
        return None if _PREFIX.startswith(buf) else False
    if not buf.startswith(_PREFIX):
        return False
    head_end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
    if head_end < 0:
        if n >= MAX_HEAD + 4 or buf.count(b"\n") != buf.count(b"\r\n"):
            return False  # too long, or bare LF line ends: aiohttp's parser decides
        return None
    m = _HEAD.fullmatch(buf, 0, head_end + 4)
    if m is None:
        return False
    service, endpoint = m.group(1), m.group(2)
    if service in (b".", b"..") or endpoint in (b".", b".."):
        return False  # aiohttp normalises dot segments: its router answers these
    length: int | None = None
    authorization: str | None = None
    close = False
    for name, value in _FIELDS.findall(m.group(3)):
        name = name.lower()
        if name == b"content-length":
            if length is not None or _DIGITS.fullmatch(value) is None:
                return False
            length = int(value)
        elif name == b"authorization":
            if authorization is not None:
                return False
            authorization = value.decode("ascii")
        elif name == b"connection":
            for token in value.lower().split(b","):
                token = token.strip()
                if token == b"close":
                    close = True
                elif token not in (b"keep-alive", b""):
                    return False  # e.g. Upgrade
        else:  # transfer-encoding, expect, upgrade
            return False
    if length is None or length > limit:
        return False  # no length (aiohttp reads none), or above the limit: aiohttp answers 413 and closes
    body_start = head_end + 4
    return _Request(service.decode("ascii"), endpoint.decode("ascii"), authorization, close, body_start, body_start + length)


class FastConnection(asyncio.Protocol):
    """One connection of the HTTP door while it only carries endpoint calls; see the module docstring."""

    def __init__(self, door: HttpDoor) -> None:
        self.door = door
        self.loop = door.loop
        #: the supervisor channels' write batch: a call started here reaches its worker at once
        self.batch = batch_for(door.loop)
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.remote: str | None = None
        self.unix = False  # the connection came over a Unix socket (connection_made)
        self.buf = bytearray()
        self.request: _Request | None = None  # head parsed, body still arriving
        self.call: FastReply | None = None  # the call in flight
        self.processing = False
        self.read_paused = False
        self.write_paused = False
        self.last_active = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    # -- transport events -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self.sock = transport.get_extra_info("socket")
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, (tuple, list)) and peer else (str(peer) if peer else None)
        self.unix = on_unix(self.sock)
        if self.sock is not None and not self.unix:
            tcp_nodelay(transport, True)  # as aiohttp does: an answer is one write, never held back
        self.door.fast.add(self)
        self.last_active = self.loop.time()
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.call is not None:
            if len(self.buf) > PIPELINE_BYTES and not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        self.batch.run(self._process, eager=True)  # one call at a time: its CALL need not wait for company

    def eof_received(self) -> bool | None:
        return None  # a half-close is a hang-up, as in aiohttp: close (connection_lost drops the call)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.door.fast.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        call, self.call = self.call, None
        if call is not None:
            call.disp.drop_client(call)  # the caller hung up: a queued call never runs

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.call is None:
            self._process()

    def close(self) -> None:
        """Close now (daemon shutdown: every call is answered, its bytes are in the transport's buffer)."""
        if self.transport is not None:
            self.transport.close()

    # -- requests ----------------------------------------------------------------------------

    def _process(self) -> None:
        """Serve every complete request in the buffer, one at a time, while no call is in flight."""
        if self.processing:
            return  # re-entered from an answer given synchronously inside submit(): the loop below goes on
        self.processing = True
        try:
            while self.call is None and self.buf and self.transport is not None and not self.write_paused:
                req = self.request
                if req is None:
                    parsed = parse_head(self.buf, int(self.door.sup.config.daemon.max_message_bytes))
                    if parsed is None:
                        return
                    if parsed is False:
                        self._hand_off()
                        return
                    assert isinstance(parsed, _Request)
                    req = self.request = parsed
                if len(self.buf) < req.end:
                    return
                self.request = None
                self.last_active = self.loop.time()
                try:
                    self._start_call(req)
                except Exception as exc:
                    log.exception("http: internal error on POST /public/api/v1/%s/%s/run", req.service, req.endpoint)
                    self._send(self.door.internal_error(exc), True)
        finally:
            self.processing = False
        if self.read_paused and self.call is None and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def _start_call(self, req: _Request) -> None:
        t0 = self.loop.time()
        path = f"/public/api/v1/{req.service}/{req.endpoint}/run"
        route = self.door.route(req.service, req.endpoint, Caller(self.sock, self.remote, "POST", path, req.authorization, self.unix))
        if type(route) is not tuple:  # a refusal (web.Response: an ABC, so isinstance is slow)
            del self.buf[: req.end]
            self._send(route, req.close)
            return
        name, pool = route
        frame = bytearray(frames.HEADER_SIZE)
        frame += frames.pack_name(name)
        with memoryview(self.buf) as view:
            frame += view[req.body_start : req.end]
        del self.buf[: req.end]
        frames.seal(frame, Kind.ENDPOINT)
        disp = self.door.admit(name, pool)
        if not isinstance(disp, Dispatcher):  # a refusal
            self._send(disp, req.close)
            return
        sink = self.call = FastReply(self, disp, name, t0, req.close)
        self.door.submit(disp, name, frame, sink)

    def answered(self, sink: FastReply, job: Job, status: int, buf: bytearray | None, message: str) -> None:
        """The call's answer (called by the dispatcher, possibly inside submit): send it, then serve what waits."""
        if sink is not self.call or self.transport is None:
            return  # the connection went away meanwhile
        self.call = None
        self.last_active = self.loop.time()
        door = self.door
        try:
            timing = door.timing(job, sink.t0)
            if buf is not None and status == Status.OK:
                self._write(render_ok(memoryview(buf)[frames.HEADER_SIZE :], timing, sink.close), sink.close)
            else:
                self._send(door.other_answer(sink.name, status, buf, message, timing), sink.close)
        except Exception as exc:
            log.exception("http: internal error answering %s", sink.name)
            self._send(door.internal_error(exc), True)
        self._process()

    def _send(self, resp: web.Response, close: bool) -> None:
        close = close or resp.keep_alive is False  # HttpDoor.too_large() forces a close
        self._write(render(resp, close), close)

    def _write(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        if close:
            transport.close()  # after the buffered answer is written
            self.transport = None
            self.buf.clear()

    def _hand_off(self) -> None:
        """Give this connection, and the bytes not yet consumed, to aiohttp for the rest of its life."""
        transport = self.transport
        assert transport is not None and self.call is None
        self.transport = None
        self.door.fast.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        data, self.buf = bytes(self.buf), bytearray()
        self.request = None
        handler: Any = self.door.aiohttp_protocol()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)

    # -- keep-alive ---------------------------------------------------------------------------

    def _arm_idle(self, at: float | None = None) -> None:
        self.idle_timer = self.loop.call_at(self.last_active + KEEPALIVE_TIMEOUT if at is None else at, self._idle_check)

    def _idle_check(self) -> None:
        """One timer per connection, re-armed from the last activity: no timer work per request."""
        self.idle_timer = None
        if self.transport is None:
            return
        now = self.loop.time()
        if self.call is not None:  # a call may run longer than the keep-alive: look again later
            self._arm_idle(now + KEEPALIVE_TIMEOUT)
        elif now >= self.last_active + KEEPALIVE_TIMEOUT:
            self.transport.close()
        else:
            self._arm_idle()
