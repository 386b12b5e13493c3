"""The cruised wire format: one frame layout for every private channel.

This module is the single place the native protocol is documented. The same
frames travel client <-> supervisor (Unix socket) and supervisor <-> worker
(a socketpair per worker), so the supervisor forwards a call by patching the
request id in place and handing the very same buffer to the worker: payloads
are never decoded or copied on the way through.

Frame layout (all integers little-endian)::

    0      4        5       6         8                16
    +------+--------+-------+---------+-----------------+-----------------+
    | size | version| kind  | status  | request id      | payload ...     |
    | u32  | u8 = 1 | u8    | u16     | u64             | size - 12 bytes |
    +------+--------+-------+---------+-----------------+-----------------+

``size`` counts the bytes after itself (header rest + payload). A frame larger
than the receiver's limit (``daemon.max_message_bytes``) is refused with a
BAD_REQUEST reply and the connection is closed. An unknown version is refused
the same way. Request ids are chosen by the sender and echoed in the reply;
replies may come back in any order (pipelining).

Kinds and payloads (``Kind``; "sup" is the supervisor, "wkr" a worker):

=============  ===============================================================
kind           direction: payload
=============  ===============================================================
CALL (1)       client -> sup -> wkr: call head + args bundle (see below)
REGISTER (2)   client -> sup: register head + code blob; reply empty
CHECK (3)      client -> sup -> wkr: pool name (u8 len + utf-8) + JSON
               ``{"libraries": {alias: module}}``; reply empty, or ERROR if
               one does not import
STATUS (4)     client -> sup: empty; reply is JSON (``cruised status``)
PING (5)       client -> sup: empty; reply is empty
RELOAD (6)     client -> sup: empty; the daemon re-reads its config and
               endpoint code (as on SIGHUP) and replies once that is done:
               JSON ``{"ok": bool, "message": str}``, status OK, or
               BAD_REQUEST when it failed
METRICS (7)    client -> sup: empty; reply is the Prometheus text exposition
               (the same bytes as ``GET /metrics``)
PASS_FDS (8)   client -> sup: empty; reply: ``u32`` feature bits
               (``FEATURES``; an empty reply, from an older daemon, means
               none). From the reply on, CALLs on this connection may carry a
               shared file (see "Shared file" below); the daemon reads a
               connection with recvmsg only after this
CANCEL (9)     client -> sup: empty; ``reqid`` names an earlier CALL of this
               connection to withdraw. The CANCEL itself gets no reply: the
               call gets its one reply as ever, CANCELLED if the cancel took
               effect (queued or held: at once, and it never runs; running:
               its worker is sent SIGINT, and the reply comes when the
               function stops, or after ``pools.<name>.cancel_grace`` when
               the worker is killed), or its own result if it had already
               finished. A CANCEL naming no outstanding call is ignored
DRAIN (10)     client -> sup: JSON ``{"drain": true|false}`` starts or ends
               a drain (``cruised drain`` / ``cruised ready``), ``{}`` or
               empty only asks; ``"linger": s`` with ``true`` keeps taking
               new calls s seconds more; reply JSON ``{"draining": bool,
               "state": "serving"|"draining"|"drained", "queued": n,
               "running": n, "accepting": bool}`` (calls still queued or
               running in every pool, retiring ones included). While
               draining (after the linger), every door refuses new calls
               (DRAINING); queued and running ones finish
CREDIT (11)    client -> sup, a request: pool name (u8 len + utf-8) + ``u32
               want`` (1: open flow control on that pool, 0: close it);
               reply: ``u32`` credit granted now (0 after a close).
               sup -> client, unsolicited, reqid 0, only to a connection
               that opened flow control: pool name + ``u32`` more credit.
               Each credit lets the client send one CALL flagged
               ``CREDITED`` that is never refused QUEUE_FULL: its place in
               the queue was reserved (daemon/core/fairness.py "Credit").
               The daemon grants more as calls leave the queue; credit not
               spent when the client closes (or disconnects) is released.
               An older client ignores a reqid-0 frame with status OK
DEFINE (16)    sup -> wkr: the REGISTER payload, unchanged (kind patched,
               reqid 0), ahead of the first CALL of that function a worker
               gets
ENDPOINT (17)  door -> sup -> wkr: endpoint name ``service/endpoint`` (u8 len
               + utf-8), then the request's JSON body bytes, unchanged (see
               "Endpoint calls" below)
SETUP (18)     sup -> wkr: JSON ``{"endpoints": {"svc/ep": {"code": path,
               "function": name, "folders": [paths]}}}``: the first frame on a
               new worker's channel when its spawn spec says ``"setup": true``
               (endpoint specs can outgrow the template's spawn message, so
               they travel here)
QCALL (19)     q door -> sup -> wkr: ``u16 len + JSON head`` (padded with
               spaces), then one kdb+ IPC message holding the call's
               arguments; the reply's payload is ``u32 len + JSON info`` then
               the IPC message the q client gets (pool/qcall.py documents
               both)
HELD (20)      sup -> wkr: ``i64`` CLOCK_MONOTONIC deadline in ns; reqid names
               the call frame that follows it. The call was handed to a busy
               worker to wait behind its running one (prefetch, see
               daemon/core/dispatch.py): the worker starts it only if the
               deadline has not passed, else replies NOT_RUN without touching
               it
READY (32)     wkr -> sup, reqid 0, its first frame once preloaded: JSON
               ``{"pid": ..., "python": "3.11", "worker": id, "endpoints":
               {"svc/ep": {"ok": true} | {"ok": false, "error": ...,
               "traceback": ...}}, "q_arity": {"svc/ep": how q may call it
               (pool/qcall.py positional_range)}}``, + ``"q": {"connected":
               bool, "error": str|null}`` in a pool with a q connection
STATE (33)     wkr -> sup: JSON ``{"q": {"connected": bool, "error": ...}}``,
               unsolicited, only when the q state changes; reqid 0, may arrive
               between any two frames
REPLY (64)     every reply: ``status`` says how to read the payload
=============  ===============================================================

Call head: ``u8 len + pool name, u32 timeout_ms (0 = pool default), 16-byte
function key``, then the args bundle. Register head: ``u8 len + pool name,
16-byte key, u16 len + JSON meta ({"python": "3.11", "libraries": {...},
"name": ...})``, then the cloudpickle blob of the function. The q door defines
pykx.remote functions with the same DEFINE frame: meta ``{"source": true,
"name": ..., "libraries": {...}}`` and the source text the client sent
instead of a cloudpickle blob (pool/qcall.py ``load_source``).

A *bundle* is a pickle (protocol 5) with its out-of-band buffers, so numpy
arrays cross without extra copies: ``u16 nbuf, u64 length x (nbuf + 1)``, then
the pickle bytes, then each buffer.

Credited call: a CALL whose ``status`` has ``CREDITED`` set spends one credit
(see CREDIT above); one sent without credit left is admitted like any other.

Shared file: a CALL whose ``status`` has ``CARRIES_FD`` set comes with one
file descriptor, the call's shared file (pool/wire/sharedfile.py). Its args
bundle, and the result bundle in the worker's OK reply, may flag buffers as
in that file instead of in the frame. From a client, the descriptor comes
with the CALL (``SCM_RIGHTS``, sent no later than the frame's first byte;
the daemon keeps received descriptors in arrival order and gives the next
one to each flagged CALL), and only after PASS_FDS was answered. To a
worker, the supervisor sends it on the worker's descriptor socket just
before the CALL (daemon/core/launcher.py). The supervisor never reads the file.
A client may pass a file with a call whose arguments are small, for a
result it expects to be large. With the ``FILE_PICKLE`` feature a large
pickle stream travels in the file too: a client's arguments whenever the
daemon announced it, a worker's result when the CALL is flagged
``PICKLE_IN_FILE`` (so an older client never gets one it cannot read).

REPLY status (``Status``; in a CALL the ``status`` field carries the flags
above instead). A refusal's payload is JSON ``{"message": ...}``:

=========================  ===================================================
status                     sent by, and payload
=========================  ===================================================
OK (0)                     a worker: the CALL's result bundle, empty for
                           CHECK; the daemon: empty (REGISTER, PING), JSON
                           (STATUS, RELOAD), text (METRICS), feature bits
                           (PASS_FDS)
ERROR (1)                  a worker, the function raised: ``u32 len + JSON
                           {type, module, message, traceback}`` then the
                           pickled exception, possibly empty
QUEUE_FULL (2)             the daemon, a refusal: the pool's queue was full
                           (never ran); with reqid 0 before it closes a
                           connection over ``daemon.max_connections``
QUEUE_TIMEOUT (3)          the daemon, a refusal: queue_timeout passed (never
                           ran)
EXEC_TIMEOUT (4)           the daemon, a refusal: the call ran past its
                           timeout and its worker was killed
WORKER_CRASHED (5)         the daemon, a refusal: the worker died during the
                           call
UNKNOWN_FUNCTION (6)       the daemon or a worker, a refusal: the function's
                           key is not registered (the daemon restarted, or
                           lost the code): register again, then retry
BAD_REQUEST (7)            the daemon, a refusal: a malformed request, or a
                           frame error (reqid of the bad frame, then the
                           connection closes); a failed RELOAD's JSON. A
                           worker: a kind it does not know, a refusal; an
                           ENDPOINT's body (below)
SHUTTING_DOWN (8)          the daemon, a refusal: it is stopping (never ran)
NO_SUCH_POOL (9)           the daemon, a refusal: the request names no
                           configured pool
INTERNAL (10)              never sent: the client's status for a call whose
                           connection was lost
PRELOAD_FAILED (11)        a worker to the supervisor, reqid 0, as ERROR: its
                           preload (libraries, init file) failed; it exits
                           with code 3
VERSION_MISMATCH (12)      the daemon, a refusal of a REGISTER: the client's
                           Python minor version is not the pool's
ACCESS_DENIED (13)         the daemon, a refusal with reqid 0, then it closes
                           the connection: the peer's uid/gid is not allowed
Q_UNAVAILABLE (14)         a worker: the function failed because its q
                           connection is down or broke: JSON ``{"message":
                           ..., "type": "QConnectionError"}``
BAD_ARGUMENTS (15)         a worker, for an ENDPOINT (below)
ENDPOINT_UNAVAILABLE (16)  a worker, for an ENDPOINT (below)
CUSTOM_RESPONSE (17)       a worker, for an ENDPOINT (below)
API_ERROR (18)             a worker, for an ENDPOINT (below)
NOT_RUN (19)               a worker to the supervisor, empty: a HELD call's
                           deadline had passed, or the call was cancelled
                           before it started (pool/interrupt.py), so it did
                           not start; the client gets QUEUE_TIMEOUT (or the
                           CANCELLED it already got)
CANCELLED (20)             the daemon or a worker: the call was cancelled
                           (Kind.CANCEL, or its client left with
                           ``on_disconnect: cancel``), JSON ``{"message"}``
                           saying whether it ran: withdrawn before it started,
                           interrupted (the function saw KeyboardInterrupt;
                           whatever it returned or raised after that is not
                           sent), or its worker killed after cancel_grace
DRAINING (21)              the daemon, a refusal: it is draining (``cruised
                           drain``; never ran): send the call to another
                           daemon, or retry after ``cruised ready``
=========================  ===================================================

Endpoint calls
    The HTTP door builds the ENDPOINT frame around the body bytes it received
    and never parses them; the worker decodes the JSON, binds the function's
    parameters, runs it and converts the result (pool/jsonify.py), so neither
    side of the supervisor ever unpickles anything for an endpoint. Replies
    (besides the daemon's refusals above, which the door turns into HTTP
    errors):

    ====================  ===================================================
    status                payload
    ====================  ===================================================
    OK                    the result as UTF-8 JSON (the ``response`` value)
    CUSTOM_RESPONSE       ``u32 len + JSON {"status": int, "headers": [[name,
                          value], ...]}`` then the body bytes
    API_ERROR             JSON ``{"http_status", "errorType", "message",
                          "detailedMessage"}``: the function raised an error
                          that carries its own HTTP status (pool/api.py)
    ERROR                 as for CALL, with ``errorType`` added to the JSON
                          (``FunctionError``, ``ResultNotSerializable``,
                          ``ResultTooLarge``, ``InvalidCustomResponse``) and
                          no pickled exception
    Q_UNAVAILABLE         as for CALL: the function failed for lack of q
    BAD_REQUEST           JSON ``{"message"}``: the body is not a JSON object
    BAD_ARGUMENTS         JSON ``{"message", "missing": [...], "unexpected":
                          [...]}``: it does not fit the function's parameters
    ENDPOINT_UNAVAILABLE  JSON ``{"message", "traceback"}``: the endpoint's
                          code failed to load in this worker, or it is not
                          configured in the worker's pool
    ====================  ===================================================
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final

VERSION: Final = 1

HEADER = struct.Struct("<IBBHQ")
HEADER_SIZE: Final = HEADER.size  # 16
SIZE_FIELD: Final = 4
#: offset of the request id inside a frame; patched in place when forwarding
REQID_OFFSET: Final = 8
REQID = struct.Struct("<Q")
KIND_OFFSET: Final = 5
STATUS_OFFSET: Final = 6  # u16, little-endian


class Constants:
    """A set of named int constants, read as the attributes of its one instance (``Kind.CALL``).

    The values are plain ints, what the wire carries; ``name(value)`` gives a value's name for
    messages and logs (``Status.name(2) == "QUEUE_FULL"``), and iterating gives the values in
    the order they are defined. A subclass lists its constants as upper-case class attributes;
    ``Kind``, ``Status`` (and the supervisor's ``WorkerState``) are its instances.

    Why an instance: the hot paths of three processes read these for every frame, and the
    supervisor's dispatcher reads worker states about fifteen times a call. Under Python 3.11
    (callgrind, instructions per read beyond a literal's): a module global 18, an attribute
    of this instance 47 to 67 (LOAD_ATTR_INSTANCE_VALUE: __init__ copies the constants into
    its __dict__), a plain class attribute 187 (3.11 does not specialise attribute reads on
    classes), an Enum member 978 (EnumType's __getattr__ hook). So no module keeps aliases
    of them for speed.
    """

    def __init__(self) -> None:
        names: dict[int, str] = {}
        for key, value in vars(type(self)).items():
            if key.isupper() and not key.startswith("_") and type(value) is int:
                if value in names:
                    raise ValueError(f"{type(self).__name__}: {key} and {names[value]} are both {value}")
                names[value] = key
                setattr(self, key, value)  # an instance attribute: see the class docstring
        self._names = names

    def name(self, value: int) -> str:
        """The constant's name; a value that is none of them (a peer's unknown kind) as its digits."""
        return self._names.get(value, str(value))

    def __iter__(self) -> Iterator[int]:
        return iter(self._names)

    def __repr__(self) -> str:
        return f"<{type(self).__name__.lstrip('_')} {', '.join(f'{n}={v}' for v, n in self._names.items())}>"


class _Kind(Constants):
    """A frame's ``kind`` (the table in this module's docstring)."""

    CALL: Final = 1
    REGISTER: Final = 2
    CHECK: Final = 3
    STATUS: Final = 4
    PING: Final = 5
    RELOAD: Final = 6
    METRICS: Final = 7
    PASS_FDS: Final = 8
    CANCEL: Final = 9
    DRAIN: Final = 10
    CREDIT: Final = 11
    DEFINE: Final = 16
    ENDPOINT: Final = 17
    SETUP: Final = 18
    QCALL: Final = 19
    HELD: Final = 20
    READY: Final = 32
    STATE: Final = 33
    REPLY: Final = 64


class _Status(Constants):
    """A frame's ``status``: a REPLY's outcome (the low byte; a CALL's high bits are flags)."""

    OK: Final = 0
    ERROR: Final = 1  # the user's code raised
    QUEUE_FULL: Final = 2
    QUEUE_TIMEOUT: Final = 3
    EXEC_TIMEOUT: Final = 4
    WORKER_CRASHED: Final = 5
    UNKNOWN_FUNCTION: Final = 6  # the daemon lost the code (restart): register again
    BAD_REQUEST: Final = 7
    SHUTTING_DOWN: Final = 8
    NO_SUCH_POOL: Final = 9
    INTERNAL: Final = 10
    PRELOAD_FAILED: Final = 11  # worker -> supervisor only
    VERSION_MISMATCH: Final = 12
    ACCESS_DENIED: Final = 13
    Q_UNAVAILABLE: Final = 14
    BAD_ARGUMENTS: Final = 15  # endpoint: the JSON object does not fit the function's parameters
    ENDPOINT_UNAVAILABLE: Final = 16  # endpoint: its code failed to load
    CUSTOM_RESPONSE: Final = 17  # endpoint: the function returned its own HTTP response
    API_ERROR: Final = 18  # endpoint: the function raised an error carrying an HTTP status
    NOT_RUN: Final = 19  # worker -> supervisor: a HELD call's queue deadline passed (or it was cancelled) before it could start
    CANCELLED: Final = 20  # the call was cancelled by its client (Kind.CANCEL) or its client's departure
    DRAINING: Final = 21  # the daemon is draining (cruised drain): new calls are refused, running ones finish


Kind: Final = _Kind()
Status: Final = _Status()

#: in a CALL's ``status``: a file descriptor (the call's shared file) comes with the frame
CARRIES_FD: Final = 0x8000
#: in a CALL's ``status``: the client reads a result's pickle stream from the shared file, when
#: the worker puts it there (it is large); set only after PASS_FDS announced ``FILE_PICKLE``
PICKLE_IN_FILE: Final = 0x4000
#: in a CALL's ``status``: the call spends one of the connection's credits (Kind.CREDIT)
CREDITED: Final = 0x2000
#: a CREDIT frame's count (after the pool's name): the request's want, the answer's and a grant's credit
CREDIT_COUNT = struct.Struct("<I")
#: the PASS_FDS answer's payload: a u32 of feature bits (an empty payload: none)
FEATURES = struct.Struct("<I")
#: feature: pickle streams may travel in the shared file, both ways
FILE_PICKLE: Final = 1


class FrameError(ValueError):
    """A frame that cannot be accepted (too large, wrong version, truncated)."""

    def __init__(self, message: str, reqid: int = 0) -> None:
        super().__init__(message)
        self.reqid = reqid  # so the refusal can still reach the right caller


def header(kind: int, reqid: int, payload_len: int, status: int = 0) -> bytes:
    return HEADER.pack(payload_len + HEADER_SIZE - SIZE_FIELD, VERSION, kind, status, reqid)


def frame(kind: int, reqid: int, payload: bytes = b"", status: int = 0) -> bytes:
    return header(kind, reqid, len(payload), status) + payload


HELD_DEADLINE = struct.Struct("<q")


def held_frame(reqid: int, deadline_ns: int) -> bytes:
    """The HELD frame that precedes a prefetched call: start it only before ``deadline_ns``."""
    return HEADER.pack(HEADER_SIZE - SIZE_FIELD + HELD_DEADLINE.size, VERSION, Kind.HELD, 0, reqid) + HELD_DEADLINE.pack(deadline_ns)


def credit_frame(pool: str, n: int) -> bytes:
    """The daemon's unsolicited grant of ``n`` more credits on ``pool`` (reqid 0)."""
    return frame(Kind.CREDIT, 0, pack_name(pool) + CREDIT_COUNT.pack(n))


def parse_credit(buf: bytes | bytearray | memoryview) -> tuple[str, int]:
    """(pool, count) of a CREDIT frame: a request's want, or a grant."""
    pool, off = unpack_name(buf, HEADER_SIZE)
    if off + CREDIT_COUNT.size > len(buf):
        raise FrameError("truncated credit count")
    return pool, CREDIT_COUNT.unpack_from(buf, off)[0]


def set_reqid(buf: bytearray, reqid: int) -> None:
    REQID.pack_into(buf, REQID_OFFSET, reqid)


def parse_header(buf: bytes | bytearray | memoryview, limit: int) -> tuple[int, int, int, int]:
    """Return (total frame length, kind, status, reqid) of the frame at ``buf[0:16]``."""
    size, version, kind, status, reqid = HEADER.unpack_from(buf, 0)
    if version != VERSION:
        raise FrameError(f"unsupported protocol version {version} (this daemon speaks {VERSION})", reqid)
    total = size + SIZE_FIELD
    if total < HEADER_SIZE:
        raise FrameError(f"frame length {size} is shorter than a header", reqid)
    if total > limit:
        raise FrameError(f"frame of {total} bytes exceeds the limit of {limit} bytes (daemon.max_message_bytes)", reqid)
    return total, kind, status, reqid


# -- small field codecs -------------------------------------------------------

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
CALL_FIXED = struct.Struct("<I16s")  # timeout_ms, key
KEY_SIZE: Final = 16


def pack_name(name: str) -> bytes:
    raw = name.encode()
    if len(raw) > 255:
        raise ValueError(f"name too long: {name[:40]!r}...")
    return _U8.pack(len(raw)) + raw


def unpack_name(buf: bytes | bytearray | memoryview, offset: int) -> tuple[str, int]:
    (n,) = _U8.unpack_from(buf, offset)
    start = offset + 1
    end = start + n
    if end > len(buf):
        raise FrameError("truncated name field")
    return bytes(buf[start:end]).decode(), end


def call_head(pool: str, timeout_ms: int, key: bytes) -> bytes:
    return pack_name(pool) + CALL_FIXED.pack(timeout_ms, key)


def parse_call(buf: bytes | bytearray | memoryview) -> tuple[str, int, bytes, int]:
    """(pool, timeout_ms, key, offset of the args bundle) of a CALL frame."""
    pool, off = unpack_name(buf, HEADER_SIZE)
    if off + CALL_FIXED.size > len(buf):
        raise FrameError("truncated call header")
    timeout_ms, key = CALL_FIXED.unpack_from(buf, off)
    return pool, timeout_ms, key, off + CALL_FIXED.size


def call_key(buf: bytes | bytearray | memoryview) -> tuple[bytes, int]:
    """(key, offset of the args bundle) of a CALL frame: what a worker needs of ``parse_call``,
    without decoding the pool's name."""
    if len(buf) <= HEADER_SIZE:
        raise FrameError("truncated name field")
    off = HEADER_SIZE + 1 + buf[HEADER_SIZE] + _U32.size  # the name, then the timeout
    end = off + KEY_SIZE
    if end > len(buf):
        raise FrameError("truncated call header")
    return bytes(buf[off:end]), end


def register_head(pool: str, key: bytes, meta_json: bytes) -> bytes:
    return pack_name(pool) + key + _U16.pack(len(meta_json)) + meta_json


def parse_register(buf: bytes | bytearray | memoryview) -> tuple[str, bytes, bytes, int]:
    """(pool, key, meta JSON bytes, offset of the code blob) of a REGISTER/DEFINE frame."""
    pool, off = unpack_name(buf, HEADER_SIZE)
    if off + KEY_SIZE + 2 > len(buf):
        raise FrameError("truncated register header")
    key = bytes(buf[off : off + KEY_SIZE])
    off += KEY_SIZE
    (n,) = _U16.unpack_from(buf, off)
    off += 2
    if off + n > len(buf):
        raise FrameError("truncated register metadata")
    return pool, key, bytes(buf[off : off + n]), off + n


#: how far past ``daemon.max_message_bytes`` a worker reads: an HTTP body of the
#: full limit arrives wrapped in a frame header and the endpoint's name
ENVELOPE_SLACK: Final = 1024


def parse_endpoint(buf: bytes | bytearray | memoryview) -> tuple[str, int]:
    """(``service/endpoint``, offset of the JSON body) of an ENDPOINT frame."""
    return unpack_name(buf, HEADER_SIZE)


def seal(buf: bytearray, kind: int, reqid: int = 0, status: int = 0) -> None:
    """Write the header into the first HEADER_SIZE bytes of ``buf``, which its builder reserved.

    Lets a frame be built in one buffer as its payload arrives (the HTTP door
    reads a body straight behind the endpoint name) instead of being copied
    behind a header at the end.
    """
    HEADER.pack_into(buf, 0, len(buf) - SIZE_FIELD, VERSION, kind, status, reqid)


def endpoint_frame(name: str, body: bytes | bytearray | memoryview) -> bytearray:
    """An ENDPOINT frame (request id 0, patched at dispatch) holding ``body`` unchanged."""
    buf = bytearray(HEADER_SIZE)
    buf += pack_name(name)
    buf += body
    seal(buf, Kind.ENDPOINT)
    return buf


def error_payload(info_json: bytes, pickled_exc: bytes) -> list[bytes | memoryview]:
    return [_U32.pack(len(info_json)), info_json, pickled_exc]


def parse_error(buf: bytes | bytearray | memoryview, offset: int = HEADER_SIZE) -> tuple[bytes, memoryview]:
    (n,) = _U32.unpack_from(buf, offset)
    start = offset + 4
    mv = memoryview(buf)
    return bytes(mv[start : start + n]), mv[start + n :]
