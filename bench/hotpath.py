"""Per-call CPU of each process on cruised's hot path: ``python -m bench.hotpath [--py-spy]``.

Runs sync calls and a pipelined ``map`` of ``add10`` against a 2-worker pool
and divides each process's CPU time (``/proc/<pid>/stat`` utime + stime) by
the number of calls: client, supervisor, workers. With ``--py-spy`` it also
records a flame graph of the supervisor during the pipelined run (needs
py-spy and ptrace permission) into bench/out/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from . import funcs, stats
from .daemon import BenchDaemon

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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--py-spy", action="store_true")
    ap.add_argument("--profile", choices=["sync", "map"], default="map", help="which run --py-spy samples")
    args = ap.parse_args()
    import cruised

    d = BenchDaemon(2, with_http=False).start()
    try:
        st = d.status()["pools"]["fast"]
        wpids = [w["pid"] for w in st["worker_list"]]
        s = cruised.session(socket=d.socket, pool="fast")
        f = cruised.function(s)(funcs.add10)
        for i in range(500):
            f(i)
        procs = {"client": os.getpid(), "supervisor": d.pid, **{f"worker{i}": p for i, p in enumerate(wpids)}}

        def measure(label: str, fn: "callable", n: int) -> None:
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
                f(i)
                lat.append(time.perf_counter() - t)
            sm = stats.summary_us(lat)
            return f"p50 {sm['p50_us']:.0f} µs p99 {sm['p99_us']:.0f} µs"

        def mapped(n: int) -> str:
            res = list(s.map(f, range(n), window=32))
            assert res[-1] == n - 1 + 10
            return "window 32"

        spy = None
        stamp = time.strftime("%H%M%S")
        out = Path(__file__).resolve().parent / "out" / f"supervisor-{stamp}.txt"
        out.parent.mkdir(exist_ok=True)

        def start_spy() -> subprocess.Popen[bytes]:
            py_spy = str(Path(sys.executable).with_name("py-spy"))
            # collapsed stacks (one line per stack with its sample count): greppable, and flamegraph.pl reads them
            proc = subprocess.Popen([py_spy, "record", "-r", "1000", "-f", "raw", "-o", str(out), "-p", str(d.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            return proc

        if args.py_spy and args.profile == "sync":
            spy = start_spy()
        measure("sync", sync, min(args.n, 5000))
        if args.py_spy and args.profile == "map":
            spy = start_spy()
        measure("map", mapped, args.n)
        if spy is not None:
            spy.send_signal(2)
            spy.wait(30)
            print(f"supervisor profile: {out}")
            print(top_frames(out))
        s.close()
    finally:
        d.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
