"""PSS of processes, from ``/proc/<pid>/smaps_rollup`` (Linux >= 4.14).

PSS (proportional set size) charges each shared page to its sharers in equal
parts, so the PSS of N workers forked from one template adds up to what they
really cost together. The reference is a fresh interpreter that imported the
same modules and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import time


def pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def fresh_interpreter_kb(imports: str = "numpy, pandas") -> int:
    """PSS of ``python -c 'import <imports>'`` once its imports are done (it is then ended)."""
    code = f"import sys, {imports}; print('ok', flush=True); sys.stdin.read()"
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None
        if p.stdout.readline().strip() != b"ok":
            raise RuntimeError("reference interpreter failed to import " + imports)
        time.sleep(0.2)  # let it settle, as the idle workers have
        kb = pss_kb(p.pid)
        if kb is None:
            raise RuntimeError("cannot read /proc/<pid>/smaps_rollup")
        return kb
    finally:
        assert p.stdin is not None
        p.stdin.close()
        p.wait(timeout=10)
