"""The worker loop: one process, one request at a time, blocking I/O.

Threading model
    Single-threaded. The worker reads a frame from its private channel, runs
    it, writes the reply, and reads the next one. It never sees a client: the
    supervisor owns every deadline and kills the worker when a call overruns.
    In a pool with q, waiting for the next frame is ``QHandle.idle``: the same
    thread reconnects to q and watches its socket meanwhile, and sends a
    STATE frame when the connection comes up or goes down.

Lifecycle
    forked from the pool template (or started fresh) -> ``preload`` (library
    aliases bound, q connected if configured, init file run) -> endpoint code
    loaded (pool/endpoint.py; a failure there marks only that endpoint) -> READY
    frame -> serve until the channel
    closes (EOF = retire) -> exit 0. A preload failure is reported as a REPLY
    with status PRELOAD_FAILED and exit code 3, so the supervisor can tell a
    broken deploy from a crash.

Namespaces
    ``base`` holds the pool's library aliases, the ``q`` handle when the pool
    has a ``q:`` section (pool/qconn.py; bound before the init file runs), and
    whatever the init file defined; every shipped function runs with a copy
    of ``base`` updated by
    the globals it was shipped with and its session's libraries. Functions are
    cached by the content key the client computed, so code is loaded once per
    worker and later calls carry only arguments.

This module must not import anything from the daemon side (``cruised``):
it also runs under other interpreters (per-pool code envs).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import select
import socket
import sys
import time
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cruised.pool import endpoint as endpoint_mod
from cruised.pool import heap, interrupt, qcall, qconn
from cruised.pool.wire import bundle, framebuf, frames, sharedfile, sockopt
from cruised.pool.wire.frames import Kind, Status

PRELOAD_FAILED_EXIT = 3
#: loaded functions kept per worker; a miss only costs a DEFINE from the supervisor
FUNCTION_CACHE = 4096
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
#: the channel's reusable receive buffer; larger frames get their own
RECV_SIZE = 256 << 10
#: replies up to this size are joined and sent as one buffer; larger ones go out as a scatter list
SMALL_REPLY = 64 << 10
#: payloads this large get heap blocks of their own (glibc's default mmap threshold), and count
#: towards a trim; smaller frames live in the channel's reused buffer
LARGE_PAYLOAD = 128 << 10
#: after this many large-payload bytes since the last trim, the worker trims its heap (pool/heap.py)
#: once it is idle
TRIM_AFTER_BYTES = 4 << 20
#: seconds without a frame that count as idle for that
IDLE_TRIM_AFTER = 1.0
#: waits that a frame interrupted before it trims anyway: a steady stream of calls after a burst
#: of large ones must neither keep that heap forever nor pay a select() per call for long
TRIM_BUSY_WAITS = 64


#: forks this process's line has gone through since this module was imported (see Channel.owner)
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


@dataclass
class WorkerSpec:
    worker_id: str
    pool: str
    libraries: dict[str, str] = field(default_factory=dict)
    init: str | None = None
    max_message_bytes: int = 256 << 20
    #: a SETUP frame (this worker's endpoints) comes first on the channel
    setup: bool = False
    q: dict[str, Any] | None = None  # QConfig.worker_spec(): the pool's kdb+ connection, if any
    #: the pool's max_rss (0: none). With a limit the worker leaves glibc's heap defaults alone:
    #: warm free pages (pool/heap.py) would count against it right after a large call
    max_rss: int = 0

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> WorkerSpec:
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class PreloadError(Exception):
    pass


def import_libraries(libraries: dict[str, str]) -> dict[str, Any]:
    """Import ``{alias: module}``; raise ImportError naming the module on failure."""
    bound: dict[str, Any] = {}
    for alias, modname in libraries.items():
        try:
            bound[alias] = importlib.import_module(modname)
        except Exception as exc:
            raise ImportError(f"cannot import {modname!r} (alias {alias!r}): {type(exc).__name__}: {exc}") from exc
    return bound


def preload(spec: WorkerSpec) -> dict[str, Any]:
    base: dict[str, Any] = {"__name__": "__cruised__", "__builtins__": __builtins__}
    base.update(import_libraries(spec.libraries))
    if spec.q is not None:
        base["q"] = qconn.open_handle(spec.q)  # connects now; a q that is down does not fail preload
    if spec.init:
        path = os.path.abspath(spec.init)
        with open(path, encoding="utf-8") as fh:
            source = fh.read()
        base["__file__"] = path
        exec(compile(source, path, "exec"), base)
    return base


class Channel:
    """Blocking framed I/O over the worker's end of the socketpair.

    Reads go through a ``FrameBuffer`` (pool/wire/framebuf.py, shared with the
    supervisor and the client), so a frame (or a DEFINE and the CALL pipelined
    behind it) usually costs one ``recv``; a frame that does not fit in its
    buffer gets a buffer of its own that the kernel fills directly. Each
    returned frame is a ``bytearray`` of its own, since call arguments may
    keep views into it (numpy arrays unpickled out-of-band).
    """

    def __init__(self, sock: socket.socket, limit: int, fd_sock: socket.socket | None = None) -> None:
        self.sock = sock
        #: where the supervisor sends each flagged CALL's shared file, in CALL order (see _claim_fd)
        self.fd_sock = fd_sock
        #: large-payload bytes moved since the heap was last trimmed (Worker.serve)
        self.churn = 0
        #: waits for an idle moment that a frame cut short since then
        self.busy_waits = 0
        sockopt.size_buffers(sock)
        #: read() waits for the next frame here, not inside recv (see there)
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        #: received bytes not yet returned by ``read``; its ``header``: that of the frame ``read``
        #: returned last
        self.incoming = framebuf.FrameBuffer(RECV_SIZE, limit)
        #: the shared file that came with the frame ``read`` returned last (the caller closes it)
        self.frame_fd: int | None = None
        #: a function may call os.fork(); only the real worker may use the channel. A fork count
        #: rather than os.getpid(), which is a system call, and this is checked on every reply
        self.owner = _forks

    def _claim_fd(self) -> None:
        """Give a CALL flagged CARRIES_FD its shared file: the next one on the descriptor socket.

        The supervisor sends a flagged CALL's file there, one message each, before it
        writes the CALL on the channel, so it is always waiting by the time the CALL is
        read, and the two arrive in the same order. Keeping descriptors off the channel
        lets it use plain ``recv_into``: ``recvmsg`` cost about 10 µs a call.
        """
        if self.fd_sock is None:
            raise frames.FrameError("a CALL announced a shared file, but this worker has no descriptor socket")
        try:
            _, anc, flags, _ = self.fd_sock.recvmsg(1, sharedfile.ANCBUF, sharedfile.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            anc, flags = [], 0
        fds = sharedfile.fds_from(anc)
        if len(fds) != 1 or flags & sharedfile.MSG_CTRUNC:
            sharedfile.close_all(fds)
            raise frames.FrameError("a CALL announced a shared file, but none came on the descriptor socket")
        self.frame_fd = fds[0]

    def buffered(self) -> bool:
        """True when bytes of the next frame are already in the receive buffer."""
        return self.incoming.held() > 0

    def read(self) -> bytearray | None:
        """Next whole frame, or None at EOF (the supervisor closed the channel). Its header is in
        ``incoming.header``, and a shared file that came with it in ``frame_fd``."""
        self.frame_fd = None
        fb = self.incoming
        n = 0
        while (buf := fb.next(n)) is None:
            # Wait in poll(), then read: a task asleep in a Unix socket's recv() is woken by every
            # event on the socket, including "write space" each time the supervisor reads one of our
            # replies, which it does while we already wait for the next call. That cost 0.65-0.9
            # extra wake-ups per call (voluntary context switches: 1.65-1.89 per call, 0.93-0.99
            # with poll), each running this process for nothing, often on the supervisor's CPU just
            # as it answers the caller. poll() sleeps until there is something to read (or EOF).
            # When a frame is already waiting (pipelined calls) it returns at once: one more system
            # call, for a receive that usually brings several frames.
            self._readable.poll()
            n = self.sock.recv_into(fb.space())
            if n == 0:
                return None  # mid-frame too: a frame the supervisor did not finish is dropped
        if len(buf) >= LARGE_PAYLOAD:
            self.churn += len(buf)
        _, _, kind, status, _ = fb.header
        if kind == Kind.CALL and status & frames.CARRIES_FD:
            self._claim_fd()
        return buf

    def _only_the_worker(self) -> None:
        if _forks != self.owner:
            # the forked child of a user function returned into our loop: a second reply
            # for the same request would be a duplicate, so it leaves silently
            os._exit(0)

    def send(self, parts: list[bytes | memoryview]) -> None:
        self._only_the_worker()
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        while views:
            sent = self.sock.sendmsg(views)
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def reply(self, reqid: int, status: int, parts: list[bytes | memoryview]) -> None:
        self._only_the_worker()  # every write path checks: reply has a fast path of its own
        size = bundle.packed_size(parts)
        if size >= LARGE_PAYLOAD:
            self.churn += size
        head = frames.header(Kind.REPLY, reqid, size, status)
        if size <= SMALL_REPLY:
            # one contiguous buffer and plain send(): cheaper than building a scatter list
            self.sock.sendall(b"".join((head, *parts)))
        else:
            self.send([head, *parts])


def error_parts(exc: BaseException) -> list[bytes | memoryview]:
    """Describe an exception for the client: JSON it can always read, plus the pickle if possible."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    info = {
        "type": type(exc).__qualname__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": tb,
    }
    try:
        # by value when its class came from the client's __main__ (bundle.dumps): the client gets
        # its own class back, so `except MyError:` catches it
        pickled = bundle.dumps(exc)
        pickle.loads(pickled)  # exceptions with odd __init__ signatures fail only at load
    except Exception:  # noqa: BLE001 - not picklable: the client gets the description alone
        pickled = b""
    return frames.error_payload(json.dumps(info).encode(), pickled)


