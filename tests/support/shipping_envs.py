"""Running the shipping matrix (shipping_matrix.py) where users write code.

Four environments, one source of cases: ``script`` (``python shipping_matrix.py``),
``repl`` (a plain ``python`` REPL in a pty, the cells typed in statement by
statement), ``ipython`` (IPython's ``run_cell`` per cell, as its terminal does)
and ``notebook`` (a real Jupyter kernel executing a notebook built from the
cells, through nbclient). Each returns ``{case: "ok" | reason}`` parsed from the
``MATRIX|...`` lines the cases print; a missing ``MATRIX|END`` line is an error
carrying the environment's output.

``env`` is the environment of the process that runs the cases: CRUISED_SOCKET
for a daemon, or SHIPPING_BACKEND=cloudpickle for the reference
(SHIPPING_REFERENCE_LIB=dill: the same with dill). ``python -m support.shipping_envs``
(from tests/) prints the table of every case in every environment, cruised's
beside the references' (docs/shipping.md has one).
"""

from __future__ import annotations

import ast
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MATRIX = Path(__file__).with_name("shipping_matrix.py")
SUPPORT_PATH = str(Path(__file__).resolve().parent.parent)
ENVIRONMENTS = ("script", "repl", "ipython", "notebook")
TIMEOUT = 240.0


def cells() -> list[str]:
    """The matrix's cells (split at ``# %%`` lines), without the header comment."""
    out: list[str] = []
    for chunk in MATRIX.read_text().split("\n# %%\n")[1:]:
        out.append(chunk.strip("\n"))
    return out


def parse(output: str) -> dict[str, str]:
    results: dict[str, str] = {}
    for line in output.splitlines():
        line = line.strip("\r")
        if not line.startswith("MATRIX|"):
            continue
        _, name, verdict, *rest = line.split("|", 3)
        if name == "END":
            if len(results) != int(verdict):
                raise AssertionError(f"{int(verdict)} cases, {len(results)} results:\n{output[-6000:]}")
            return results
        results[name] = "ok" if verdict == "ok" else (rest[0] if rest else verdict)
    raise AssertionError(f"the matrix did not finish:\n{output[-6000:]}")


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    env["SHIPPING_SUPPORT_PATH"] = SUPPORT_PATH
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_script(env: dict[str, str], cwd: Path) -> dict[str, str]:
    proc = subprocess.run([sys.executable, str(MATRIX)], capture_output=True, text=True, env=_env(env), cwd=cwd, timeout=TIMEOUT)
    return parse(proc.stdout + proc.stderr)


def repl_lines(cell: str) -> list[str]:
    """A cell as typed into the plain REPL: each top-level statement (decorators included), then a
    blank line, which ends a block there. Cells have no blank lines or multi-line strings."""
    lines = cell.splitlines()
    typed: list[str] = []
    for node in ast.parse(cell).body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        assert node.end_lineno is not None
        typed.extend(line for line in lines[first - 1 : node.end_lineno] if line.strip())
        typed.append("")
    return typed


def run_repl(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """A plain ``python`` REPL on a pty: each line is typed once the REPL has asked for it."""
    main_fd, tty_fd = os.openpty()
    # PYTHON_BASIC_REPL: 3.13's REPL auto-indents typed lines, which would indent ours twice.
    # Popen, not pty.fork: no fork of this (maybe multi-threaded) process
    proc = subprocess.Popen(
        [sys.executable, "-q", "-i"],
        stdin=tty_fd,
        stdout=tty_fd,
        stderr=tty_fd,
        env={**_env(env), "PYTHON_BASIC_REPL": "1", "TERM": "dumb"},
        cwd=cwd,
        start_new_session=True,
    )
    os.close(tty_fd)
    out = bytearray()
    deadline = time.monotonic() + TIMEOUT

    def read_until(predicate: Callable[[], bool], exiting: bool = False) -> None:
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"the REPL stalled:\n{out[-6000:].decode(errors='replace')}")
            ready, _, _ = select.select([main_fd], [], [], 0.5)
            if not ready:
                continue
            try:
                chunk = os.read(main_fd, 65536)
            except OSError:  # EIO: the REPL exited and closed the pty
                chunk = b""
            if not chunk:
                if exiting:
                    return
                raise AssertionError(f"the REPL exited with {proc.wait(5)}:\n{out[-6000:].decode(errors='replace')}")
            out.extend(chunk)

    def prompted() -> bool:
        return out.endswith((b">>> ", b"... "))

    try:
        read_until(prompted)
        for cell in cells():
            for line in repl_lines(cell):
                del out[-4:]  # the prompt answered: the next prompt is the one to wait for
                os.write(main_fd, line.encode() + b"\n")
                read_until(prompted)
        os.write(main_fd, b"exit()\n")
        read_until(lambda: False, exiting=True)
    finally:
        proc.kill()
        proc.wait()
        os.close(main_fd)
    return parse(out.decode(errors="replace"))


