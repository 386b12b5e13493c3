"""Small numeric helpers shared by the probes: percentiles and summaries."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary_us(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max in microseconds of samples given in seconds."""
    s = sorted(samples_s)
    if not s:
        return {"n": 0}
    return {
        "n": len(s),
        "p50_us": percentile(s, 50) * 1e6,
        "p90_us": percentile(s, 90) * 1e6,
        "p99_us": percentile(s, 99) * 1e6,
        "mean_us": sum(s) / len(s) * 1e6,
        "max_us": s[-1] * 1e6,
    }


def cdf_points(samples_s: Sequence[float], points: int = 200) -> list[tuple[float, float]]:
    """(latency µs, fraction) pairs for a CDF plot, thinned to about ``points`` entries."""
    s = sorted(samples_s)
    if not s:
        return []
    step = max(1, len(s) // points)
    out = [(s[i] * 1e6, (i + 1) / len(s)) for i in range(0, len(s), step)]
    if out[-1][1] != 1.0:
        out.append((s[-1] * 1e6, 1.0))
    return out
