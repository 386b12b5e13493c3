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
Transfer-Encoding, Expect or Upgrade, visible-ASCII header values, a plain
path (no query, no percent-escape, no dot segment) and a head of at most ``MAX_HEAD``
bytes. Anything else (another route or method, HTTP/1.0, chunked or
oversized bodies, ``Expect: 100-continue``, odd syntax) hands the
connection, with every byte not yet consumed, to aiohttp's RequestHandler
for the rest of its life, so app.py's routes, limits and errors answer it
as before.

Parsing
    ``RequestReader`` frames a head (up to the first CRLF CRLF, at most
    MAX_HEAD bytes, so the bytes to hand over are known exactly) and checks it
    in one pass of a C regular expression (request line, header lines of a
    token name and a visible-ASCII value), then reads the few fields that
    matter from it.

Invariants:

* one request is in flight per connection: pipelined bytes wait in the
  buffer, so answers leave in request order;
* every answer comes from the steps in steps.py (``route``, ``admit``,
  ``submit``, ``answer``), as for aiohttp's handlers: the two paths cannot
  disagree on a status or a body; only the wire bytes are rendered here,
  with the headers aiohttp sends (Content-Length, Date, Server,
  ``Connection: close`` when closing);
* a hang-up (or a half-close, as with aiohttp) drops the caller's call
  (``Dispatcher.drop_client``): a queued call never runs;
* the buffer is bounded: a request's head by MAX_HEAD and its body by the
  message limit; while a call is in flight, reading pauses once
  ``PIPELINE_BYTES`` more have arrived, and no new call starts while the
  transport's write buffer is over its high-water mark.

This module imports steps.py, never app.py: app.py gives each connection the
steps, the set of open fast connections and the way to aiohttp.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_nodelay

from cruised.core.channel import batch_for
from cruised.doors.http.steps import KEEPALIVE_TIMEOUT, Caller, Refusal, Steps, internal_error, now, on_unix, timing
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.core.dispatch import Dispatcher, Job

# per-call comparisons against plain globals, not Enum class attributes (see pool/wire/frames.py)
_ENDPOINT, _OK = Kind.ENDPOINT, Status.OK

log = logging.getLogger("cruised.http")

#: a longer head goes to aiohttp (its own line and field limits are 8190 bytes)
MAX_HEAD = 8190
#: while a call runs, read at most this much of what the client sends next before pausing
PIPELINE_BYTES = 256 << 10
_PREFIX = b"POST /public/api/v1/"
_PREFIX_LEN = len(_PREFIX)
# RFC 3986 pchar without pct-encoded: what aiohttp's router would match unchanged
_SEGMENT = rb"([A-Za-z0-9._~!$&'()*+,;=:@-]+)"
_DOT_SEGMENTS = (b".", b"..")
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
    Steps.answer's Response (steps.ok_body, steps.server_timing), in one format
    with each timing figure formatted once."""
    q, e, t = b"%.3f" % timing[0], b"%.3f" % timing[1], b"%.3f" % timing[2]
    return (
        b"HTTP/1.1 200 OK\r\nServer-Timing: queue;dur=%b, exec;dur=%b, total;dur=%b\r\nContent-Type: application/json\r\n"
        b'Content-Length: %d\r\nDate: %b\r\nServer: %b\r\n%b\r\n{"response":%b,"timing":{"queue_ms":%b,"exec_ms":%b,"total_ms":%b}}'
    ) % (  # type: ignore[str-format]  # %b takes any buffer (here a memoryview of the reply), not only bytes
        q, e, t,
        len(payload) + _OK_BODY_FIXED + len(q) + len(e) + len(t),
        _Date.now(),
        _SERVER,
        b"Connection: close\r\n" if close else b"",
        payload, q, e, t,
    )  # fmt: skip


def render(resp: web.Response, close: bool) -> bytes:
    """Any of the steps' answers as aiohttp would put it on the wire (its headers, then Content-Length, Date, Server)."""
    body = resp.body
    assert isinstance(body, (bytes, bytearray)), "the door's answers are built from bytes"
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


# -- requests ---------------------------------------------------------------------------------


