"""The invariant checker used by every chaos, overload and soak scenario.

Invariants (issue: reliability):
  1. every accepted request gets exactly one reply, to the caller that sent it;
  2. nothing runs twice;
  3. a request that was rejected or timed out in the queue never ran;
  4. the daemon's own memory and fd count stay bounded.

How it sees them: ``RawClient`` speaks the native protocol directly (the
friendly client would hide a duplicate or stray reply), pipelines CALLs, and
records each reply by request id. Every call runs ``ledger_call(path, token)``,
which appends its unique token to a ledger file (one ``O_APPEND`` write per
run) and returns the token, so a reply carrying another request's token is a
misroute, and the ledger tells what actually ran and how often.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cruised.client import shipping
from cruised.pool.wire import bundle, frames
from cruised.pool.wire.frames import Kind, Status

NEVER_RAN = {Status.QUEUE_FULL, Status.QUEUE_TIMEOUT, Status.SHUTTING_DOWN, Status.UNKNOWN_FUNCTION, Status.NO_SUCH_POOL}


def ledger_call(path: str, token: str, mode: str = "ok", arg: float = 0.0) -> str:
    """The function every checked request runs. ``mode`` injects a behaviour after the ledger write."""
    import os as _os

    fd = _os.open(path, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT, 0o644)
    try:
        _os.write(fd, (token + "\n").encode())
    finally:
        _os.close(fd)
    if mode == "sleep":
        import time as _t

        _t.sleep(arg)
    elif mode == "crash":
        _os._exit(13)
    elif mode == "raise":
        raise ValueError(token)
    elif mode == "hang":
        import time as _t

        _t.sleep(3600)
    elif mode == "q":
        q("til 3")  # noqa: F821 - the worker's q global: raises QConnectionError while q is down
    return token


@dataclass
class Outcome:
    token: str
    status: int | None = None
    replies: int = 0
    value: Any = None
    message: str = ""  # a refusal's message (a CANCELLED one says whether the call ran)


@dataclass
class Report:
    sent: int = 0
    by_status: Counter = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        names = {s: Status.name(s) for s in Status}
        counts = ", ".join(f"{names.get(k, k)}={v}" for k, v in sorted(self.by_status.items(), key=lambda kv: str(kv[0])))
        return f"sent={self.sent} [{counts}] violations={len(self.violations)}" + "".join(f"\n  - {v}" for v in self.violations[:20])


class RawClient:
    """A pipelining native-protocol client that records every reply it gets."""

    def __init__(self, path: str, ledger: str, pool: str = "default", timeout_ms: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.ledger = ledger
        self.pool = pool
        self.timeout_ms = timeout_ms
        self.outcomes: dict[int, Outcome] = {}
        self.stray: list[str] = []
        self.lock = threading.Lock()
        self._ids = iter(range(1, 1 << 62))
        blob = shipping.dump_function(ledger_call)
        self.key = shipping.function_key(blob, {})
        meta = json.dumps({"python": shipping.PYTHON, "libraries": {}, "name": "ledger_call"}).encode()
        self._register = frames.frame(Kind.REGISTER, 0, frames.register_head(pool, self.key, meta) + blob)
        self.sock.sendall(self._register)
        self.closed = False
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def call(self, token: str, mode: str = "ok", arg: float = 0.0) -> int:
        rid = next(self._ids)
        parts = bundle.pack(((self.ledger, token, mode, arg), {}))
        head = frames.call_head(self.pool, self.timeout_ms, self.key)
        payload = head + b"".join(bytes(p) for p in parts)
        with self.lock:
            self.outcomes[rid] = Outcome(token)
        self.sock.sendall(frames.frame(Kind.CALL, rid, payload))
        return rid

    def cancel(self, rid: int) -> None:
        """Withdraw call ``rid`` (Kind.CANCEL): it still gets exactly one reply."""
        self.sock.sendall(frames.frame(Kind.CANCEL, rid))

    def outstanding(self) -> list[int]:
        """Request ids still without a reply."""
        with self.lock:
            return [rid for rid, o in self.outcomes.items() if o.replies == 0]

    def pending(self) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes.values() if o.replies == 0)

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.closed = True
                return
            buf += chunk
            while len(buf) >= frames.HEADER_SIZE:
                total, _kind, status, reqid = frames.parse_header(buf, 1 << 40)
                if len(buf) < total:
                    break
                frame, buf = bytearray(buf[:total]), buf[total:]
                self._record(frame, status, reqid)

    def _record(self, frame: bytearray, status: int, reqid: int) -> None:
        if reqid == 0:  # the REGISTER ack (or a connection-level refusal)
            if status != Status.OK:
                self.stray.append(f"connection-level refusal {status}: {bytes(frame[16:80])!r}")
            return
        with self.lock:
            o = self.outcomes.get(reqid)
        if o is None:
            self.stray.append(f"reply for unknown request id {reqid}")
            return
        o.replies += 1
        o.status = status
        if status == Status.OK:
            o.value = bundle.unpack(frame, frames.HEADER_SIZE)
        elif status != Status.ERROR:
            o.message = bytes(frame[frames.HEADER_SIZE :]).decode(errors="replace")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.reader.join(5)


def check(clients: list[RawClient], ledger: str, disconnected: set[int] | None = None) -> Report:
    """Judge everything the clients saw against the ledger. ``disconnected``: ids of clients that left mid-run."""
    disconnected = disconnected or set()
    rep = Report()
    ran = Counter()
    try:
        with open(ledger) as fh:
            ran.update(line.strip() for line in fh if line.strip())
    except FileNotFoundError:
        pass
    for token, n in ran.items():
        if n > 1:
            rep.violations.append(f"{token} ran {n} times")
    for ci, c in enumerate(clients):
        rep.violations.extend(c.stray)
        for rid, o in c.outcomes.items():
            rep.sent += 1
            if o.replies == 0:
                if ci not in disconnected:
                    rep.violations.append(f"{o.token} (request {rid}) got no reply")
                rep.by_status["no reply (client left)" if ci in disconnected else "missing"] += 1
                continue
            rep.by_status[o.status] += 1
            if o.replies > 1:
                rep.violations.append(f"{o.token} got {o.replies} replies")
            if o.status == Status.OK and o.value != o.token:
                rep.violations.append(f"{o.token} got another request's result {o.value!r}")
            if o.status in NEVER_RAN and ran[o.token]:
                rep.violations.append(f"{o.token} was answered {Status.name(o.status)} but ran")
            if o.status == Status.CANCELLED and "never ran" in o.message and ran[o.token]:
                rep.violations.append(f"{o.token} was answered {o.message} but ran")
            if o.status == Status.OK and ran[o.token] != 1:
                rep.violations.append(f"{o.token} succeeded but ran {ran[o.token]} times")
    return rep


class BusyKiller(threading.Thread):
    """SIGKILLs a random busy worker of ``pool`` every ``every`` seconds (at most ``limit`` times) until stopped."""

    def __init__(self, status: Callable[[], dict[str, Any]], every: float, seed: int, limit: int | None = None, pool: str = "default") -> None:
        super().__init__(name="busy-killer", daemon=True)
        self.status, self.every, self.limit, self.pool = status, every, limit, pool
        self.rng = random.Random(seed)
        self.kills = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every) and (self.limit is None or self.kills < self.limit):
            busy = [w["pid"] for w in self.status()["pools"][self.pool]["worker_list"] if w["pid"] and w["state"] == "busy"]
            if busy:
                try:
                    os.kill(self.rng.choice(busy), signal.SIGKILL)
                    self.kills += 1
                except ProcessLookupError:
                    pass

    def stop(self) -> int:
        """Stop and return how many workers it killed."""
        self.stopped.set()
        self.join(10)
        return self.kills


def resources(pid: int) -> tuple[int, int]:
    """(RSS bytes, open fds) of a process."""
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def memfds(pid: int | str = "self", name: str = "cruised-call") -> int:
    """Descriptors of shared files (memfds, pool/wire/sharedfile.py) a process holds open; a mapped
    file has two (mmap keeps a duplicate of its descriptor). ``name``: ``cruised-cancel-`` counts
    the supervisor's worker cancel boards instead (pool/interrupt.py: one per live worker)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(f"/memfd:{name}")
        except OSError:
            pass  # closed meanwhile
    return n


