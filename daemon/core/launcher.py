"""Starting, reaching and stopping one pool's worker processes.

The launcher is the dispatcher's ``Launcher`` port made real. Per pool it runs
one template process (``cruised.pool.template``: a fresh interpreter, the
preloaded forkserver) and asks it to fork workers. For each worker it creates

* a socketpair: the private channel, framed (daemon/core/channel.py);
* a SOCK_SEQPACKET socketpair that only carries descriptors: each flagged
  CALL's shared file (pool/wire/sharedfile.py), sent right before the CALL is
  queued on the channel, so the worker finds it there when it reads the CALL
  (pool/worker.py ``Channel._claim_fd``) and the channel stays plain bytes;
* a pipe: the worker's stdout and stderr, logged line by line with a
  ``worker=`` tag instead of interleaving raw on the daemon's stderr;
* a cancel board (pool/interrupt.py): a page of shared memory where the
  dispatcher posts the ids of the worker's calls it cancels, read by the
  worker before it starts a held call and in its SIGINT handler;

and passes the worker's ends to the template with SCM_RIGHTS. The template
reports each worker's pid and, after reaping it, its exit code; that report
(not channel EOF) is what ends a worker's life here, because only it carries
the exit status. Template death is watched with a pidfd.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from typing import Any

from cruised.config import DaemonConfig, PoolConfig
from cruised.core import codeenv, envbuild
from cruised.core.channel import Channel
from cruised.core.dispatch import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    Dispatcher,
    Worker,
    WorkerState,
)
from cruised.pool import heap, interrupt, qconn
from cruised.pool.wire import frames, sharedfile
from cruised.pool.wire.frames import Kind, Status

log = logging.getLogger("cruised.launcher")

#: after channel EOF, how long to wait for the template's exit report
EXIT_REPORT_WAIT = 5.0
OUTPUT_LINE_MAX = 16 << 10
_PAGE = os.sysconf("SC_PAGE_SIZE")


class WorkerLink:
    """The launcher's per-worker state: channel, output pipe, kill escalation."""

    def __init__(self) -> None:
        self.channel: Channel | None = None
        self.fd_sock: socket.socket | None = None  # shared files to the worker (see the module docstring)
        self.out_fd: int | None = None
        self.out_buf = bytearray()
        self.sigkill_timer: asyncio.TimerHandle | None = None
        #: the worker's cancel board (pool/interrupt.py): ids of its calls that were cancelled
        self.board: interrupt.Board | None = None
        self.eof_timer: asyncio.TimerHandle | None = None
        self.exited = False


