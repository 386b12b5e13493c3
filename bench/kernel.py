"""Per-call time of a trivial function from a Jupyter kernel beside a script (issue 16 §2).

The same code, ``CALLER``, runs as a plain ``python -c`` script and as a cell in a
real Jupyter kernel (ipykernel, started with jupyter_client, as a notebook
server does): a session on the benchmark daemon's ``fast`` pool, a function
defined there (in that ``__main__``), warm-up calls, then ``n`` timed sync calls.
Each side prints its latency summary as one ``KERNELBENCH {json}`` line. The two
alternate ``rounds`` times and each keeps its better p50, so background load
that comes and goes does not decide the comparison. Skipped with a note when
jupyter_client or ipykernel is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from typing import Any

MARK = "KERNELBENCH "

CALLER = """
import json, time
import cruised
from bench import stats
s = cruised.session(socket={socket!r}, pool="fast")
def add10(x):
    return x + 10
for i in range(300):
    s.call(add10, i)
samples = []
for i in range({n}):
    t0 = time.perf_counter()
    s.call(add10, i)
    samples.append(time.perf_counter() - t0)
s.close()
print({mark!r} + json.dumps(stats.summary_us(samples)), flush=True)
"""


def _parse(text: str) -> dict[str, Any]:
    for line in text.splitlines():
        if line.startswith(MARK):
            return dict(json.loads(line[len(MARK) :]))
    raise RuntimeError(f"no {MARK.strip()} line in the output: {text[-2000:]}")


def from_script(code: str, cwd: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=cwd)
    return _parse(out.stdout + out.stderr)


def from_kernel(code: str, cwd: str) -> dict[str, Any]:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=cwd)
    try:
        text: list[str] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["msg_type"] == "stream":
                text.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                text.append("\n".join(msg["content"]["traceback"]))

        kc.execute_interactive(code, output_hook=hook, timeout=600)
        return _parse("".join(text))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def compare(socket: str, n: int, rounds: int, cwd: str) -> dict[str, Any]:
    """``{"script": summary, "kernel": summary}`` (each its best round by p50), or ``{"skipped": why}``."""
    missing = [m for m in ("jupyter_client", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{', '.join(missing)} not installed (pip install -e '.[test]')"}
    code = CALLER.format(socket=socket, n=n, mark=MARK)
    best: dict[str, Any] = {}
    for _ in range(rounds):
        for where, run in (("script", from_script), ("kernel", from_kernel)):
            got = run(code, cwd)
            if where not in best or got["p50_us"] < best[where]["p50_us"]:
                best[where] = got
    best["rounds"] = rounds
    return best
