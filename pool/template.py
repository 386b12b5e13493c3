"""The pool template: a single-threaded, preloaded forkserver.

The supervisor starts one template per pool as a fresh interpreter
(``python -m cruised.pool.template``), never by forking itself: it runs an
event loop and threads, and forking such a process is how gunicorn's and
CPython's pools deadlocked (see STYLE-ANCHORS §6).

Data flow::

    supervisor --(SOCK_SEQPACKET control, JSON + SCM_RIGHTS)--> template
        "spawn" + [channel fd, output fd, descriptor socket fd, cancel board fd] -> fork -> worker.run()
    template --> supervisor: hello (preload result), spawned (pid), exited (pid, status)

The template imports the pool's libraries once (plus ``preload_modules``:
pykx in a pool with a q connection, ~1 s of import no worker should pay; and,
best effort, its ``warm_modules``: pykx when the q door is on), freezes the GC
(so children keep sharing those pages instead of touching them on the first
collection),
and forks a worker per request: a new worker is ready in milliseconds instead
of paying the imports again. Per-worker setup (init file, q connection) runs
after the fork, in the child, because sockets and threads do not survive a
fork.

Liveness: the template dies with the supervisor (PR_SET_PDEATHSIG, and EOF on
the control socket); workers die with the template the same way, so no worker
outlives a SIGKILLed supervisor. The template reaps its children and reports
each exit status, which is how the supervisor learns a worker's exit code or
signal. Kill requests go through the template too: a pid is only signalled
while it is an unreaped child, so a recycled pid is never hit.
"""

from __future__ import annotations

import array
import ctypes
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from typing import Any

from cruised.pool import interrupt
from cruised.pool import worker as worker_mod

PR_SET_PDEATHSIG = 1
MAX_FDS = 4


def die_with_parent(parent: int) -> None:
    """Ask the kernel for SIGKILL when ``parent`` exits (Linux); exit now if it already has.

    ``parent`` is the pid our parent had *before* it started us (the supervisor passes its
    own pid on the command line; the template records its pid before each fork), never
    ``os.getppid()`` read here: that read races the parent's death. PDEATHSIG only fires for
    a death after the prctl, so the check after it closes the window: if the parent died
    before, we were reparented and ``getppid()`` no longer names it. No pid is special:
    in a container the supervisor may well be pid 1 (``unshare --pid``, a pod), and an
    orphan's new parent need not be 1 either (a subreaper adopts it).

    PDEATHSIG follows the *thread* that forked us, not the process: the supervisor starts
    templates from its event-loop thread (daemon/core/launcher.py), which lives as long as it
    does, and a template forks workers from its only thread. The control socket's EOF is the
    second line of defence either way.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: control-socket EOF still ends us
    if os.getppid() != parent:
        os._exit(1)


def drop_privileges(uid: int, gid: int, parent: int) -> None:
    """Become the pool's configured user; workers forked from here inherit it.

    Runs after the libraries are imported (they are the operator's, named in
    the config) and before any init file or shipped code. A credential change
    clears PR_SET_PDEATHSIG, so it is set again.
    """
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    die_with_parent(parent)


def send(ctl: socket.socket, msg: dict[str, Any]) -> None:
    ctl.send(json.dumps(msg).encode())


def recv(ctl: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    fds = array.array("i")
    data, ancdata, _, _ = ctl.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, ctype, cdata in ancdata:
        if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if not data:
        return None, list(fds)
    return json.loads(data), list(fds)


#: a forked worker's channel sockets, kept open until its os._exit (see ``child``)
_UNTIL_EXIT: list[socket.socket] = []


def child(
    spec: worker_mod.WorkerSpec,
    ctl: socket.socket,
    wake_r: int,
    wake_w: int,
    chan_fd: int,
    out_fd: int,
    fds_fd: int,
    template: int,
    board_fd: int | None = None,
) -> int:
    """Runs in the forked worker: shed the template's state, become a worker."""
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    # Ctrl-C in a foreground `cruised serve` reaches the whole process group;
    # the supervisor decides how workers stop, so workers ignore it. With a cancel
    # board, worker.run() replaces this with a handler that interrupts only a call the
    # supervisor cancelled (pool/interrupt.py), and ignores every other SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctl.close()
    os.close(wake_r)
    os.close(wake_w)
    die_with_parent(template)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    # No gc.unfreeze() here: the objects the template froze (its imports) stay out of the
    # collector's reach for the worker's life. Unfrozen, the first full collection walks
    # and writes every one of them, copying their pages: PSS per idle worker (numpy +
    # pandas) went from 15 MB to 26 MB after one gc.collect(); frozen, it stays at 15 MB.
    # Those objects are module-level and live as long as the process anyway.
    sock = socket.socket(fileno=chan_fd)
    sock.setblocking(True)
    fd_sock = socket.socket(fileno=fds_fd)
    fd_sock.setblocking(False)  # a flagged CALL's file is always there before the CALL (worker._claim_fd)
    # The channel closes at os._exit, never before: the supervisor reads its EOF as "this worker
    # can answer no more" and kills a worker it sees alive then, so an EOF that came first (the
    # socket object freed with this frame, while stderr is still flushed) would turn the worker's
    # own exit code (70 for an escaping exception, PRELOAD_FAILED) into SIGKILL.
    _UNTIL_EXIT.extend((sock, fd_sock))
    board = interrupt.Board.open(board_fd) if board_fd is not None else None
    return worker_mod.run(spec, sock, fd_sock, board)