class PoolLauncher:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str, pool: PoolConfig, daemon: DaemonConfig) -> None:
        self.loop = loop
        self.name = name
        self.pool = pool
        self.daemon = daemon
        self.dispatcher: Dispatcher | None = None
        self.python = pool.python or sys.executable  # a code env runs the pool under its own interpreter
        #: a code env cruised builds (pools.<name>.code_env): ``python`` is its interpreter once built
        self.env = envbuild.PoolEnv.of(name, pool, daemon)
        #: this pool's endpoints as the workers load them (pool/endpoint.py); set by the supervisor
        self.endpoints: dict[str, dict[str, Any]] = {}
        self._stderr: codeenv.TemplateOutput | None = None
        self.template: subprocess.Popen[bytes] | None = None
        self.template_ready = False
        self.template_info: dict[str, Any] = {}
        self.template_failures = 0
        self._ctl: socket.socket | None = None
        #: modules the template imports if it can, so workers fork with them (pykx for the q door)
        self.warm_modules: list[str] = []
        self._pidfd: int | None = None
        self._pending: list[Worker] = []  # spawns waiting for the template
        self._outbox: list[tuple[bytes, list[int]]] = []
        self._by_pid: dict[int, Worker] = {}
        self._restart_timer: asyncio.TimerHandle | None = None
        self.closing = False

    # -- template ------------------------------------------------------------------

    def start_template(self) -> None:
        self._restart_timer = None
        if self.closing:
            return
        if self.env is not None and not self.env.start(self):
            return  # building it in the background (this is called again once built), or its build failed
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.update(self.pool.env)
        # pykx must never stop a worker at import to ask for a licence; the operator's choice wins
        env = qconn.pykx_environment(env)
        env = codeenv.template_env(self.python, env)
        try:
            self.template = subprocess.Popen(
                # our pid goes along: the template checks its parent against it, never against a
                # guess such as "1 means orphaned" (false when the supervisor is a container's pid 1)
                [self.python, "-m", "cruised.pool.template", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,  # logged by codeenv.TemplateOutput; its last line explains a failed start
                env=env,
                close_fds=True,
            )
        except OSError as exc:
            theirs.close()
            ours.close()
            self._template_failed(f"cannot start {self.python}: {exc.strerror or exc}")
            return
        theirs.close()
        assert self.template.stderr is not None
        self._stderr = codeenv.TemplateOutput(self.loop, self.name, self.template.stderr)
        ours.setblocking(False)
        self._ctl = ours
        self.loop.add_reader(ours.fileno(), self._on_control)
        self._pidfd = os.pidfd_open(self.template.pid)
        self.loop.add_reader(self._pidfd, self._on_template_exit)
        config: dict[str, Any] = {
            "libraries": self.pool.libraries,
            "preload_modules": ["pykx"] if self.pool.q is not None else [],  # strict: the q global needs it
            "warm_modules": self.warm_modules,  # best effort: the q door's calls are faster with it
        }
        creds = self.pool.credentials()
        if creds is not None:
            config["uid"], config["gid"] = creds
        self._queue_msg(json.dumps(config).encode(), [])
        log.info("pool=%s template starting pid=%s python=%s", self.name, self.template.pid, self.python)

    def _template_failed(self, message: str) -> None:
        self.template_failures += 1
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.template_failures - 1))
        log.error("pool=%s template failed: %s; retrying in %.1fs", self.name, message, delay)
        pending, self._pending = self._pending, []
        disp = self.dispatcher
        if disp is not None:
            disp.last_error = message
            for w in pending:
                w.error = message
                w.exit_reason = "preload_failed"
                disp.on_worker_exit(w, None)
        if not self.closing and self._restart_timer is None:
            self._restart_timer = self.loop.call_later(delay, self.start_template)

    def _on_template_exit(self) -> None:
        assert self.template is not None and self._pidfd is not None
        self.loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self._pidfd = None
        pid, code = self.template.pid, self.template.wait()
        self.template = None
        was_ready = self.template_ready
        self.template_ready = False
        self._close_ctl()
        if was_ready and not self.closing:
            log.error("pool=%s template pid=%s exited unexpectedly (code %s); restarting it", self.name, pid, code)
        # Its workers die with it (PDEATHSIG) and their exits will never be reported: report them.
        # Their replacements ask for a template again, which restarts it at once.
        for w in list(self._by_pid.values()):
            self._worker_gone(w, None)
        failure = self.template_info.get("error") or codeenv.exit_message(self.python, code, self._stderr)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.closing or was_ready:
            return
        self._template_failed(failure)

    def _close_ctl(self) -> None:
        if self._ctl is not None:
            self.loop.remove_reader(self._ctl.fileno())
            try:
                self.loop.remove_writer(self._ctl.fileno())
            except (ValueError, OSError):
                pass
            self._ctl.close()
            self._ctl = None
        for _, fds in self._outbox:
            for fd in fds:
                os.close(fd)
        self._outbox.clear()

    def _on_control(self) -> None:
        ctl = self._ctl
        while ctl is not None:
            try:
                data = ctl.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.loop.remove_reader(ctl.fileno())
                return  # the pidfd reports the exit
            msg = json.loads(data)
            op = msg.get("op")
            if op == "hello":
                self.template_info = msg
                if not msg.get("ok"):
                    log.error("pool=%s preload failed in template: %s", self.name, msg.get("error"))
                    continue  # it exits with PRELOAD_FAILED; the pidfd handler retries
                self.template_ready = True
                self.template_failures = 0
                log.info("pool=%s template ready pid=%s python=%s preload=%ss", self.name, msg.get("pid"), msg.get("python"), msg.get("preload_s"))
                if self.dispatcher is not None:
                    self.dispatcher.python = msg.get("python")
                pending, self._pending = self._pending, []
                for waiting in pending:
                    self._send_spawn(waiting)
            elif op == "spawned":
                w = self._find(msg["worker"])
                if w is not None:
                    w.pid = int(msg["pid"])
                    self._by_pid[w.pid] = w
                    if w.state == WorkerState.KILLING:  # killed before its pid was known
                        self.kill(w)
            elif op == "exited":
                w = self._by_pid.get(int(msg["pid"]))
                if w is not None:
                    self._worker_gone(w, msg.get("code"))

    def _find(self, worker_id: str) -> Worker | None:
        return self.dispatcher.workers.get(worker_id) if self.dispatcher else None

    def _queue_msg(self, data: bytes, fds: list[int]) -> None:
        self._outbox.append((data, fds))
        self._flush_ctl()

    def _flush_ctl(self) -> None:
        ctl = self._ctl
        if ctl is None:
            return
        while self._outbox:
            data, fds = self._outbox[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                ctl.sendmsg([data], anc)
            except (BlockingIOError, InterruptedError):
                self.loop.add_writer(ctl.fileno(), self._on_ctl_writable)
                return
            except OSError as exc:
                log.error("pool=%s template control channel failed: %s", self.name, exc)
                return
            self._outbox.pop(0)
            for fd in fds:
                os.close(fd)

    def _on_ctl_writable(self) -> None:
        if self._ctl is not None:
            self.loop.remove_writer(self._ctl.fileno())
        self._flush_ctl()

    # -- the Launcher port --------------------------------------------------------------

    def spawn(self, worker: Worker) -> None:
        worker.handle = WorkerLink()
        if self.template is None and self._restart_timer is None and not self.closing:
            self.start_template()
        if self.template_ready:
            self._send_spawn(worker)
        else:
            self._pending.append(worker)

    def _send_spawn(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd_ours, fd_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd_ours.setblocking(False)
        link.fd_sock = fd_ours
        out_r, out_w = os.pipe()
        os.set_blocking(out_r, False)
        link.out_fd = out_r
        link.board, board_fd = interrupt.Board.create(f"cruised-cancel-{worker.id}")
        self.loop.add_reader(out_r, self._on_output, worker)
        assert self.dispatcher is not None
        link.channel = Channel(self.loop, ours, _WorkerSink(self.dispatcher, self, worker), self.daemon.max_message_bytes, name=worker.id)
        spec = {
            "worker_id": worker.id,
            "pool": self.name,
            "libraries": self.pool.libraries,
            "init": self.pool.init,
            "max_message_bytes": self.daemon.max_message_bytes,
            "setup": bool(self.endpoints),
            "max_rss": int(self.pool.max_rss),
            # private channel to our own child: the only place a literal q password travels
            "q": self.pool.q.worker_spec(self.pool.exec_timeout) if self.pool.q is not None else None,
        }
        if self.endpoints:
            # endpoint specs can be large: they go first on the worker's own channel, not in the spawn message
            setup = json.dumps({"endpoints": self.endpoints}).encode()
            link.channel.write([frames.frame(Kind.SETUP, 0, setup)])
        # the template gets (and _flush_ctl closes) the raw descriptors of the worker's ends
        self._queue_msg(json.dumps({"op": "spawn", "spec": spec}).encode(), [theirs.detach(), out_w, fd_theirs.detach(), board_fd])

    def send(self, worker: Worker, parts: list[Any], fd: int | None = None) -> None:
        link: WorkerLink = worker.handle
        if link.channel is None:
            return
        if fd is not None and link.fd_sock is not None:
            # before the CALL is queued: the worker reads its file from here when it reads the CALL
            try:
                link.fd_sock.sendmsg([b"F"], sharedfile.rights([fd]))
            except OSError as exc:  # gone (its exit report follows), or a queue that cannot be full
                log.error("worker=%s pool=%s could not be sent a shared file (%s); killing it", worker.id, self.name, exc)
                if worker.pid is not None:
                    self._signal(worker.pid, signal.SIGKILL)
        link.channel.write(parts)

    def cancel(self, worker: Worker, job_id: int) -> None:
        """Post ``job_id`` on the worker's cancel board: it will not start that call from now on,
        and a SIGINT (``interrupt``) interrupts it if it runs."""
        link: WorkerLink = worker.handle
        if link is not None and link.board is not None:
            link.board.post(job_id)

    def interrupt(self, worker: Worker) -> None:
        """SIGINT the worker (through the template, as every signal: never a recycled pid)."""
        if worker.pid is not None:
            self._signal(worker.pid, signal.SIGINT)

    def drain(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        if link is not None and link.channel is not None and not link.channel.closed:
            link.channel.drain()

    def kill(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        if worker in self._pending:
            self._pending.remove(worker)
            self._worker_gone(worker, None)
            return
        if worker.pid is None:
            return  # "spawned" arrives later and calls kill() again
        self._signal(worker.pid, signal.SIGTERM)
        if link.sigkill_timer is None:
            link.sigkill_timer = self.loop.call_later(self.daemon.kill_grace, self._signal, worker.pid, signal.SIGKILL)

    def retire(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        if worker in self._pending:
            self._pending.remove(worker)
            self._worker_gone(worker, None)
            return
        if link.channel is not None:
            link.channel.close_after_flush()

    def rss(self, worker: Worker) -> int | None:
        """The worker's private resident memory (RssAnon: its heap and objects), what ``max_rss``
        limits. Mapped files do not count: a call's shared file is the client's memory too, and
        a worker keeps the last few mapped (pool/wire/sharedfile.py)."""
        if worker.pid is None:
            return None
        try:
            return heap.private_rss(worker.pid)
        except (OSError, ValueError, IndexError):
            return None

    def _signal(self, pid: int, sig: int) -> None:
        self._queue_msg(json.dumps({"op": "kill", "pid": pid, "signal": int(sig)}).encode(), [])

    # -- per-worker I/O ---------------------------------------------------------------

    def _on_output(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        fd = link.out_fd
        if fd is None:
            return
        try:
            data = os.read(fd, 65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close_output(worker)
            return
        buf = link.out_buf
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            self._log_line(worker, bytes(buf[:nl]))
            del buf[: nl + 1]
        if len(buf) > OUTPUT_LINE_MAX:
            self._log_line(worker, bytes(buf))
            buf.clear()

    def _log_line(self, worker: Worker, line: bytes) -> None:
        log.info("worker=%s pool=%s output: %s", worker.id, self.name, line.decode("utf-8", "replace").rstrip("\r"))

    def _close_output(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        if link.out_fd is None:
            return
        self.loop.remove_reader(link.out_fd)
        if link.out_buf:
            self._log_line(worker, bytes(link.out_buf))
            link.out_buf.clear()
        os.close(link.out_fd)
        link.out_fd = None

    def channel_closed(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        if link.exited or link.eof_timer is not None:
            return
        if self.dispatcher is not None:
            self.dispatcher.on_worker_lost(worker)
        if worker.state != WorkerState.DRAINING and worker.pid is not None:
            # A worker that lost its channel (it closed or replaced its own fd, say) can never
            # answer again; waiting for its exec timeout would only hold a caller hostage.
            log.warning("worker=%s pool=%s lost its channel; killing it", worker.id, self.name)
            self._signal(worker.pid, signal.SIGKILL)
        # The exit report normally follows within milliseconds; do not hang on it forever.
        link.eof_timer = self.loop.call_later(EXIT_REPORT_WAIT, self._exit_report_missing, worker)

    def _exit_report_missing(self, worker: Worker) -> None:
        link: WorkerLink = worker.handle
        link.eof_timer = None
        if link.exited:
            return
        log.warning("worker=%s pool=%s channel closed but no exit was reported; killing it", worker.id, self.name)
        if worker.pid is not None:
            self._signal(worker.pid, signal.SIGKILL)
        self._worker_gone(worker, None)

    def _worker_gone(self, worker: Worker, code: int | None) -> None:
        link: WorkerLink = worker.handle
        if link is None or link.exited:
            return
        link.exited = True
        for timer in (link.sigkill_timer, link.eof_timer):
            if timer is not None:
                timer.cancel()
        if worker.pid is not None:
            self._by_pid.pop(worker.pid, None)
        if link.channel is not None:
            # Everything it sent before it died is in our receive queue: deliver it before the
            # exit is reported, so a finished call is answered as finished, not as crashed.
            if not link.channel.closed:
                if self.dispatcher is not None:
                    self.dispatcher.on_worker_lost(worker)  # nothing new may be given to it meanwhile
                link.channel.drain()
            link.channel.close()
        if link.fd_sock is not None:
            link.fd_sock.close()  # files still queued on it are the kernel's to release
            link.fd_sock = None
        if link.board is not None:
            link.board.close()
            link.board = None
        if link.out_fd is not None:
            self._on_output(worker)  # last words first: they often explain the exit
            self._close_output(worker)
        if self.dispatcher is not None:
            self.dispatcher.on_worker_exit(worker, code)

    # -- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the template; it SIGKILLs any worker still alive as its control socket closes."""
        self.closing = True
        if self._restart_timer is not None:
            self._restart_timer.cancel()
        if self.env is not None:
            self.env.close()  # stops a build only this pool waits for; releases the env for `cruised env prune`
        self._close_ctl()
        for w in list(self._by_pid.values()):
            self._worker_gone(w, None)

    async def wait_template(self, timeout: float) -> None:
        """After close(): give the template ``timeout`` to exit, then SIGKILL it; always reap."""
        proc = self.template
        if proc is None:
            return
        deadline = self.loop.time() + timeout
        while proc.poll() is None and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if self._pidfd is not None:
            self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self.template = None

    def worker_count(self) -> int:
        return len(self._by_pid)


class _WorkerSink:
    """Frames from one worker, into the dispatcher."""

    __slots__ = ("dispatcher", "launcher", "worker")

    def __init__(self, dispatcher: Dispatcher, launcher: PoolLauncher, worker: Worker) -> None:
        self.dispatcher = dispatcher
        self.launcher = launcher
        self.worker = worker

    def on_frame(self, channel: Channel, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        if kind == Kind.REPLY:
            if status == Status.PRELOAD_FAILED:
                info, _ = frames.parse_error(buf)
                err = json.loads(info)
                self.dispatcher.on_worker_preload_failed(self.worker, f"{err['type']}: {err['message']}")
                return
            self.dispatcher.on_worker_reply(self.worker, buf, status, reqid)
        elif kind == Kind.READY:
            self.dispatcher.on_worker_ready(self.worker, json.loads(bytes(buf[frames.HEADER_SIZE :])))
        elif kind == Kind.STATE:
            try:
                info = json.loads(bytes(buf[frames.HEADER_SIZE :]))
            except ValueError:
                info = None
            if not isinstance(info, dict):
                log.error("worker=%s sent a malformed STATE frame; killing it", self.worker.id)
                self.dispatcher.on_worker_violation(self.worker)
                return
            self.dispatcher.on_worker_state(self.worker, info)
        else:
            log.error("worker=%s sent unexpected frame kind %s; killing it", self.worker.id, kind)
            self.dispatcher.on_worker_violation(self.worker)

    def on_peer_gone(self, channel: Channel) -> None:
        self.dispatcher.on_worker_lost(self.worker)  # before its last replies are delivered

    def on_close(self, channel: Channel, error: BaseException | None) -> None:
        self.launcher.channel_closed(self.worker)