class Worker:
    def __init__(self, spec: WorkerSpec, channel: Channel) -> None:
        self.spec = spec
        self.channel = channel
        #: large-payload bytes after which an idle moment trims the heap; never when the heap is
        #: left at glibc's defaults (a pool with max_rss, see run()), which keep nothing warm
        self.trim_after = float("inf") if spec.max_rss else TRIM_AFTER_BYTES
        self.base: dict[str, Any] = {}
        self.functions: OrderedDict[bytes, Callable[..., Any]] = OrderedDict()
        self.endpoints: dict[str, endpoint_mod.Endpoint] = {}
        self.q: qconn.QHandle | None = None
        self.mappings = sharedfile.MappingCache()
        #: cancels: the board, the SIGINT handler, the call running now (pool/interrupt.py)
        self.interrupts = interrupt.STATE

    def report_q(self) -> None:
        """Tell the supervisor when the q connection came up or went down (a STATE frame)."""
        change = self.q.take_change() if self.q is not None else None
        if change is not None:
            payload = json.dumps({"q": change}).encode()
            self.channel.send([frames.header(Kind.STATE, 0, len(payload)), payload])

    # -- requests -------------------------------------------------------------

    def define(self, buf: bytearray) -> None:
        """Load a shipped function under its key; errors surface on the call that needs it."""
        _, key, meta_raw, off = frames.parse_register(buf)
        meta = json.loads(meta_raw)
        try:
            fn = self._load_function(meta, memoryview(buf)[off:])
        except BaseException as exc:  # noqa: BLE001 - remembered and raised on use, so the reply goes to the caller
            fn = _raiser(exc)
        self.functions[key] = fn
        if len(self.functions) > FUNCTION_CACHE:
            self.functions.popitem(last=False)

    def _load_function(self, meta: dict[str, Any], blob: memoryview) -> Callable[..., Any]:
        if meta.get("source"):  # a pykx.remote function: source text from the q door
            return qcall.load_source(meta, blob, self.base, import_libraries)
        client_py = meta.get("python")
        if client_py and client_py != PYTHON:
            raise RuntimeError(
                f"function {meta.get('name')!r} was shipped from Python {client_py} but this pool runs Python {PYTHON}; bytecode does not cross minor versions"
            )
        libs = import_libraries(meta.get("libraries") or {})
        # cloudpickle's stream (pool/wire/byvalue.py); plain pickle.loads reads it
        shipped: Callable[..., Any] = pickle.loads(blob)  # the client ships only callables
        if not isinstance(shipped, types.FunctionType):
            return shipped  # any other callable: nothing to rebind
        g = dict(self.base)
        g.update(libs)
        g.update(shipped.__globals__)
        g["__builtins__"] = self.base["__builtins__"]
        fn = types.FunctionType(shipped.__code__, g, shipped.__name__, shipped.__defaults__, shipped.__closure__)
        fn.__kwdefaults__ = shipped.__kwdefaults__
        fn.__qualname__ = shipped.__qualname__
        fn.__module__ = shipped.__module__
        fn.__doc__ = shipped.__doc__
        fn.__annotations__ = shipped.__annotations__
        fn.__dict__.update(shipped.__dict__)
        # a recursive function finds itself by name in its globals
        if g.get(shipped.__name__) is shipped or shipped.__name__ not in g:
            g[shipped.__name__] = fn
        return fn

    def call(self, reqid: int, buf: bytearray, fd: int | None = None) -> None:
        """Run a CALL and reply. ``fd``: the call's shared file (closed here, after the reply)."""
        if fd is None:
            self._call(reqid, buf, None)
            return
        try:
            shared = self.mappings.open(fd)
        except (OSError, ValueError):  # not mappable: reading it raises the reason, as the call's error
            shared = sharedfile.Mapped(fd, owns_fd=False)
        # the status's high byte read directly, as _claim_fd does: only a call with a file needs it
        pickle_in_file = bool(buf[frames.STATUS_OFFSET + 1] & (frames.PICKLE_IN_FILE >> 8))
        try:
            self._call(reqid, buf, shared, pickle_in_file)
        finally:
            self.channel.churn += shared.size  # what was copied out of and into it
            self.mappings.done(shared)
            os.close(fd)

    def _call(self, reqid: int, buf: bytearray, shared: sharedfile.Mapped | None, pickle_in_file: bool = False) -> None:
        """Run a CALL; a large result goes back through ``shared``, its pickle stream too if
        ``pickle_in_file`` (the client said it reads one from there)."""
        key, off = frames.call_key(buf)
        fn = self.functions.get(key)
        if fn is None:
            self.channel.reply(reqid, Status.UNKNOWN_FUNCTION, [b'{"message": "function not defined in worker"}'])
            return
        self.functions.move_to_end(key)
        intr = self.interrupts
        intr.begin(reqid)  # a SIGINT from here on may be this call's cancel (pool/interrupt.py)
        started = False
        try:
            args, kwargs = bundle.unpack(buf, off, shared)
            del buf  # the arguments may view the frame; let it go with them
            intr.in_user = True
            try:
                if intr.hit:  # cancelled before it could start
                    raise KeyboardInterrupt
                started = True
                result = fn(*args, **kwargs)
            finally:
                intr.in_user = False  # no KeyboardInterrupt into the worker's own code after this
            # a function that forked returns here in the child too: it must leave before it can
            # write a result into the caller's shared file (reply() would stop it only later)
            self.channel._only_the_worker()
            parts = bundle.pack(result, check_refs=False)  # a shipped class is not in our __main__: pickle raises for it
            if shared is not None and bundle.shareable(parts, pickle_in_file):  # large results go back through the file
                parts = bundle.share(parts, shared, self.spec.max_message_bytes, with_pickle=pickle_in_file)
        except BaseException as exc:
            if intr.end():  # cancelled: whatever the function did since, its caller has gone
                self.channel.reply(reqid, Status.CANCELLED, [interrupt.INTERRUPTED if started else interrupt.NOT_STARTED])
                return
            if isinstance(exc, (KeyboardInterrupt,)):
                raise  # raised by the function itself, not a cancel: the worker dies of it, as before
            if isinstance(exc, qconn.QConnectionError):  # q is unreachable: not the function's fault
                self.channel.reply(reqid, Status.Q_UNAVAILABLE, [qconn.error_payload(exc)])
                return
            self.channel.reply(reqid, Status.ERROR, error_parts(exc))
            return
        if intr.end():  # the cancel came after the function returned: its result is not sent
            self.channel.reply(reqid, Status.CANCELLED, [interrupt.INTERRUPTED])
            return
        self.channel.reply(reqid, Status.OK, parts)

    def check(self, reqid: int, buf: bytearray) -> None:
        _, off = frames.unpack_name(buf, frames.HEADER_SIZE)
        try:
            libs = json.loads(bytes(buf[off:])).get("libraries") or {}
            import_libraries(libs)
        except BaseException as exc:  # noqa: BLE001 - an import may raise anything; it is the caller's answer
            self.channel.reply(reqid, Status.ERROR, error_parts(exc))
            return
        self.channel.reply(reqid, Status.OK, [])

    def serve(self) -> int:
        ch = self.channel
        held_reqid, held_until = 0, 0  # the call the last HELD frame announced, and its deadline
        while True:
            if ch.churn >= self.trim_after and not ch.buffered():
                self._trim_when_idle()
            if self.q is not None and not ch.buffered():
                # only when no frame already sits in our receive buffer: idle() waits for the
                # socket, and a frame read ahead (DEFINE arrives with its CALL) would never wake it
                self.q.idle(ch.sock, self.report_q)  # reconnects and watches q while waiting
            buf = ch.read()
            if buf is None:
                return 0
            shared = ch.frame_fd  # only a CALL has one
            _, _, kind, _, reqid = ch.incoming.header
            if kind == Kind.HELD:
                held_reqid, held_until = reqid, frames.HELD_DEADLINE.unpack_from(buf, frames.HEADER_SIZE)[0]
                continue
            if held_reqid:
                # The previous reply is already sent (reply() writes synchronously), so if the
                # supervisor read no reply by the deadline, this check comes after it: at most once.
                # The same holds for a cancel: the supervisor posts it, then reads our replies.
                expired = reqid == held_reqid and (time.monotonic_ns() >= held_until or self.interrupts.cancelled(reqid))
                held_reqid = 0
                if expired:
                    del buf
                    if shared is not None:
                        os.close(shared)  # never read: the call did not run
                    ch.reply(reqid, Status.NOT_RUN, [])
                    continue
            if kind == Kind.CALL:
                self.call(reqid, buf, shared)
            elif kind == Kind.DEFINE:
                self.define(buf)
            elif kind == Kind.CHECK:
                self.check(reqid, buf)
            elif kind == Kind.ENDPOINT:
                self.interrupts.begin(reqid)
                status, parts = endpoint_mod.handle(self.endpoints, buf, self.spec.max_message_bytes)
                del buf
                if self.interrupts.end():  # an HTTP caller that left (on_disconnect: cancel)
                    status, parts = Status.CANCELLED, [interrupt.INTERRUPTED]
                ch.reply(reqid, status, parts)
            elif kind == Kind.QCALL:
                self.interrupts.begin(reqid)
                qcall.handle(self, reqid, buf, self.spec.max_message_bytes)
                self.interrupts.end()
            elif kind == Kind.PING:
                ch.reply(reqid, Status.OK, [])
            else:
                ch.reply(reqid, Status.BAD_REQUEST, [json.dumps({"message": f"worker: unknown kind {kind}"}).encode()])

    def _trim_when_idle(self) -> None:
        """After large payloads, hand the freed heap back once no frame came for a while.

        Large buffers come from the heap (pool/heap.py), whose freed pages glibc
        keeps for the next call. A worker that stays busy reuses them; one that
        goes idle returns them, so an idle pool does not hold its last burst.
        A worker that never idles for that long trims after ``TRIM_BUSY_WAITS``
        calls. Meanwhile a q connection is not watched: a drop is noticed up to
        a second later.
        """
        ch = self.channel
        ready, _, _ = select.select([ch.sock], [], [], IDLE_TRIM_AFTER)
        if ready and ch.busy_waits < TRIM_BUSY_WAITS:
            ch.busy_waits += 1
            return
        heap.trim()
        ch.churn = ch.busy_waits = 0


