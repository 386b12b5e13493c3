"""Turning one run's results into a Markdown report, the target verdicts and PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

ORDER = ["floor-1hop", "floor-2hop", "cruised", "cruised-http", "cruised-http-stdlib", "ppe", "multiprocess", "pebble", "ray"]
PAYLOADS = ["1KB bytes", "1MB ndarray", "1MB bytes", "64MB ndarray", "100k-row DataFrame"]


def _rows(results: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    systems = results["systems"]
    return [(name, systems[name]) for name in ORDER if name in systems]


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _num(v: Any, fmt: str = "{:,.0f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return fmt.format(v)


def _cell(row: dict[str, Any], *path: str, fmt: str = "{:,.0f}", scale: float = 1.0) -> str:
    v = _get(row, *path)
    if isinstance(v, (int, float)):
        return _num(v * scale, fmt)
    section = _get(row, path[0])
    if isinstance(section, dict) and ("skipped" in section or "error" in section):
        return "skip" if "skipped" in section else "error"
    if "skipped" in row:
        return "skip"
    if "error" in row:
        return "error"
    return "—"


def _label(name: str, row: dict[str, Any]) -> str:
    return str(row.get("label") or name)


def _pss_mb(row: dict[str, Any]) -> float | None:
    vals = [v for v in (_get(row, "pids", "pss_kb") or []) if v]
    return sum(vals) / len(vals) / 1024 if vals else None


def _ready(row: dict[str, Any]) -> list[float]:
    """Spawn -> READY of every worker the bursts started (later ones queue behind earlier forks)."""
    return [t for b in (_get(row, "scaleup", "bursts") or []) for t in b.get("worker_ready_ms", [])]


def _single(row: dict[str, Any]) -> list[float]:
    """Spawn -> READY of one new worker on its own (nothing queued ahead of it in the template)."""
    return list(_get(row, "scaleup", "single_spawn_ready_ms") or [])


def _median(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 6's targets as (name, figure, limit, met) — met is None when a row is missing."""
    s = results["systems"]
    cr, fl, fl2, ppe, ray, http = (s.get(k, {}) for k in ("cruised", "floor-1hop", "floor-2hop", "ppe", "ray", "cruised-http"))
    out = []

    def ratio(target: str, a: Any, b: Any, limit: float, less: bool, what: str, shown: str | None = None, hop2: Any = None) -> None:
        bound = f"{'≤' if less else '≥'} {shown or f'{limit:g}'}×"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            r = a / b
            # for the floor targets: what any client -> middle -> worker design pays before doing any work
            extra = f"; the 2-hop echo alone is {hop2 / b:.2f}×" if isinstance(hop2, (int, float)) else ""
            out.append({"target": target, "figure": f"{r:.2f}× ({what.format(a=a, b=b)}{extra})", "limit": bound, "met": r <= limit if less else r >= limit})
        else:
            out.append({"target": target, "figure": "not measured", "limit": bound, "met": None})

    p50 = _get(cr, "latency", "p50_us")
    ratio("sync p50 vs 2-process floor", p50, _get(fl, "latency", "p50_us"), 2.5, True, "{a:.0f} µs vs {b:.0f} µs", hop2=_get(fl2, "latency", "p50_us"))
    ratio("sync p50 vs ProcessPoolExecutor", p50, _get(ppe, "latency", "p50_us"), 0.6, True, "{a:.0f} µs vs {b:.0f} µs")
    thr = _get(cr, "throughput", "calls_per_s")
    ratio("pipelined calls/s vs ProcessPoolExecutor", thr, _get(ppe, "throughput", "calls_per_s"), 3, False, "{a:,.0f}/s vs {b:,.0f}/s")
    ratio("pipelined calls/s vs Ray", thr, _get(ray, "throughput", "calls_per_s"), 10, False, "{a:,.0f}/s vs {b:,.0f}/s")
    ready = _single(cr) or _ready(cr)
    if ready:
        med = _median(ready)
        assert med is not None
        what = "one new worker alone" if _single(cr) else "burst spawns"
        out.append(
            {
                "target": "new worker ready (numpy+pandas preloaded)",
                "figure": f"median {med:.1f} ms, max {max(ready):.1f} ms ({len(ready)} × {what})",
                "limit": "≤ 50 ms",
                "met": med <= 50,
            }
        )
    else:
        out.append({"target": "new worker ready (numpy+pandas preloaded)", "figure": "not measured", "limit": "≤ 50 ms", "met": None})
    pss = _pss_mb(cr)
    fresh = results.get("fresh_interpreter_pss_kb")
    ratio("PSS per idle worker vs fresh interpreter", pss, fresh / 1024 if fresh else None, 1 / 3, True, "{a:.1f} MB vs {b:.1f} MB", shown="1/3")
    ratio(
        "1 MB ndarray round trip vs floor (same bytes)",
        _get(cr, "payloads", "1MB ndarray", "p50_us"),
        _get(fl, "payloads", "1MB ndarray", "p50_us"),
        2,
        True,
        "{a:,.0f} µs vs {b:,.0f} µs",
        hop2=_get(fl2, "payloads", "1MB ndarray", "p50_us"),
    )
    ratio("HTTP endpoint sync p50 vs native client", _get(http, "latency", "p50_us"), p50, 1.5, True, "{a:.0f} µs vs {b:.0f} µs")
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["meta"]
    lines = [
        f"# cruised benchmark — {m['when']}{' (quick)' if m['quick'] else ''}",
        "",
        f"Python {m['python']}, {m['machine']}, kernel {m['kernel']}; {m['workers']} workers per pool; run took {m.get('seconds', '?')} s;"
        f" load average {m.get('load_start', '?')} at the start, {m.get('load_end', '?')} at the end (other work on the machine inflates every row).",
        "",
        "## Trivial call `f(x) = x + 10`",
        "",
        "| system | sync p50 µs | sync p99 µs | pipelined calls/s (1 client) | 8 clients calls/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in _rows(results):
        many = _cell(row, "multi8", "calls_per_s") if "multi8" in row else _cell(row, "threads8", "calls_per_s")
        if "multi8" not in row and isinstance(_get(row, "threads8", "calls_per_s"), float):
            many += " (threads)"
        lines.append(
            f"| {_label(name, row)} | {_cell(row, 'latency', 'p50_us')} | {_cell(row, 'latency', 'p99_us')} | {_cell(row, 'throughput', 'calls_per_s')} | {many} |"
        )
    lines += [
        "",
        "8 clients: separate processes, each with its own connection, for cruised; 8 threads sharing one pool for the in-process peers (a process pool cannot be shared between processes).",
        "",
    ]
    payload_rows = [(n, r) for n, r in _rows(results) if "payloads" in r]
    if payload_rows:
        lines += [
            "## Payload round trip (argument and result), p50 ms",
            "",
            "| system | " + " | ".join(PAYLOADS) + " |",
            "|---|" + "---:|" * len(PAYLOADS),
        ]
        for name, row in payload_rows:
            cells = [_cell(row, "payloads", p, "p50_us", fmt="{:,.3f}", scale=1e-3) for p in PAYLOADS]
            lines.append(f"| {_label(name, row)} | " + " | ".join(cells) + " |")
        lines += ["", "Floors move the same number of bytes as cruised's CALL frame for that argument (no pickling).", ""]

    scale_rows = [(n, r) for n, r in _rows(results) if _get(r, "scaleup", "bursts")]
    if scale_rows:
        lines += [
            "## Scale-up: a burst of 8 concurrent 100 ms calls (numpy and pandas preloaded)",
            "",
            "| system | from | all running after ms | all done after ms | burst spawns ready ms (median / max) | one new worker ready ms (median / max) |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, row in scale_rows:
            b = row["scaleup"]["bursts"]
            started = _median([x["all_started_ms"] for x in b])
            done = _median([x["all_done_ms"] for x in b])
            ready = _ready(row)
            rd = f"{_median(ready):.1f} / {max(ready):.1f}" if ready else "—"
            one = _single(row)
            od = f"{_median(one):.1f} / {max(one):.1f}" if one else "—"
            origin = "cruise 1 → max 8" if name == "cruised" else "new 8-worker pool"
            lines.append(f"| {_label(name, row)} | {origin} | {_num(started, '{:.1f}')} | {_num(done, '{:.1f}')} | {rd} | {od} |")
        lines += [
            "",
            "Spawn → READY as the supervisor logs it. The template forks one worker at a time, so in a burst the later spawns",
            "queue behind the earlier ones; the last column spawns one worker with nothing ahead of it.",
            "",
        ]

    fresh = results.get("fresh_interpreter_pss_kb")
    mem_rows = [(n, r) for n, r in _rows(results) if _pss_mb(r) is not None]
    if fresh or mem_rows:
        lines += [
            "## Memory: PSS per idle worker (numpy and pandas imported)",
            "",
            "| system | workers | PSS per worker MB | vs fresh interpreter |",
            "|---|---:|---:|---:|",
        ]
        if fresh:
            lines.append(f"| fresh `python -c 'import numpy, pandas'` | 1 | {fresh / 1024:.1f} | 1.00 |")
        for name, row in mem_rows:
            pss = _pss_mb(row)
            assert pss is not None
            ratio = f"{pss / (fresh / 1024):.2f}" if fresh else "—"
            lines.append(f"| {_label(name, row)} | {len(_get(row, 'pids', 'pids'))} | {pss:.1f} | {ratio} |")
        lines.append("")

    over_rows = [(n, r) for n, r in _rows(results) if isinstance(_get(r, "overload"), dict)]
    if over_rows:
        o0 = over_rows[0][1]["overload"]
        lines += [
            f"## Overload: {o0.get('offered_per_s', 0):.0f} calls/s offered (2× capacity: {results['meta']['workers']} workers × 10 ms calls) for {o0.get('duration_s', 0):g} s",
            "",
            "| system | sent | accepted | rejection fraction | accepted p50 ms | accepted p99 ms | not exactly one reply |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in over_rows:
            o = row["overload"]
            if "error" in o:
                lines.append(f"| {_label(name, row)} | error: {o['error']} |||||| ")
                continue
            lines.append(
                f"| {_label(name, row)} | {o['sent']} | {o['accepted']} | {o['rejection_fraction']:.2f} | {o['accepted_p50_ms']:.1f} | {o['accepted_p99_ms']:.1f} | {o['not_exactly_one_reply']} |"
            )
        lines += ["", "ProcessPoolExecutor has no admission control: it accepts everything and the wait grows for as long as the overload lasts.", ""]

    where = _get(results["systems"].get("cruised", {}), "kernel")
    if isinstance(where, dict) and "script" in where and "kernel" in where:
        lines += [
            "## Where the caller runs: a trivial call from a Jupyter kernel beside a script (issue 16)",
            "",
            "| caller | sync p50 µs | sync p90 µs | sync p99 µs | mean µs | kernel / script p50 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for side, label in (("script", "`python -c` script"), ("kernel", "Jupyter kernel (ipykernel)")):
            w = where[side]
            ratio = f"{w['p50_us'] / where['script']['p50_us']:.2f}"
            lines.append(f"| {label} | {w['p50_us']:,.0f} | {w['p90_us']:,.0f} | {w['p99_us']:,.0f} | {w['mean_us']:,.0f} | {ratio} |")
        lines += [
            "",
            f"The same code (bench/kernel.py) on the `fast` pool, {where['script']['n']} calls each; best p50 of {where['rounds']} alternating rounds.",
            "",
        ]

    lines += ["## Targets (issue 6), ratios within this run", "", "| target | figure | limit | met |", "|---|---|---|---|"]
    for t in targets(results):
        met = "n/a" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
        lines.append(f"| {t['target']} | {t['figure']} | {t['limit']} | {met} |")
    notes = list(m.get("notes", []))
    for name, row in results["systems"].items():
        if "skipped" in row:
            notes.append(f"{name}: skipped — {row['skipped']}")
        if "error" in row:
            notes.append(f"{name}: error — {row['error']}")
        for sec, val in row.items():
            if isinstance(val, dict) and "error" in val:
                notes.append(f"{name} {sec}: error — {val['error']}")
            elif isinstance(val, dict) and "skipped" in val and val["skipped"] != "not applicable":
                notes.append(f"{name} {sec}: skipped — {val['skipped']}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


COLORS = {
    "floor-1hop": "#555555",
    "floor-2hop": "#999999",
    "cruised": "#d62728",
    "cruised-http": "#ff7f0e",
    "cruised-http-stdlib": "#ffbb78",
    "ppe": "#1f77b4",
    "multiprocess": "#2ca02c",
    "pebble": "#9467bd",
    "ray": "#8c564b",
}


def plots(results: dict[str, Any], out: Path) -> list[str]:
    """latency_cdf.png, throughput.png, payloads.png, scaleup.png; returns notes (e.g. no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib not installed (pip install 'cruised[bench]')"]
    rows = _rows(results)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name, row in rows:
        cdf = _get(row, "latency", "cdf")
        if cdf:
            xs, ys = zip(*cdf, strict=True)  # (x, y) points
            ax.plot(xs, ys, label=f"{_label(name, row)} (p50 {row['latency']['p50_us']:.0f} µs)", color=COLORS.get(name), linewidth=2)
    ax.set_xscale("log")
    ax.set_xlabel("round-trip latency of add10(1), µs (log scale)")
    ax.set_ylabel("fraction of calls")
    ax.set_title("Sync latency CDF, one caller")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 5.5))
    names = [(n, r) for n, r in rows if isinstance(_get(r, "throughput", "calls_per_s"), float) or isinstance(_get(r, "multi8", "calls_per_s"), float)]
    width = 0.38
    for i, (name, row) in enumerate(names):
        one = _get(row, "throughput", "calls_per_s")
        many = _get(row, "multi8", "calls_per_s") or _get(row, "threads8", "calls_per_s")
        for off, v, hatch in ((-width / 2, one, ""), (width / 2, many, "//")):
            if isinstance(v, float):
                ax.bar(i + off, v, width, color=COLORS.get(name), hatch=hatch, edgecolor="black", linewidth=0.5)
                ax.text(i + off, v, f"{v / 1000:.1f}k", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n for n, _ in names], rotation=20)
    ax.set_yscale("log")  # the floors are an order of magnitude above every real system
    ax.set_ylabel("calls / s (log scale)")
    ax.set_title("Pipelined add10 throughput: plain = 1 client, hatched = 8 clients")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    prow = [(n, r) for n, r in rows if isinstance(r.get("payloads"), dict)]
    if prow:
        fig, ax = plt.subplots(figsize=(10, 5.5))
        width = 0.8 / max(1, len(prow))
        for j, (name, row) in enumerate(prow):
            for i, p in enumerate(PAYLOADS):
                v = _get(row, "payloads", p, "p50_us")
                if isinstance(v, float):
                    ax.bar(
                        i - 0.4 + width * (j + 0.5), v / 1e3, width, color=COLORS.get(name), label=name if i == 0 else None, edgecolor="black", linewidth=0.3
                    )
        ax.set_yscale("log")
        ax.set_xticks(range(len(PAYLOADS)))
        ax.set_xticklabels(PAYLOADS)
        ax.set_ylabel("round trip p50, ms (log scale)")
        ax.set_title("Payload round trip (echo: argument and result)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "payloads.png", dpi=110)
        plt.close(fig)

    srows = [(n, r) for n, r in rows if _get(r, "scaleup", "bursts")]
    if srows:
        fig, axes = plt.subplots(len(srows), 1, figsize=(9, 2.6 * len(srows) + 0.8), squeeze=False)
        for ax, (name, row) in zip(axes[:, 0], srows, strict=True):  # one axis per row
            burst = row["scaleup"]["bursts"][0]
            calls = sorted(burst["calls"])
            for k, (start, end, _pid) in enumerate(calls):
                ax.barh(k, start, color="#dddddd", edgecolor="#999999", linewidth=0.5)
                ax.barh(k, end - start, left=start, color=COLORS.get(name), edgecolor="black", linewidth=0.5)
            ax.set_yticks(range(len(calls)))
            ax.set_yticklabels([f"call {k + 1}" for k in range(len(calls))], fontsize=7)
            ax.invert_yaxis()
            ready = burst.get("worker_ready_ms") or []
            extra = f"; new workers ready in {min(ready):.0f}–{max(ready):.0f} ms" if ready else ""
            ax.set_title(f"{_label(name, row)}: all 8 running after {burst['all_started_ms']:.0f} ms{extra}", fontsize=9)
            ax.set_xlabel("ms since the burst (grey: waiting, colour: running a 100 ms call)")
            ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "scaleup.png", dpi=110)
        plt.close(fig)
    return []