def serve(ctl: socket.socket, config: dict[str, Any], supervisor: int) -> int:
    children: dict[int, str] = {}
    template = os.getpid()  # every worker's parent, recorded before its fork (die_with_parent)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # handler needed for the wakeup byte
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    started = time.monotonic()
    try:
        worker_mod.import_libraries(config.get("libraries") or {})
        worker_mod.import_libraries({m: m for m in config.get("preload_modules") or []})
    except ImportError as exc:
        send(ctl, {"op": "hello", "ok": False, "error": str(exc), "python": worker_mod.PYTHON})
        return worker_mod.PRELOAD_FAILED_EXIT
    try:
        # Every shipped function is a cloudpickle stream (pool/wire/byvalue.py): imported here once,
        # it is shared by every worker instead of costing each new worker its import on its first call.
        from cruised.pool.wire import byvalue  # noqa: F401 - imported for its effect: loaded once here, shared by every forked worker
    except ImportError:
        pass  # an interpreter without cloudpickle can still serve endpoints; shipped calls report the error
    for name in config.get("warm_modules") or []:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - best effort: a worker that needs it reports the error then
            print(f"template: {name} not preloaded: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if config.get("uid") is not None:
        try:
            drop_privileges(int(config["uid"]), int(config["gid"]), supervisor)
        except OSError as exc:
            send(ctl, {"op": "hello", "ok": False, "error": f"cannot switch to uid {config['uid']}: {exc}", "python": worker_mod.PYTHON})
            return worker_mod.PRELOAD_FAILED_EXIT
    gc.collect()
    gc.freeze()
    send(
        ctl,
        {
            "op": "hello",
            "ok": True,
            "pid": os.getpid(),
            "python": worker_mod.PYTHON,
            "executable": sys.executable,
            "preload_s": round(time.monotonic() - started, 4),
        },
    )

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            wid = children.pop(pid, "?")
            code = os.waitstatus_to_exitcode(status)
            send(ctl, {"op": "exited", "pid": pid, "worker": wid, "code": code})

    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            reap()
        if ctl.fileno() not in ready:
            continue
        msg, fds = recv(ctl)
        if msg is None:  # the supervisor is gone: take the workers with us
            for pid in list(children):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return 0
        op = msg.get("op")
        if op == "spawn":
            chan_fd, out_fd, fds_fd = fds[0], fds[1], fds[2]
            board_fd = fds[3] if len(fds) > 3 else None  # the worker's cancel board (pool/interrupt.py)
            spec = worker_mod.WorkerSpec.from_json(msg["spec"])
            pid = os.fork()
            if pid == 0:
                code = 70
                try:
                    code = child(spec, ctl, wake_r, wake_w, chan_fd, out_fd, fds_fd, template, board_fd)
                except BaseException:  # noqa: BLE001 - say why on stderr, which the supervisor logs
                    traceback.print_exc()
                finally:
                    try:
                        sys.stdout.flush()
                        sys.stderr.flush()
                    finally:
                        os._exit(code)
            children[pid] = spec.worker_id
            os.close(chan_fd)
            os.close(out_fd)
            os.close(fds_fd)
            if board_fd is not None:
                os.close(board_fd)
            send(ctl, {"op": "spawned", "worker": spec.worker_id, "pid": pid})
        elif op == "kill":
            pid = int(msg["pid"])
            if pid in children:  # only unreaped children: never a recycled pid
                try:
                    os.kill(pid, int(msg.get("signal", signal.SIGTERM)))
                except ProcessLookupError:
                    pass
        else:
            for fd in fds:
                os.close(fd)


def main() -> int:
    fd = int(sys.argv[1])
    # the supervisor's pid as it saw it before starting us (argv[2]); a caller that does not
    # pass it (an older supervisor) gets the racy read, which is still right in the common case
    supervisor = int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid()
    die_with_parent(supervisor)
    ctl = socket.socket(fileno=fd)
    ctl.setblocking(True)
    msg, _ = recv(ctl)
    if msg is None:
        return 0
    me = os.getpid()
    try:
        return serve(ctl, msg, supervisor)
    except (BrokenPipeError, ConnectionResetError):
        if os.getpid() != me:
            raise  # a forked worker's own failure: its exit says so
        return 0  # the supervisor closed the channel (it stopped while we started): nothing to serve, nothing to report


if __name__ == "__main__":
    sys.exit(main())