def _raiser(exc: BaseException) -> Callable[..., Any]:
    def fail(*_a: Any, **_k: Any) -> Any:
        raise exc

    return fail


def run(spec: WorkerSpec, sock: socket.socket, fd_sock: socket.socket | None = None, board: interrupt.Board | None = None) -> int:
    """Preload, say READY, serve. Returns the process exit code. ``board``: the worker's cancel
    board (pool/interrupt.py); without one, SIGINT is ignored and calls cannot be interrupted."""
    if board is not None:
        interrupt.STATE.board = board
        interrupt.STATE.install()  # from here a SIGINT interrupts only a cancelled call's user code
    if not spec.max_rss:
        # with a limit, freed large buffers must leave at once: the supervisor reads the
        # worker's memory right after each reply, before an idle trim could run
        heap.keep_large_buffers_warm()
    channel = Channel(sock, spec.max_message_bytes + frames.ENVELOPE_SLACK, fd_sock)
    worker = Worker(spec, channel)
    setup: dict[str, Any] = {}
    if spec.setup:
        buf = channel.read()
        if buf is None:
            return 0  # retired before it started
        kind = channel.incoming.header[2]
        if kind != Kind.SETUP:
            print(f"worker={spec.worker_id} expected a SETUP frame first, got kind {kind}", file=sys.stderr, flush=True)
            return PRELOAD_FAILED_EXIT
        setup = json.loads(bytes(buf[frames.HEADER_SIZE :]))
    try:
        worker.base = preload(spec)
    except BaseException as exc:  # noqa: BLE001 - reported, then a distinct exit code
        print(f"worker={spec.worker_id} preload failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        try:
            channel.reply(0, Status.PRELOAD_FAILED, error_parts(exc))
        except OSError:
            pass
        return PRELOAD_FAILED_EXIT
    worker.endpoints = endpoint_mod.load_all(setup.get("endpoints") or {}, worker.base)
    ready: dict[str, Any] = {"pid": os.getpid(), "python": PYTHON, "worker": spec.worker_id, "endpoints": endpoint_mod.report(worker.endpoints)}
    handle = worker.base.get("q")
    if isinstance(handle, qconn.QHandle):
        worker.q = handle
        ready["q"] = handle.take_change()
    ready["q_arity"] = qcall.describe(worker.endpoints)  # for the q door's deferred-sync rule
    payload = json.dumps(ready).encode()
    channel.send([frames.header(Kind.READY, 0, len(payload)), payload])
    try:
        return worker.serve()
    except (ConnectionError, frames.FrameError):
        return 0