class HandOff(Exception):
    """The request at the start of the buffer is not a plain endpoint call: aiohttp serves the connection from it on."""


class Request:
    """A parsed head, waiting for its body: [body_start, end) of the buffer."""

    __slots__ = ("authorization", "body_start", "close", "end", "endpoint", "service")

    def __init__(self, service: str, endpoint: str, authorization: str | None, close: bool, body_start: int, end: int) -> None:
        self.service = service
        self.endpoint = endpoint
        self.authorization = authorization
        self.close = close
        self.body_start = body_start
        self.end = end


# The whole head in one pass (C regex engine, no per-line Python): the request line, then
# header lines of a token name and visible-ASCII/tab value (no obs-fold, no bare CR or LF).
_HEAD = re.compile(
    rb"POST /public/api/v1/" + _SEGMENT + rb"/" + _SEGMENT + rb"/run HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n)*)\r\n"
)
#: the header lines the fast path acts on, found in the validated header block
_HEADER_FIELDS = re.compile(rb"(?im)^(content-length|authorization|connection|transfer-encoding|expect|upgrade):[ \t]*([^\r]*?)[ \t]*\r$")
_DIGITS = re.compile(rb"[0-9]{1,19}")


class RequestReader:
    """The requests of one connection; see the module docstring's "Parsing".

    ``head(buf)`` reads the request at the start of ``buf`` up to its body;
    ``finish(buf, req)`` is called once its body is there too.
    """

    __slots__ = ()

    def head(self, buf: bytearray, limit: int) -> Request | None:
        """The request at the start of ``buf``, None if more bytes are needed; HandOff if it is not ours."""
        n = len(buf)
        if n < _PREFIX_LEN:
            if _PREFIX.startswith(buf):
                return None
            raise HandOff
        if not buf.startswith(_PREFIX):
            raise HandOff  # another method or route, leading blank lines, TLS, ...: aiohttp's
        head_end = buf.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if head_end < 0:
            if n >= MAX_HEAD + 4 or buf.count(b"\n") != buf.count(b"\r\n"):
                raise HandOff  # too long, or bare LF line ends: aiohttp's parser decides
            return None
        m = _HEAD.fullmatch(buf, 0, head_end + 4)
        if m is None:
            raise HandOff
        service, endpoint = m.group(1), m.group(2)
        if service in _DOT_SEGMENTS or endpoint in _DOT_SEGMENTS:
            raise HandOff  # aiohttp normalises dot segments: its router answers these
        length: int | None = None
        authorization: str | None = None
        close = False
        for name, value in _HEADER_FIELDS.findall(m.group(3)):
            name = name.lower()
            if name == b"content-length":
                if length is not None or _DIGITS.fullmatch(value) is None:
                    raise HandOff
                length = int(value)
            elif name == b"authorization":
                if authorization is not None:
                    raise HandOff
                authorization = value.decode("ascii")
            elif name == b"connection":
                for token in value.lower().split(b","):
                    token = token.strip()
                    if token == b"close":
                        close = True
                    elif token not in (b"keep-alive", b""):
                        raise HandOff  # e.g. Upgrade
            else:  # transfer-encoding, expect, upgrade
                raise HandOff
        if length is None or length > limit:
            raise HandOff  # no length (aiohttp reads no body), or above the limit: aiohttp answers 413 and closes
        body_start = head_end + 4
        return Request(service.decode("ascii"), endpoint.decode("ascii"), authorization, close, body_start, body_start + length)

    def finish(self, buf: bytearray, req: Request) -> None:
        """``req``'s body is in ``buf``: nothing to do, each head is matched on its own."""


# -- the connection ---------------------------------------------------------------------------


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


