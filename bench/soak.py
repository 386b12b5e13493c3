"""Soak: the mixed hostile workload against a real daemon for N minutes.

    python bench/soak.py --minutes 10 [--clients 8] [--out bench/out/soak]

Starts its own daemon (in its own session, reaped at the end), drives 8
pipelining clients with a mix of quick, slow, raising, crashing and hanging
calls while workers are SIGKILLed at random, samples the daemon's RSS and fd
count every second, and prints the invariant checker's verdict. One more
client sends 1 MB arrays (shared files, pool/wire/sharedfile.py) through the same
mix; each of its results is checked, and at the end the supervisor must hold
no shared file. Writes
``soak.json``, ``rss.csv`` and, when matplotlib is installed, ``rss.png``.
Exit status 1 if any invariant was violated.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the test harness (tests/support), as pytest's pythonpath gives it

from cruised.pool.wire.frames import Status  # noqa: E402 - with the harness imports below, after the path set-up
from support.daemon import Daemon, pool_config  # noqa: E402 - importable only after the path set-up above
from support.invariants import BusyKiller, RawClient, check, drive, memfds, resources, settle  # noqa: E402 - likewise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--out", default=str(HERE / "out" / "soak"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="soak"))
    seconds = args.minutes * 60
    cfg = {
        "pools": {"default": pool_config(min=2, cruise=3, max=4, queue_size=32, queue_timeout="1s", exec_timeout="500ms")},
        "daemon": {"kill_grace": "200ms"},
    }
    d = Daemon(cfg, work)
    d.start()
    pid = d.status()["pid"]
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(1.0):
            rss, fds = resources(pid)
            samples.append((round(time.monotonic() - t0, 1), rss, fds))

    modes = [("ok", 0.0)] * 12 + [("sleep", 0.02), ("raise", 0.0), ("crash", 0.0), ("hang", 0.0)]
    rng = random.Random(5)
    ledger = work / "ledger"
    killer = BusyKiller(d.status, every=0.5, seed=11)
    shared = SharedFileClient(d)
    threads = [threading.Thread(target=sample), killer, shared]
    for t in threads:
        t.start()
    # fresh connections every minute so client churn is part of the soak
    reports = []
    try:
        remaining = seconds
        while remaining > 0:
            chunk = min(60.0, remaining)
            clients = [RawClient(d.socket, str(ledger)) for _ in range(args.clients)]
            drive(clients, chunk, 8, lambda i: rng.choice(modes))
            settle(clients, 60)
            reports.append(check(clients, str(ledger)))
            for c in clients:
                c.close()
            ledger.unlink(missing_ok=True)
            remaining -= chunk
            print(f"[{seconds - remaining:.0f}s] {reports[-1].summary()}", flush=True)
        shared.stop.set()
        shared.join(60)
        settled = time.monotonic() + 30  # the last answers reach the supervisor's channels first
        while memfds(pid) and time.monotonic() < settled:
            time.sleep(0.1)
        leaked_files = memfds(pid)
    finally:
        stop.set()
        shared.stop.set()
        kills = killer.stop()
        for t in threads:
            t.join(10)
        d.cleanup()
    total_sent = sum(r.sent for r in reports)
    violations = [v for r in reports for v in r.violations] + shared.wrong
    if leaked_files:
        violations.append(f"the supervisor still holds {leaked_files} shared-file descriptors after the soak")
    by_status: dict[str, int] = {}
    for r in reports:
        for k, v in r.by_status.items():
            name = Status.name(k) if isinstance(k, int) else str(k)
            by_status[name] = by_status.get(name, 0) + v
    result = {
        "minutes": args.minutes,
        "clients": args.clients,
        "requests": total_sent,
        "outcomes": by_status,
        "worker_kills": kills,
        "shared_file_calls": shared.outcomes,
        "violations": violations[:100],
        "rss_start_mb": round(samples[0][1] / 2**20, 1) if samples else None,
        "rss_end_mb": round(samples[-1][1] / 2**20, 1) if samples else None,
        "rss_max_mb": round(max(s[1] for s in samples) / 2**20, 1) if samples else None,
        "fds_start": samples[0][2] if samples else None,
        "fds_end": samples[-1][2] if samples else None,
    }
    (out / "soak.json").write_text(json.dumps(result, indent=2))
    (out / "rss.csv").write_text("t_s,rss_bytes,fds\n" + "".join(f"{t},{r},{f}\n" for t, r, f in samples))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot([s[0] for s in samples], [s[1] / 2**20 for s in samples], label="supervisor RSS (MiB)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MiB")
        ax2 = ax.twinx()
        ax2.plot([s[0] for s in samples], [s[2] for s in samples], color="tab:orange", label="open fds")
        ax2.set_ylabel("fds")
        ax.set_title(f"cruised soak: {total_sent} requests, {kills} worker kills, {len(violations)} violations")
        fig.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "rss.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: wrote rss.csv only (pip install -e '.[bench]')")
    print(json.dumps(result, indent=2))
    return 1 if violations else 0


class SharedFileClient(threading.Thread):
    """Calls that use shared files through the soak's mix: a 1 MB array argument and result, a
    1 MB ``bytes`` one (its pickle stream in the file), and a small query returning 1.5 MB (a
    file for the result only, once the client learned it). Each answer must be the right value
    or the error its mode asks for."""

    def __init__(self, d: Daemon) -> None:
        super().__init__(name="shared-file-client", daemon=True)
        self.d = d
        self.stop = threading.Event()
        self.outcomes: dict[str, int] = {}
        self.wrong: list[str] = []

    def run(self) -> None:
        import numpy as np

        import cruised

        s = self.d.session()
        arr = np.arange(1 << 17, dtype=np.float64)
        blob = bytes(range(256)) * 4096
        rng = random.Random(3)

        def act(a: object, mode: str, k: int) -> object:
            import os as _os
            import time as _t

            import numpy as _np

            if mode == "raise":
                raise ValueError(k)
            if mode == "crash":
                _os._exit(3)
            if mode == "hang":
                _t.sleep(5)
            if isinstance(a, int):  # a small query returning a table
                return _np.full(1 << 17, float(a * k)), bytes([k % 256]) * (1 << 19)
            if isinstance(a, bytes):
                return a[::-1] + bytes([k % 256])
            return a[::-1] * k  # type: ignore[index]  # a is a str or a sequence here, out the (array, bytes) pair

        def right(a: object, k: int, out: object) -> bool:
            if isinstance(a, int):
                return np.array_equal(out[0], np.full(1 << 17, float(a * k))) and out[1] == bytes([k % 256]) * (1 << 19)  # type: ignore[index]  # a is a str or a sequence here, out the (array, bytes) pair
            if isinstance(a, bytes):
                return out == a[::-1] + bytes([k % 256])
            return np.array_equal(out, arr[::-1] * k)

        while not self.stop.is_set():
            mode = rng.choice(["ok"] * 12 + ["raise", "crash", "hang"])
            k = rng.randrange(1, 1000)
            a = rng.choice([arr, blob, 7])
            try:
                out = s.call(act, a, mode, k)
                got = "ok" if mode == "ok" and right(a, k, out) else f"wrong result for {mode}"
            except ValueError as exc:
                got = "raise" if mode == "raise" and exc.args == (k,) else f"wrong error for {mode}: {exc!r}"
            except (cruised.WorkerCrashed, cruised.ExecutionTimeout, cruised.QueueFull, cruised.QueueTimeout) as exc:
                got = type(exc).__name__  # any call can meet a SIGKILL, a full queue or a slow queue
            except cruised.CruisedError as exc:
                got = f"unexpected {type(exc).__name__}: {exc}"
            self.outcomes[got] = self.outcomes.get(got, 0) + 1
            if got.startswith(("wrong", "unexpected")) and len(self.wrong) < 20:
                self.wrong.append(f"shared-file client: {got}")
        s.close()


if __name__ == "__main__":
    raise SystemExit(main())
