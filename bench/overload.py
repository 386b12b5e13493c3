"""The overload row: an open-loop load at twice a pool's capacity, every reply accounted for.

cruised is driven over the raw native protocol (pool/wire/frames.py), not the
client library, so the count of requests without exactly one reply is
observed directly: every CALL gets a unique request id, a reader thread
counts replies per id, and after the run (plus the longest a reply may
legitimately take) an id with zero or two replies is a failure of the
"every accepted job is answered exactly once" invariant.

The sender is open-loop: request i leaves at ``t0 + i / rate`` whatever the
replies do, so the daemon sees the offered load rather than a load throttled
by its own latency. ProcessPoolExecutor gets the same schedule through
``submit`` (it has no admission control: every call is accepted and waits).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from cruised.client import shipping
from cruised.pool.wire import bundle, frames
from cruised.pool.wire.frames import Kind, Status

from . import funcs, stats
from .floor import FrameReader


def _pace(t0: float, i: int, rate: float) -> float:
    target = t0 + i / rate
    while True:
        now = time.monotonic()
        if now >= target:
            return now
        if target - now > 0.002:
            time.sleep(target - now - 0.001)


def cruised_overload(sock_path: str, pool: str, rate: float, duration: float, service_ms: float, queue_timeout: float) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    reader = FrameReader(s)
    blob = shipping.dump_function(funcs.nap)
    key = shipping.function_key(blob, {})
    meta = b'{"python": "%s", "libraries": {}, "name": "nap"}' % shipping.PYTHON.encode()
    reg = frames.register_head(pool, key, meta) + blob
    s.sendall(frames.frame(Kind.REGISTER, 1, reg))
    f = reader.read()
    assert f is not None and frames.HEADER.unpack_from(f)[3] == Status.OK, "REGISTER refused"
    payload = frames.call_head(pool, 0, key) + b"".join(bytes(p) for p in bundle.pack(((service_ms,), {})))
    n = int(rate * duration)
    sent_at = [0.0] * n
    replies = [0] * n
    status = [-1] * n
    done_at = [0.0] * n
    base = 100  # request ids base+i
    finished = threading.Event()

    def read() -> None:
        got = 0
        while True:
            try:
                fr = reader.read()
            except (TimeoutError, OSError):
                return
            if fr is None:
                return
            now = time.monotonic()
            _, _, _, st, rid = frames.HEADER.unpack_from(fr)
            i = rid - base
            if 0 <= i < n:
                replies[i] += 1
                if replies[i] == 1:
                    status[i] = st
                    done_at[i] = now
                    got += 1
                    if got == n:
                        finished.set()

    s.settimeout(None)
    th = threading.Thread(target=read, daemon=True)
    th.start()
    t0 = time.monotonic() + 0.05
    for i in range(n):
        sent_at[i] = _pace(t0, i, rate)
        s.sendall(frames.frame(Kind.CALL, base + i, payload))
    send_end = time.monotonic()
    # the last reply may take a queue timeout plus one service time; then linger for duplicates
    finished.wait(queue_timeout + service_ms / 1000 + 5.0)
    time.sleep(0.3)
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    th.join(5)
    return summarise(n, rate, duration, send_end - t0, sent_at, done_at, status, replies)


def summarise(
    n: int, rate: float, duration: float, send_s: float, sent_at: list[float], done_at: list[float], status: list[int], replies: list[int]
) -> dict[str, Any]:
    ok = [done_at[i] - sent_at[i] for i in range(n) if replies[i] >= 1 and status[i] == Status.OK]
    rejected = sum(1 for i in range(n) if replies[i] >= 1 and status[i] in (Status.QUEUE_FULL, Status.QUEUE_TIMEOUT))
    other = sum(1 for i in range(n) if replies[i] >= 1 and status[i] not in (Status.OK, Status.QUEUE_FULL, Status.QUEUE_TIMEOUT))
    missing = sum(1 for r in replies if r == 0)
    dup = sum(1 for r in replies if r > 1)
    lat = stats.summary_us(ok)
    return {
        "offered_per_s": rate,
        "duration_s": duration,
        "sent": n,
        "send_s": round(send_s, 3),
        "accepted": len(ok),
        "rejected": rejected,
        "other_errors": other,
        "rejection_fraction": rejected / n if n else 0.0,
        "accepted_p50_ms": lat.get("p50_us", float("nan")) / 1e3,
        "accepted_p99_ms": lat.get("p99_us", float("nan")) / 1e3,
        "not_exactly_one_reply": missing + dup,
        "missing": missing,
        "duplicated": dup,
    }


def ppe_overload(rate: float, duration: float, service_ms: float, workers: int) -> dict[str, Any]:
    from concurrent.futures import ProcessPoolExecutor

    n = int(rate * duration)
    sent_at = [0.0] * n
    done_at = [0.0] * n
    replies = [0] * n
    status = [-1] * n
    with ProcessPoolExecutor(max_workers=workers) as ex:
        list(ex.map(funcs.nap, [1] * workers * 4))  # workers up

        def done(i: int) -> Any:
            def cb(fut: Any) -> None:
                done_at[i] = time.monotonic()
                replies[i] += 1
                status[i] = Status.OK if fut.exception() is None else Status.ERROR

            return cb

        t0 = time.monotonic() + 0.05
        for i in range(n):
            sent_at[i] = _pace(t0, i, rate)
            ex.submit(funcs.nap, service_ms).add_done_callback(done(i))
        send_end = time.monotonic()
    return summarise(n, rate, duration, send_end - t0, sent_at, done_at, status, replies)
