"""Per-call CPU of each process on cruised's hot path: ``python -m bench.hotpath [--http] [--py-spy ...]``.

Native door (default): sync calls, a pipelined ``map`` and an asyncio
``amap`` of ``add10`` against a 2-worker pool. ``--http``: sync calls of the ``bench/add10``
endpoint through the HTTP door's Unix socket, with the keep-alive client of
the benchmark's ``cruised-http`` row (bench/systems.py HTTPDoor, a lean
HTTP/1.1 client), or with ``--client stdlib`` that of ``cruised-http-stdlib``
(http.client).

Each process's CPU time (``/proc/<pid>/stat`` utime + stime) is divided by
the number of calls: client, supervisor, workers. ``--py-spy supervisor``
(or ``worker``, or both, comma-separated) records collapsed stacks of that
process during the last measured run (needs py-spy and ptrace permission)
into bench/out/ and prints the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import funcs, stats
from .daemon import BenchDaemon
from .systems import HTTPDoor, HTTPDoorStdlib

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return int(f[11]) / TICK, int(f[12]) / TICK


def top_frames(path: Path, n: int = 25) -> str:
    """Self and inclusive sample share per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + c
    rows = sorted(own.items(), key=lambda kv: -kv[1])[:n]
    return "\n".join(f"{c / total:6.1%} self {incl[f] / total:6.1%} incl  {f}" for f, c in rows)


class Spy:
    """py-spy on some processes while a block runs; prints each profile's top functions after."""

    def __init__(self, targets: dict[str, int]) -> None:
        self.targets = targets
        self.procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Spy:
        stamp = time.strftime("%H%M%S")
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        for label, pid in self.targets.items():
            out = Path(__file__).resolve().parent / "out" / f"{label}-{stamp}.txt"
            out.parent.mkdir(exist_ok=True)
            # collapsed stacks (one line per stack with its sample count): greppable, and flamegraph.pl reads them
            cmd = [py_spy, "record", "-r", "1000", "-f", "raw", "-o", str(out), "-p", str(pid)]
            self.procs.append((label, out, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        if self.procs:
            time.sleep(1.0)  # py-spy attaches before the measured calls start
        return self

    def __exit__(self, *exc: object) -> None:
        for label, out, proc in self.procs:
            proc.send_signal(2)
            proc.wait(30)
            print(f"{label} profile: {out}")
            print(top_frames(out))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--http", action="store_true", help="call the bench/add10 endpoint through the HTTP door")
    ap.add_argument("--client", choices=["lean", "stdlib"], default="lean", help="--http: the HTTP client (bench/systems.py)")
    ap.add_argument("--py-spy", default="", help="comma-separated: supervisor, worker (the native run profiles the pipelined map)")
    ap.add_argument("--rounds", type=int, default=1, help="sync runs in a row (each printed)")
    args = ap.parse_args()
    import cruised

    d = BenchDaemon(2, with_http=args.http).start()
    try:
        st = d.status()["pools"]["fast"]
        wpids = [w["pid"] for w in st["worker_list"]]
        s = cruised.session(socket=d.socket, pool="fast")
        if args.http:
            door = HTTPDoor(d.http_socket) if args.client == "lean" else HTTPDoorStdlib(d.http_socket)
            call: Callable[[int], object] = lambda i: door.call("add10", i)  # noqa: E731 - the timed body, chosen per branch
        else:
            f = cruised.function(s)(funcs.add10)
            call = f
        for i in range(500):
            assert call(i) == i + 10
        procs = {"client": os.getpid(), "supervisor": d.pid, **{f"worker{i}": p for i, p in enumerate(wpids)}}
        wanted = {t.strip() for t in args.py_spy.split(",") if t.strip()}
        spied = {k: p for k, p in procs.items() if k == "supervisor" and "supervisor" in wanted}
        if "worker" in wanted:
            spied.update({k: p for k, p in procs.items() if k.startswith("worker")})

        def measure(label: str, fn: Callable[[int], str], n: int) -> None:
            before = {k: cpu_s(p) for k, p in procs.items()}
            t = time.perf_counter()
            extra = fn(n)
            dt = time.perf_counter() - t
            after = {k: cpu_s(p) for k, p in procs.items()}
            per = {k: [(after[k][i] - before[k][i]) / n * 1e6 for i in (0, 1)] for k in procs}
            wsum = [sum(v[i] for k, v in per.items() if k.startswith("worker")) for i in (0, 1)]

            def fmt(v: list[float]) -> str:
                return f"{v[0] + v[1]:.0f} ({v[0]:.0f} user + {v[1]:.0f} sys)"

            print(f"{label}: {n / dt:,.0f} calls/s {extra}; CPU µs/call: client {fmt(per['client'])}, supervisor {fmt(per['supervisor'])}, workers {fmt(wsum)}")

        def sync(n: int) -> str:
            lat = []
            for i in range(n):
                t = time.perf_counter()
                call(i)
                lat.append(time.perf_counter() - t)
            sm = stats.summary_us(lat)
            return f"p50 {sm['p50_us']:.0f} µs p90 {sm['p90_us']:.0f} µs p99 {sm['p99_us']:.0f} µs"

        def mapped(n: int) -> str:
            res = list(s.map(f, range(n), window=32))
            assert res[-1] == n - 1 + 10
            return "window 32"

        def amapped(n: int) -> str:
            async def run() -> list[int]:
                return [r async for r in s.amap(f, range(n), window=32)]

            res = asyncio.run(run())
            assert res[-1] == n - 1 + 10
            return "window 32"

        label = f"http sync ({args.client} client)" if args.http else "sync"
        for r in range(args.rounds):
            last_sync = args.http and r == args.rounds - 1
            with Spy(spied if last_sync else {}):
                measure(label, sync, min(args.n, 5000))
        if not args.http:
            with Spy(spied):
                measure("map", mapped, args.n)
            measure("amap", amapped, args.n)
        if args.http:
            door.close()
        s.close()
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