_IPYTHON_DRIVER = """
import json
for _cell in json.load(open({path!r})):
    get_ipython().run_cell(_cell)
"""


def run_ipython(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """IPython: every cell through the shell's ``run_cell``, as its terminal runs what is typed."""
    import json

    cell_file = cwd / "cells.json"
    cell_file.write_text(json.dumps(cells()))
    cmd = [
        sys.executable,
        "-m",
        "IPython",
        "--no-banner",
        "--colors=nocolor",
        "--HistoryManager.enabled=False",
        "-c",
        _IPYTHON_DRIVER.format(path=str(cell_file)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(env), cwd=cwd, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    return parse(proc.stdout + proc.stderr)


def run_notebook(env: dict[str, str], cwd: Path) -> dict[str, str]:
    """A real Jupyter kernel (ipykernel) executing a notebook of the cells, through nbclient."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells()]
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3", allow_errors=True, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=_env(env))  # passed on to the kernel manager's start_kernel: the kernel's environment
    text: list[str] = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text.append(output["text"])
            elif output.get("output_type") == "error":
                text.append("\n".join(output.get("traceback", [])))
    return parse("".join(text))


RUNNERS = {"script": run_script, "repl": run_repl, "ipython": run_ipython, "notebook": run_notebook}


BACKENDS = ("cruised", "cloudpickle", "dill")


def run_backend(backend: str, where: str, cwd: Path, socket: str = "") -> dict[str, str]:
    """One column of the table: the matrix in ``where`` against cruised (on ``socket``) or a reference."""
    env = {"CRUISED_SOCKET": socket} if backend == "cruised" else {"SHIPPING_BACKEND": "cloudpickle", "SHIPPING_REFERENCE_LIB": backend}
    return RUNNERS[where](env, cwd)


def table(results: dict[tuple[str, str], dict[str, str]]) -> str:
    """Markdown: one row per case, one column per (backend, environment) run."""
    columns = list(results)
    cases = list(next(iter(results.values())))
    lines = ["| case | " + " | ".join(f"{b}: {w}" for b, w in columns) + " |", "|---|" + ":-:|" * len(columns)]
    for case in cases:
        lines.append(f"| `{case}` | " + " | ".join("✓" if results[c].get(case) == "ok" else "✗" for c in columns) + " |")
    passed = [f"{sum(v == 'ok' for v in results[c].values())}/{len(cases)}" for c in columns]
    lines.append("| **passed** | " + " | ".join(passed) + " |")
    return "\n".join(lines)


def main() -> None:
    """``cd tests && python -m support.shipping_envs``: the matrix in every environment, against
    a daemon started here and the references (cloudpickle, dill), as a Markdown table."""
    import tempfile

    from support.daemon import Daemon, pool_config

    work = Path(tempfile.mkdtemp(prefix="matrix"))
    d = Daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1, exec_timeout="60s")}}, work).start()
    results: dict[tuple[str, str], dict[str, str]] = {}
    try:
        for backend in BACKENDS:
            for where in ENVIRONMENTS:
                results[backend, where] = run_backend(backend, where, work, d.socket)
    finally:
        d.cleanup()
    print(table(results))


if __name__ == "__main__":
    main()
