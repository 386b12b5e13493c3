"""Instructions per call of one hot-path process, counted by callgrind: ``python -m bench.callgrind``.

Wall-clock and CPU-time A/Bs on a shared machine move by ±20% from run to
run; an instruction count does not care how loaded the machine is. This
script starts the benchmark daemon (bench/daemon.py, the same pools and HTTP
door as ``bench.hotpath``) and counts the instructions one process executes
per call, with valgrind's callgrind:

* ``--process supervisor`` (default): the supervisor runs under
  ``valgrind --tool=callgrind --instr-atstart=no``; after a warm-up,
  ``callgrind_control -i on``/``off`` brackets the measured calls and
  ``callgrind_control -d`` dumps the window's total.
* ``--process client``: this script re-runs itself under callgrind (the
  daemon it starts runs natively) and brackets its own calls the same way.
  Starting ``callgrind_control`` costs the client itself some instructions,
  so an empty window's count is subtracted.
* ``--process worker``: the ``fast`` pool's interpreter is a wrapper that
  runs its template under callgrind with instrumentation on, so the workers
  it forks count everything from their fork. callgrind_control cannot reach
  a forked process, so the worker figure is a difference: the workers' totals
  at exit, summed, for a daemon that served ``2n`` measured calls of the case
  minus one that served ``n`` (same warm-up), divided by ``n``.

Cases: ``sync`` (one ``add10`` call at a time through a ``@cruised.function``)
and ``map`` (``Session.map(window=32)``), or with ``--http`` the ``bench/add10``
endpoint through the HTTP door with the benchmark's lean keep-alive client.
Each window is measured ``--rounds`` times; the figures of a sync window agree
to a fraction of a percent, a map window's depend a little on how many frames
each read finds (timing). The processes run with ``PYTHONHASHSEED=0``
(``--hash-seed``): with random seeds the same code's count moves by 1-3% from
daemon to daemon, so compare two versions over a few seeds. The supervisor and client windows also count what
their timers do while the window is open (a few thousand instructions per
second idle: ``--idle`` measures it).

valgrind 3.19 does not know ``pidfd_open`` (the launcher watches each
template through a pidfd): the process under callgrind gets a
``sitecustomize`` (in a temp dir on ``PYTHONPATH``) that, only when the call
fails with ENOSYS, returns a pipe that never becomes readable instead. The
template's exit is then not noticed through it, which a benchmark run never
needs (shutdown polls ``Popen.poll()``).

Requires valgrind (``apt-get install valgrind``). Slow: under callgrind the
supervisor runs about 50x slower, so keep ``--n`` in the thousands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from . import funcs
from .daemon import BenchDaemon
from .systems import HTTPDoor

SHIM = """\
import errno, os
def _cruised_bench_pidfd_shim():
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            return
        keep = []
        def pidfd_open(pid, flags=0):
            r, w = os.pipe()
            keep.append(w)  # never written: the template's exit goes unnoticed (bench only)
            return r
        os.pidfd_open = pidfd_open
_cruised_bench_pidfd_shim()
"""

INNER = "CRUISED_BENCH_CALLGRIND_INNER"


def valgrind(out: Path, instr_on: bool = False) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        f"--instr-atstart={'yes' if instr_on else 'no'}",
        f"--callgrind-out-file={out}/callgrind.out.%p",
        "--log-file=" + str(out / "valgrind.%p.log"),
    ]


def control(pid: int, *args: str) -> None:
    r = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0 or "OK" not in r.stdout:
        raise RuntimeError(f"callgrind_control {' '.join(args)} {pid}: {r.stdout}{r.stderr}")


def totals(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def window(out: Path, pid: int, body: Callable[[], object], settle: float) -> int:
    """Instructions ``pid`` executed while ``body`` ran (collection on around it, then dumped).

    The supervisor defers some work per call (access lines rendered every 50 ms, observers fed
    in batches every 20 ms): ``settle`` seconds of quiet before the window opens and again
    before it closes put each call's deferred work in the window of that call."""
    before = set(out.glob(f"callgrind.out.{pid}.*"))
    time.sleep(settle)
    control(pid, "-i", "on")
    body()
    time.sleep(settle)
    control(pid, "-i", "off")
    control(pid, "-d")
    deadline = time.monotonic() + 60
    while True:
        new = set(out.glob(f"callgrind.out.{pid}.*")) - before
        if new:
            path = max(new, key=lambda p: int(p.name.rsplit(".", 1)[1]))
            try:
                return totals(path)
            except RuntimeError:
                pass  # still being written
        if time.monotonic() > deadline:
            raise RuntimeError(f"no callgrind dump of {pid} in {out}")
        time.sleep(0.05)


def worker_wrapper(out: Path, shim: Path) -> Path:
    """An interpreter path for the pool: its template runs under callgrind, collecting from the start."""
    path = out / "python-under-callgrind"
    cmd = " ".join(valgrind(out, instr_on=True))
    path.write_text(f'#!/bin/sh\nexport PYTHONPATH={shim}${{PYTHONPATH:+:$PYTHONPATH}}\nexec {cmd} {sys.executable} "$@"\n')
    path.chmod(0o755)
    return path


