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
Transfer-Encoding, Expect or Upgrade, ASCII header values, a plain path (no
query, no percent-escape, no dot segment) and a head of at most ``MAX_HEAD``
bytes. Anything else (another route or method, HTTP/1.0, chunked or
oversized bodies, ``Expect: 100-continue``, odd syntax) hands the
connection, with every byte not yet consumed, to aiohttp's RequestHandler
for the rest of its life, so app.py's routes, limits and errors answer it
as before.

Parsing
    The syntax is llhttp's (through httptools, as uvicorn uses it): the
    request line, header names and values, Content-Length (digits, no
    duplicate, no overflow, not with Transfer-Encoding) and obs-fold are
    checked by the parser Node.js uses, not by our own regular expressions.
    What is ours to decide stays here (``RequestReader``): the framing of a
    head (up to the first CRLF CRLF, at most MAX_HEAD bytes, so the bytes to
    hand over are known exactly), the route, and which headers send a request
    to aiohttp. One parser per connection sees every byte of every request
    it serves, so it is always at a message boundary when the next head is
    fed. Cost against the hand-written regular expressions it replaced: the
    reader alone (head + finish), counted by callgrind (instructions, immune
    to the shared VM's noise), 31.1k instructions per request with llhttp
    against 32.5k with the expressions for the benchmark's request, 35.6k
    against 39.1k for curl's (two more headers). End to end, bench.hotpath
    --http in 5 interleaved rounds (load average 4.5-6.5, ±40% from run to
    run): supervisor CPU per request median 180 µs (llhttp) vs 178 µs
    (expressions), within the noise. Nowhere near the 10% in the expressions'
    favour that would have kept them.

Invariants:

* one request is in flight per connection: pipelined bytes wait in the
  buffer, so answers leave in request order;
* every answer comes from the steps in steps.py (``route``, ``admit``,
  ``submit``, ``answer``), as for aiohttp's handlers: the two paths cannot
  disagree on a status or a body; only the wire bytes are rendered here,
  with the headers aiohttp sends (Content-Length, Date, Server,
  ``Connection: close`` when closing);
* a hang-up (or a half-close, as with aiohttp) drops the caller's call
  (``Dispatcher.drop_client``): a queued call never runs, a running one is
  interrupted (``on_disconnect: cancel``) or finishes unanswered (``finish``);
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

import httptools
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_nodelay

from cruised.core.channel import batch_for
from cruised.doors.http.steps import KEEPALIVE_TIMEOUT, Caller, Refusal, Steps, internal_error, now, on_unix, timing
from cruised.doors.sockets import peer_caller
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status

if TYPE_CHECKING:
    from cruised.core.dispatch import Dispatcher, Job


log = logging.getLogger("cruised.http")

#: a longer head goes to aiohttp (its own line and field limits are 8190 bytes)
MAX_HEAD = 8190
#: while a call runs, read at most this much of what the client sends next before pausing
PIPELINE_BYTES = 256 << 10
_PREFIX = b"POST /public/api/v1/"
_PREFIX_LEN = len(_PREFIX)
_METHOD_LEN = len(b"POST ")
_HTTP11 = b" HTTP/1.1\r\n"
#: bodies up to this size are copied to be fed to the parser (cheaper than a memoryview); larger ones are read in place
_COPY_BODY = 16 << 10
# RFC 3986 pchar without pct-encoded: what aiohttp's router would match unchanged (llhttp has
# already checked the URL's syntax; this says whether it is an endpoint call)
_SEGMENT = rb"([A-Za-z0-9._~!$&'()*+,;=:@-]+)"
_RUN_URL = re.compile(rb"/public/api/v1/" + _SEGMENT + rb"/" + _SEGMENT + rb"/run")
_DOT_SEGMENTS = (b".", b"..")
_SERVER = SERVER_SOFTWARE.encode()

# what on_header does with a field, by lower-case name; others are only checked to be ASCII
_CONTENT_LENGTH, _AUTHORIZATION, _CONNECTION, _NOT_OURS = 1, 2, 3, 4
_FIELDS = {b"content-length": _CONTENT_LENGTH, b"authorization": _AUTHORIZATION, b"connection": _CONNECTION}
_FIELDS.update(dict.fromkeys((b"transfer-encoding", b"expect", b"upgrade"), _NOT_OURS))


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


class RequestReader:
    """The requests of one connection, read with llhttp; see the module docstring's "Parsing".

    ``head(buf)`` reads the request at the start of ``buf`` up to its body;
    ``finish(buf, req)`` gives llhttp that request's body too, so the parser
    is at the next request's start. The fields below are the head being read,
    filled by llhttp's callbacks (``on_*``) during ``head``.
    """

    __slots__ = ("_parser", "authorization", "close", "complete", "headers_done", "length", "odd", "url")

    def __init__(self) -> None:
        self.url = b""
        self.length: int | None = None
        self.authorization: str | None = None
        self.close = False
        #: something in the head sends the request to aiohttp
        self.odd = False
        self.headers_done = False
        #: llhttp saw the end of the message (after the head, or after the body)
        self.complete = False
        self._parser = httptools.HttpRequestParser(self)

    def _reset(self) -> None:
        """Forget the last request's fields; llhttp's callbacks fill them in again during feed_data()."""
        self.url = b""
        self.length = self.authorization = None
        self.close = self.odd = self.headers_done = self.complete = False

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
        body_start = head_end + 4
        self._reset()
        try:
            # the whole head in one call: llhttp stops at its end, waiting for the body. CRLF line
            # ends are strict in llhttp, so the first CRLF CRLF is where it ends the head too.
            self._parser.feed_data(buf[:body_start])
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            raise HandOff from None  # aiohttp answers it (400, or its own reading of the request)
        length = self.length
        if self.odd or not self.headers_done or length is None or length > limit:
            raise HandOff  # no length (aiohttp reads no body), or above the limit: aiohttp answers 413 and closes
        url = self.url
        # llhttp has checked the request line: "POST", one space, the URL, one space, HTTP/<digit>.<digit>
        # and CRLF; HTTP/1.1 is ours (HTTP/1.0 and the rest are aiohttp's). Read from the bytes, not
        # with get_http_version(), which formats a string per call.
        if not buf.startswith(_HTTP11, _METHOD_LEN + len(url)):
            raise HandOff
        m = _RUN_URL.fullmatch(url)
        if m is None:
            raise HandOff
        service, endpoint = m.group(1), m.group(2)
        if service in _DOT_SEGMENTS or endpoint in _DOT_SEGMENTS:
            raise HandOff  # aiohttp normalises dot segments: its router answers these
        return Request(service.decode("ascii"), endpoint.decode("ascii"), self.authorization, self.close, body_start, body_start + length)

    def finish(self, buf: bytearray, req: Request) -> None:
        """Feed ``req``'s body (in ``buf``) to llhttp: the message ends there, and the next one starts."""
        start, end = req.body_start, req.end
        if end - start > _COPY_BODY:
            with memoryview(buf) as view:
                self._parser.feed_data(view[start:end])  # read in place (no on_body callback: llhttp only counts it)
        elif end > start:
            self._parser.feed_data(buf[start:end])
        if not self.complete:  # llhttp checked the same Content-Length: cannot happen
            raise RuntimeError("the HTTP parser did not end the request where its Content-Length does")

    # -- llhttp's callbacks (httptools calls them during feed_data) ------------------------

    def on_url(self, url: bytes) -> None:
        self.url += url  # one piece: the whole head is fed at once

    def on_header(self, name: bytes, value: bytes) -> None:
        if not value.isascii():
            self.odd = True  # obs-text: how to decode it is aiohttp's call
            return
        what = _FIELDS.get(name.lower())
        if what is None:
            return
        if what == _CONTENT_LENGTH:
            if self.length is not None:  # llhttp refuses a second one already
                self.odd = True
            self.length = int(value)  # digits, checked by llhttp (trailing blanks allowed by int)
        elif what == _AUTHORIZATION:
            if self.authorization is not None:
                self.odd = True
            self.authorization = value.strip(b" \t").decode("ascii")
        elif what == _CONNECTION:
            for token in value.lower().split(b","):
                token = token.strip(b" \t")
                if token == b"close":
                    self.close = True
                elif token not in (b"keep-alive", b""):
                    self.odd = True  # e.g. Upgrade
        else:  # transfer-encoding, expect, upgrade
            self.odd = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_message_complete(self) -> None:
        self.complete = True


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
        self.peer: str | None = None  # over a Unix socket: who the peer is (Caller.peer), asked once
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
        if self.unix:
            self.peer = peer_caller(self.sock)
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
            call.disp.drop_client(call)  # the caller hung up: a queued call never runs, a running one is cancelled (on_disconnect)

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
            name, pool, who = steps.route(req.service, req.endpoint, Caller(self.sock, self.remote, "POST", path, req.authorization, self.unix, self.peer))
        except Refusal as refusal:
            del self.buf[: req.end]
            self._send(refusal.response, req.close)
            return
        frame = bytearray(frames.HEADER_SIZE)
        frame += frames.pack_name(name)
        with memoryview(self.buf) as view:
            frame += view[req.body_start : req.end]
        del self.buf[: req.end]
        frames.seal(frame, Kind.ENDPOINT)
        try:
            disp = steps.admit(name, pool)
        except Refusal as refusal:
            self._send(refusal.response, req.close)
            return
        sink = self.call = FastReply(self, disp, name, t0, req.close)
        steps.submit(disp, name, frame, sink, who)

    def answered(self, sink: FastReply, job: Job, status: int, buf: bytearray | None, message: str) -> None:
        """The call's answer (called by the dispatcher, possibly inside submit): send it, then serve what waits."""
        if sink is not self.call or self.transport is None:
            return  # the connection went away meanwhile
        self.call = None
        self.last_active = self.loop.time()
        try:
            figures = timing(job, sink.t0)
            if buf is not None and status == Status.OK:
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