def drive(
    clients: list[RawClient], seconds: float, max_inflight: int, pick_mode: Callable[[int], tuple[str, float]], stop: threading.Event | None = None
) -> None:
    """Each client keeps up to ``max_inflight`` calls outstanding for ``seconds`` (bounded)."""
    deadline = time.monotonic() + seconds
    counters = [0] * len(clients)

    def run(i: int) -> None:
        c = clients[i]
        while time.monotonic() < deadline and not c.closed and not (stop and stop.is_set()):
            if c.pending() >= max_inflight:
                time.sleep(0.001)
                continue
            counters[i] += 1
            mode, arg = pick_mode(counters[i])
            try:
                c.call(f"c{i}-{counters[i]}", mode, arg)
            except OSError:
                return

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)


def settle(clients: list[RawClient], timeout: float, skip: set[int] | None = None) -> None:
    """Wait until every still-connected client has all its replies (or ``timeout``)."""
    skip = skip or set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(c.pending() == 0 or c.closed or i in skip for i, c in enumerate(clients)):
            return
        time.sleep(0.02)


def settle_and_check(clients: list[RawClient], ledger: str, timeout: float = 60) -> Report:
    """The end of every scenario: wait for the replies, judge them against the ledger, hang up."""
    settle(clients, timeout)
    rep = check(clients, ledger)
    for c in clients:
        c.close()
    return rep