def run(args: argparse.Namespace, out: Path, shim: Path, measured: dict[str, int] | None = None) -> dict[str, list[float]]:
    """One daemon; per case, the instruction counts per call of the windows. For workers
    (``measured``: calls per case after the warm-up), nothing: their counts are in their dumps."""
    import cruised

    d = BenchDaemon(2, with_http=args.http)
    if args.http and not d.http_socket:
        raise SystemExit(f"no HTTP door: {d.http_note}")
    wrap = valgrind(out) if args.process == "supervisor" else None
    if args.process == "worker":
        cfg = yaml.safe_load(d.config_path.read_text())
        cfg["pools"]["fast"]["python"] = str(worker_wrapper(out, shim))
        d.config_path.write_text(yaml.safe_dump(cfg))
    results: dict[str, list[float]] = {}
    try:
        d.start(timeout=600, wrap=wrap, env={"PYTHONPATH": str(shim)} if wrap else None)
        s = cruised.session(socket=d.socket, pool="fast")
        f = cruised.function(s)(funcs.add10)
        door = HTTPDoor(d.http_socket) if args.http else None

        def sync(n: int) -> None:
            call: Callable[[int], object] = f if door is None else (lambda i: door.call("add10", i))
            for i in range(n):
                call(i)

        def mapped(n: int) -> None:
            res = list(s.map(f, range(n), window=32))
            assert res[-1] == n - 1 + 10

        cases: list[tuple[str, Callable[[int], None], int]] = [("http sync" if door else "sync", sync, args.n)]
        if door is None:
            cases.append(("map", mapped, args.n * args.map_factor))
        for _, fn, n in cases:  # warm-up: specialised bytecode, caches, buffers, files
            fn(min(n, 2000))
        if args.process == "worker":
            assert measured is not None
            for name, fn, _ in cases:
                if measured.get(name):
                    fn(measured[name])
            if door is not None:
                door.close()
            s.close()
            return results
        pid = os.getpid() if args.process == "client" else d.pid
        empty = window(out, pid, lambda: None, args.settle) if args.process == "client" else 0
        if args.idle:
            t = time.monotonic()
            idle = window(out, pid, lambda: time.sleep(args.idle), args.settle) - empty
            print(f"idle: {idle / (time.monotonic() - t):,.0f} instructions/s (window {args.idle}s + settling)", flush=True)
        for name, fn, n in cases:
            for _ in range(args.rounds):
                count = window(out, pid, lambda fn=fn, n=n: fn(n), args.settle) - empty  # type: ignore[misc]
                results.setdefault(name, []).append(count / n)
                print(f"{args.process} {name}: {count / n:,.0f} instructions/call ({count:,} over {n} calls)", flush=True)
        if door is not None:
            door.close()
        s.close()
    finally:
        d.cleanup()
    return results


def worker_totals(out: Path) -> int:
    """The instructions of the workers that ran under ``out``: the processes whose parent callgrind
    also followed (a worker is forked by its template, the template started by the supervisor)."""
    parents = {}
    for log in out.glob("valgrind.*.log"):
        head = log.read_text(errors="replace")[:2000]
        parent = head.split("Parent PID:", 1)[1].split()[0] if "Parent PID:" in head else "0"
        parents[int(log.name.split(".")[1])] = int(parent)
    workers = {pid for pid, parent in parents.items() if parent in parents}
    total = 0
    for path in out.glob("callgrind.out.*"):
        if int(path.name.split(".")[2]) in workers:
            total += totals(path)
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--process", choices=["supervisor", "client", "worker"], default="supervisor")
    ap.add_argument("--http", action="store_true", help="the bench/add10 endpoint through the HTTP door")
    ap.add_argument("--n", type=int, default=2000, help="calls per window (map: times --map-factor)")
    ap.add_argument("--map-factor", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="windows per case")
    ap.add_argument("--idle", type=float, default=0.0, help="also count an idle window of this many seconds")
    ap.add_argument("--settle", type=float, default=0.5, help="seconds of quiet before a window opens and before it closes")
    ap.add_argument("--hash-seed", default="0", help="PYTHONHASHSEED of the measured processes ('random': each its own)")
    ap.add_argument("--keep", action="store_true", help="keep the callgrind dumps (for callgrind_annotate)")
    args = ap.parse_args()
    if args.hash_seed != "random":
        # str hashes decide where dict keys land, and so how many probes a lookup takes: with a
        # random seed per process the same code's count moves by up to 3% from run to run
        os.environ["PYTHONHASHSEED"] = args.hash_seed  # the daemon's, and the client's (re-run below)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 2
    if args.process == "client" and not os.environ.get(INNER):
        out = Path(tempfile.mkdtemp(prefix="crcg"))
        cmd = [*valgrind(out), sys.executable, "-m", "bench.callgrind", *sys.argv[1:]]
        env = dict(os.environ, **{INNER: str(out)})
        return subprocess.call(cmd, env=env)
    out = Path(os.environ.get(INNER) or tempfile.mkdtemp(prefix="crcg"))
    shim = out / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM)
    try:
        if args.process == "worker":
            for name, n in [("http sync", args.n)] if args.http else [("sync", args.n), ("map", args.n * args.map_factor)]:
                for _ in range(args.rounds):
                    counts = []
                    for k in (1, 2):
                        sub = Path(tempfile.mkdtemp(prefix="w", dir=out))
                        run(args, sub, shim, measured={name: n * k})
                        counts.append(worker_totals(sub))
                    print(f"worker {name}: {(counts[1] - counts[0]) / n:,.0f} instructions/call (all workers, {n} more calls)", flush=True)
        else:
            run(args, out, shim)
    finally:
        if args.keep:
            print(f"callgrind dumps: {out}")
        else:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
