"""The benchmark suite still runs (``pytest -m bench``; deselected by default).

It drives ``python -m bench --quick`` on a subset of rows against a real
daemon and checks that every section produced figures, that the report and
plots were written, and the one correctness figure of the suite: under
overload every request got exactly one reply. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.bench


def run_bench(tmp_path: Path, systems: str, sections: str) -> dict:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--systems", systems, "--sections", sections, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "## Targets (issue 6)" in proc.stdout
    assert (out / "results.md").read_text() == proc.stdout.rstrip("\n") + "\n"
    return json.loads((out / "results.json").read_text())


def test_trivial_and_payload_rows(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    res = run_bench(tmp_path, "floor-1hop,ppe,cruised", "trivial,payloads,multiclient")
    for name in ("floor-1hop", "ppe", "cruised"):
        row = res["systems"][name]
        assert "error" not in row, row
        assert row["latency"]["p50_us"] > 0
        assert row["throughput"]["calls_per_s"] > 0
        assert set(row["payloads"]) == {"1KB bytes", "1MB ndarray", "1MB bytes", "64MB ndarray", "100k-row DataFrame"}
        assert all(v["p50_us"] > 0 for v in row["payloads"].values())
    assert res["systems"]["cruised"]["multi8"]["n"] > 0
    for png in ("latency_cdf.png", "throughput.png", "payloads.png"):
        assert (tmp_path / "out" / png).stat().st_size > 10_000


def test_scaleup_memory_overload_rows(tmp_path: Path) -> None:
    res = run_bench(tmp_path, "ppe,cruised", "scaleup,memory,overload")
    cr = res["systems"]["cruised"]
    burst = cr["scaleup"]["bursts"][0]
    assert len(burst["calls"]) == 8 and burst["worker_ready_ms"], burst
    assert len(cr["pids"]["pids"]) == 4 and all(cr["pids"]["pss_kb"])
    assert res["fresh_interpreter_pss_kb"] > 0
    over = cr["overload"]
    assert over["not_exactly_one_reply"] == 0, over
    assert over["accepted"] > 0 and over["rejected"] > 0, over  # 2x capacity must shed load
    assert res["systems"]["ppe"]["overload"]["not_exactly_one_reply"] == 0


def test_kernel_row_times_a_script_and_a_jupyter_kernel(tmp_path: Path) -> None:
    pytest.importorskip("ipykernel")
    res = run_bench(tmp_path, "cruised", "kernel")
    where = res["systems"]["cruised"]["kernel"]
    assert where["script"]["n"] == where["kernel"]["n"] == 500
    assert where["script"]["p50_us"] > 0 and where["kernel"]["p50_us"] > 0
