"""One system's rows, measured in a fresh process: ``python -m bench.probe SYSTEM``.

Each system runs in its own interpreter so that nothing one leaves behind
(Ray's threads, a pool's processes, imported modules) colours another's
figures. The probe prints one JSON object on its last stdout line.

Sections: ``latency`` (sync add10, one caller), ``throughput`` (the
system's pipelined idiom, one client), ``threads8`` (8 threads sharing one
client/pool: for in-process pools, which 8 processes cannot share),
``payloads`` (echo of each payload, argument and result), ``pids`` (worker
processes after ``warm_imports``, for the memory rows).

``python -m bench.probe --client SYSTEM`` is one of the 8 client processes of
the multi-client rows: it connects, warms up, prints ``ready``, waits for a
line on stdin, runs, and prints its JSON (start/end in monotonic seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from . import daemon, memory, overload, stats
from .systems import WORKERS, Unavailable, make

#: offered load of the overload rows: twice the nominal capacity (workers / service time)
OVER_RATE = 2 * WORKERS * 1000.0 / daemon.OVER_MS


def payload_objects() -> dict[str, Callable[[], Any]]:
    import numpy as np
    import pandas as pd

    def frame() -> Any:
        n = 100_000
        rng = np.random.default_rng(1)
        return pd.DataFrame(
            {
                "time": np.arange(n, dtype="int64") * 1_000_000,
                "sym": pd.Categorical(rng.choice(["AAPL", "MSFT", "GOOG", "IBM"], n)),
                "price": rng.random(n) * 100,
                "size": rng.integers(1, 1000, n),
            }
        )

    return {
        "1KB bytes": lambda: b"x" * 1024,
        "1MB ndarray": lambda: np.arange(1 << 17, dtype="float64"),
        "1MB bytes": lambda: bytes(range(256)) * 4096,  # pickled in-band: no out-of-band buffer
        "64MB ndarray": lambda: np.arange(8 << 20, dtype="float64"),
        "100k-row DataFrame": frame,
    }


def same(a: Any, b: Any) -> bool:
    try:
        import numpy as np
        import pandas as pd

        if isinstance(a, np.ndarray):
            return bool(np.array_equal(a, b))
        if isinstance(a, pd.DataFrame):
            return bool(a.equals(b))
    except ImportError:
        pass
    return bool(a == b)


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def run_latency(sys_: Any, n: int) -> dict[str, Any]:
    arg = sys_.prepare(1)
    r = sys_.call("add10", arg)
    if sys_.name not in ("floor-1hop", "floor-2hop") and r != 11:
        raise AssertionError(f"add10(1) returned {r!r}")
    timed(lambda: sys_.call("add10", arg), max(50, n // 10))  # warm-up
    samples = timed(lambda: sys_.call("add10", arg), n)
    return {**stats.summary_us(samples), "cdf": stats.cdf_points(samples)}


def run_throughput(sys_: Any, n: int) -> dict[str, Any]:
    if sys_.no_pipeline:
        return {"skipped": sys_.no_pipeline}
    args = [sys_.prepare(1)] * n if sys_.name.startswith("floor") else list(range(n))
    sys_.pipelined("add10", args[: max(100, n // 10)])  # warm-up
    best = 0.0
    for _ in range(2):
        t = time.perf_counter()
        res = sys_.pipelined("add10", args)
        dt = time.perf_counter() - t
        if not sys_.name.startswith("floor") and (len(res) != n or res[-1] != n - 1 + 10):
            raise AssertionError("pipelined results are wrong")
        best = max(best, n / dt)
    return {"calls_per_s": best, "n": n}


def run_threads8(sys_: Any, n: int) -> dict[str, Any]:
    if sys_.no_pipeline or sys_.name.startswith("floor"):
        return {"skipped": "not applicable"}
    per = n // 8
    errors: list[BaseException] = []

    def client() -> None:
        try:
            sys_.pipelined("add10", list(range(per)))
        except BaseException as exc:  # noqa: BLE001 - any failure of a client thread is reported below
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(8)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    if errors:
        raise errors[0]
    return {"calls_per_s": per * 8 / dt, "n": per * 8, "clients": "8 threads, one pool"}


def run_payloads(sys_: Any, counts: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, make_obj in payload_objects().items():
        obj = make_obj()
        arg = sys_.prepare(obj)
        try:
            back = sys_.call("echo", arg)
        except Unavailable as exc:
            out[name] = {"skipped": str(exc)}
            continue
        if not sys_.name.startswith("floor") and not same(obj, back):
            raise AssertionError(f"{name}: echo returned something else")
        del back
        samples = timed(lambda arg=arg: sys_.call("echo", arg), counts[name])  # this iteration's arg, bound
        out[name] = stats.summary_us(samples)
    return out


def run_scaleup_ppe(bursts: int) -> dict[str, Any]:
    """A burst of 8 x 100 ms calls into a new 8-worker ProcessPoolExecutor (forked from this preloaded process)."""
    from concurrent.futures import ProcessPoolExecutor

    from . import funcs

    runs = []
    for _ in range(bursts):
        t0 = time.monotonic()
        with ProcessPoolExecutor(max_workers=8) as ex:
            res = [f.result() for f in [ex.submit(funcs.nap, daemon.NAP_MS) for _ in range(8)]]
        runs.append(burst_summary(t0, res))
    return {"bursts": runs}


def burst_summary(t0: float, res: list[tuple[float, float, int]]) -> dict[str, Any]:
    return {
        "all_started_ms": (max(r[0] for r in res) - t0) * 1e3,
        "all_done_ms": (max(r[1] for r in res) - t0) * 1e3,
        "calls": [((r[0] - t0) * 1e3, (r[1] - t0) * 1e3, r[2]) for r in res],
    }


def probe(system: str, sections: list[str], sockets: dict[str, str], quick: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"system": system}
    # fork-based peers inherit these, as cruised's workers inherit them from the template
    import numpy  # noqa: F401 - preloaded for its effect: fork-based peers inherit it
    import pandas  # noqa: F401 - preloaded for its effect: fork-based peers inherit it

    try:
        sys_ = make(system, sockets)
    except Unavailable as exc:
        return {"system": system, "skipped": str(exc)}
    result["label"] = sys_.label
    try:
        for section in sections:
            t0 = time.perf_counter()
            try:
                if section == "latency":
                    result[section] = run_latency(sys_, 500 if quick else 5000)
                elif section == "throughput":
                    result[section] = run_throughput(sys_, 2000 if quick else 20000)
                elif section == "threads8":
                    result[section] = run_threads8(sys_, 2000 if quick else 16000)
                elif section == "payloads":
                    counts = {"1KB bytes": 100, "1MB ndarray": 30, "1MB bytes": 30, "64MB ndarray": 2, "100k-row DataFrame": 10}
                    if not quick:
                        counts = {"1KB bytes": 1000, "1MB ndarray": 200, "1MB bytes": 200, "64MB ndarray": 10, "100k-row DataFrame": 100}
                    result[section] = run_payloads(sys_, counts)
                elif section == "pids":
                    pids = sys_.worker_pids()
                    time.sleep(0.2)  # idle, as the cruised workers are when measured
                    result[section] = {"pids": pids, "pss_kb": [memory.pss_kb(p) for p in pids]}
                elif section == "scaleup":
                    result[section] = run_scaleup_ppe(1 if quick else 3)
                elif section == "overload":
                    result[section] = overload.ppe_overload(OVER_RATE, 2.0 if quick else 10.0, daemon.OVER_MS, WORKERS)
            except Unavailable as exc:
                result[section] = {"skipped": str(exc)}
            result.setdefault("seconds", {})[section] = round(time.perf_counter() - t0, 3)
    finally:
        sys_.close()
    return result


def client_main(system: str, sockets: dict[str, str], n: int) -> dict[str, Any]:
    sys_ = make(system, sockets)
    try:
        if sys_.no_pipeline:
            run = lambda: [sys_.call("add10", i) for i in range(n)]  # noqa: E731 - the timed body, chosen per branch
        else:
            run = lambda: sys_.pipelined("add10", list(range(n)))  # noqa: E731 - the timed body, chosen per branch
        for i in range(50):
            sys_.call("add10", i)
        print("ready", flush=True)
        sys.stdin.readline()
        start = time.monotonic()
        res = run()
        end = time.monotonic()
        if res[-1] != n - 1 + 10:
            raise AssertionError("wrong result")
        return {"start": start, "end": end, "n": n}
    finally:
        sys_.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.probe")
    ap.add_argument("system")
    ap.add_argument("--sections", default="latency,throughput,threads8,payloads,pids")
    ap.add_argument("--socket", default="")
    ap.add_argument("--http-socket", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--client", action="store_true", help="act as one of the multi-client processes")
    ap.add_argument("--n", type=int, default=1000)
    args = ap.parse_args(argv)
    sockets = {"native": args.socket, "http": args.http_socket}
    try:
        if args.client:
            out = client_main(args.system, sockets, args.n)
        else:
            out = probe(args.system, [s for s in args.sections.split(",") if s], sockets, args.quick)
    except Exception as exc:  # noqa: BLE001 - reported to the runner, which records it against the row
        out = {"system": args.system, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