class FastConnection(asyncio.Protocol):
    """One connection of the HTTP door while it only carries endpoint calls; see the module docstring.

    ``open_connections``: the door's set of fast connections (this one is in it
    while it is open and not handed off); ``to_aiohttp``: a fresh aiohttp
    protocol for a hand-off.
    """

    def __init__(self, steps: Steps, open_connections: set[FastConnection], to_aiohttp: Callable[[], asyncio.Protocol]) -> None:
        self.steps = steps
        self.open_connections = open_connections
        self.to_aiohttp = to_aiohttp
        self.loop = steps.host.loop
        #: the supervisor channels' write batch: a call started here reaches its worker at once
        self.batch = batch_for(self.loop)
        self.reader = RequestReader()
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.remote: str | None = None
        self.unix = False  # the connection came over a Unix socket (connection_made)
        self.buf = bytearray()
        self.request: Request | None = None  # head parsed, body still arriving
        self.call: FastReply | None = None  # the call in flight
        self.processing = False
        self.read_paused = False
        self.write_paused = False
        #: loop time (a timer's clock, not shown to anyone) of the last request or answer
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
        self.open_connections.add(self)
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
        self.open_connections.discard(self)
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
                    try:
                        req = self.reader.head(self.buf, self.steps.max_body())
                    except HandOff:
                        self._hand_off()
                        return
                    if req is None:
                        return
                    self.request = req
                if len(self.buf) < req.end:
                    return
                self.request = None
                self.last_active = self.loop.time()
                try:
                    self._start_call(req)
                except Exception as exc:
                    log.exception("http: internal error on POST /public/api/v1/%s/%s/run", req.service, req.endpoint)
                    self._send(internal_error(exc), True)
        finally:
            self.processing = False
        if self.read_paused and self.call is None and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def _start_call(self, req: Request) -> None:
        t0 = now()
        steps = self.steps
        self.reader.finish(self.buf, req)
        try:
            path = f"/public/api/v1/{req.service}/{req.endpoint}/run"
            name, pool = steps.route(req.service, req.endpoint, Caller(self.sock, self.remote, "POST", path, req.authorization, self.unix))
        except Refusal as refusal:
            del self.buf[: req.end]
            self._send(refusal.response, req.close)
            return
        frame = bytearray(frames.HEADER_SIZE)
        frame += frames.pack_name(name)
        with memoryview(self.buf) as view:
            frame += view[req.body_start : req.end]
        del self.buf[: req.end]
        frames.seal(frame, _ENDPOINT)
        try:
            disp = steps.admit(name, pool)
        except Refusal as refusal:
            self._send(refusal.response, req.close)
            return
        sink = self.call = FastReply(self, disp, name, t0, req.close)
        steps.submit(disp, name, frame, sink)

    def answered(self, sink: FastReply, job: Job, status: int, buf: bytearray | None, message: str) -> None:
        """The call's answer (called by the dispatcher, possibly inside submit): send it, then serve what waits."""
        if sink is not self.call or self.transport is None:
            return  # the connection went away meanwhile
        self.call = None
        self.last_active = self.loop.time()
        try:
            figures = timing(job, sink.t0)
            if buf is not None and status == _OK:
                self._write(render_ok(memoryview(buf)[frames.HEADER_SIZE :], figures, sink.close), sink.close)
            else:
                self._send(self.steps.other_answer(sink.name, status, buf, message, figures), sink.close)
        except Exception as exc:
            log.exception("http: internal error answering %s", sink.name)
            self._send(internal_error(exc), True)
        self._process()

    def _send(self, resp: web.Response, close: bool) -> None:
        close = close or resp.keep_alive is False  # Steps.too_large() forces a close
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
        self.open_connections.discard(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        data, self.buf = bytes(self.buf), bytearray()
        self.request = None
        handler: Any = self.to_aiohttp()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if data:
            handler.data_received(data)

    # -- keep-alive (timers only: on the loop's clock) ------------------------------------------

    def _arm_idle(self, at: float | None = None) -> None:
        self.idle_timer = self.loop.call_at(self.last_active + KEEPALIVE_TIMEOUT if at is None else at, self._idle_check)

    def _idle_check(self) -> None:
        """One timer per connection, re-armed from the last activity: no timer work per request."""
        self.idle_timer = None
        if self.transport is None:
            return
        t = self.loop.time()
        if self.call is not None:  # a call may run longer than the keep-alive: look again later
            self._arm_idle(t + KEEPALIVE_TIMEOUT)
        elif t >= self.last_active + KEEPALIVE_TIMEOUT:
            self.transport.close()
        else:
            self._arm_idle()
