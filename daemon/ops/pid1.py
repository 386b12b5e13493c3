"""cruised as PID 1 of a container: a minimal init in front of the supervisor, no shim needed.

In a container (a new PID namespace: a pod, ``docker run``, ``unshare --pid``)
the entrypoint is PID 1, and PID 1 has two duties no other process has:

* every orphan of the namespace is reparented to it, and stays a zombie until
  PID 1 waits for it (a shipped function that double-forks leaves one);
* the kernel gives it no default signal actions: a SIGTERM with no handler is
  dropped, so the kubelet's stop request would do nothing until SIGKILL.

Why the supervisor does not simply reap orphans itself: its own children need
their exit statuses. A pool's template is a ``subprocess.Popen`` whose exit the
launcher sees through a pidfd and then reads with ``Popen.wait()``; a code
env's build is an asyncio subprocess whose watcher waits for that pid. A
``waitpid(-1)`` in the supervisor takes whichever zombie comes first, a
template's included (``Popen.wait()`` then reports 0 for a crash), and uvloop
refuses a SIGCHLD handler outright (it tracks its subprocesses with one).
Telling an adopted orphan from an own child would need a registry that every
spawner, present and future, must keep.

So, as PID 1, ``cruised serve`` forks once, first thing, while it is still a
single thread with no event loop (the fork is as safe as an exec). The child
is the supervisor, unchanged. The parent stays PID 1 and does only init's
work: it forwards signals to the supervisor and reaps with ``waitpid(-1)``.
Every process it can ever wait for is the supervisor or an orphan, so it
steals no one's status. When the supervisor exits, PID 1 exits with its code
(128+N for a signal, as a shell reports it), and the kernel SIGKILLs whatever
is left in the namespace. This is tini's design (what ``docker --init``
adds), built in.

Signals are blocked and taken with ``sigwaitinfo``, SIGCHLD included: one
loop, no handler running between bytecodes, and nothing lost between the fork
and the loop (blocked signals queue, and a blocked signal is never dropped for
PID 1). A signal the terminal driver sent (``si_code`` SI_KERNEL: Ctrl-C,
Ctrl-\\, hangup) already reached the supervisor, which shares our foreground
process group; forwarding it again would make one Ctrl-C count as the second
SIGINT, the supervisor's fast-shutdown request. Everything else (the
container runtime's SIGTERM, ``kill -HUP 1`` for a reload) is forwarded.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger("cruised.pid1")

#: what the supervisor acts on (TERM/INT: stop gracefully, HUP: reload, USR1: memory report), plus
#: the ones whose default action should still reach it (QUIT, USR2)
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
SI_KERNEL = 0x80  # siginfo si_code of a signal the kernel itself raised (the tty driver's)
#: systemd-style variables that name the pid they are meant for: the supervisor's, not ours
_PID_VARIABLES = ("LISTEN_PID", "WATCHDOG_PID")


def serve_as_init() -> None:
    """Call first thing in ``cruised serve``. Not PID 1: returns at once. PID 1: forks; returns in
    the child, which goes on to be the supervisor, while this process stays init until the
    supervisor exits and then exits with its code (it never returns)."""
    if os.getpid() != 1:
        return
    watched = {*FORWARDED, signal.SIGCHLD}
    before = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
        for name in _PID_VARIABLES:
            if os.environ.get(name) == "1":
                os.environ[name] = str(os.getpid())
        return
    code = _init(child, watched)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _init(supervisor: int, watched: set[signal.Signals]) -> int:
    """PID 1's loop: forward signals to ``supervisor``, reap every child; its exit code once it exits."""
    log.info("pid 1: the supervisor runs as pid %s; this process forwards signals and reaps orphans", supervisor)
    while True:
        info = signal.sigwaitinfo(watched)
        sig = info.si_signo
        if sig == signal.SIGCHLD:
            code = _reap(supervisor)
            if code is not None:
                return code
        elif info.si_code != SI_KERNEL:
            try:
                os.kill(supervisor, sig)
            except ProcessLookupError:
                pass  # exiting: its SIGCHLD is queued


def _reap(supervisor: int) -> int | None:
    """Wait for every child that has exited (SIGCHLDs coalesce); the supervisor's exit code if it was one."""
    code = None
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return code
        if pid == 0:
            return code
        if pid == supervisor:
            exit_code = os.waitstatus_to_exitcode(status)
            code = 128 - exit_code if exit_code < 0 else exit_code
            log.info("pid 1: the supervisor exited (code %s)", code)
        else:
            log.debug("pid 1: reaped orphan pid %s (status %s)", pid, status)
