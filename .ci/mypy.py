"""Type-check the import packages `cruised` and `cruised.pool` with the project's mypy config.

Usage (from anywhere; CI runs it from the repository root)::

    .venv/bin/python .ci/mypy.py [extra mypy options]

Why a script rather than ``mypy -p cruised``: the import names are not the folder names
(pyproject's ``package-dir`` maps ``cruised`` <- ``daemon/`` and ``cruised.pool`` <- ``pool/``),
and the editable install (PEP 660) is an import hook, which mypy does not run, so plain mypy
reports "Can't find package 'cruised'". This script builds the layout the import system sees
-- ``cruised/`` holding one symlink per entry of ``daemon/`` plus ``cruised/pool -> pool/`` --
runs mypy there on the package with ``pyproject.toml``'s ``[tool.mypy]``, and rewrites the file
names in mypy's report back to the repository's (``cruised/pool/x.py`` -> ``pool/x.py``,
``cruised/x.py`` -> ``daemon/x.py``), relative to the current directory (absolute with
``--show-absolute-path``), so editors and CI annotations open the real files.

The tree is rebuilt on every run in ``.mypy_cache/cruised-tree/`` (git-ignored, like the rest of
mypy's cache), always at that path: mypy's incremental cache stores the errors of unchanged
modules under the file names of the run that found them, so a tree at a new temporary path
each run would get back names that no longer exist. Nothing else is written in the checkout.

Exit status: mypy's (0 clean, 1 type errors, 2 usage or crash).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "cruised"
# the import package -> its folder, as in pyproject's [tool.setuptools] package-dir
TOP, SUB = REPO / "daemon", REPO / "pool"
CACHE = REPO / ".mypy_cache"
TREE = CACHE / "cruised-tree"


def build_tree(root: Path) -> None:
    """root/cruised/ mirrors daemon/ entry by entry, with pool/ as its subpackage `pool`.

    Rebuilt from scratch: an entry added to or removed from daemon/ since the last run counts."""
    shutil.rmtree(root, ignore_errors=True)
    pkg = root / PACKAGE
    pkg.mkdir(parents=True)
    if (TOP / SUB.name).exists():
        sys.exit(f".ci/mypy.py: {TOP / SUB.name} would hide {SUB} as {PACKAGE}.{SUB.name}")
    for entry in sorted(TOP.iterdir()):
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    (pkg / SUB.name).symlink_to(SUB)


def to_repo_paths(report: str, root: Path) -> str:
    """Map each report line's leading file name from the tree back to the checkout."""
    here = Path.cwd()

    def real(m: re.Match[str]) -> str:
        absolute, rel = m.group(1), m.group(2)
        # the longest mapping first: cruised/pool/ is inside cruised/
        for prefix, folder in ((f"{PACKAGE}/{SUB.name}/", SUB), (f"{PACKAGE}/", TOP)):
            if rel.startswith(prefix):
                path = folder / rel[len(prefix) :]
                return str(path) if absolute else os.path.relpath(path, here)
        return m.group(0)

    # relative names (mypy's default) or absolute ones (--show-absolute-path)
    lead = re.compile(rf"^({re.escape(str(root))}/)?({PACKAGE}/[^:\s]*\.pyi?)(?=:)", re.MULTILINE)
    return lead.sub(real, report)


def main(argv: list[str]) -> int:
    build_tree(TREE)
    cmd = [
        sys.executable, "-m", "mypy",
        # explicit: mypy would otherwise look for a config file in the tree and its parents
        "--config-file", str(REPO / "pyproject.toml"),
        "--cache-dir", str(CACHE),
        *argv,
        "-p", PACKAGE,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=TREE, capture_output=True, text=True, check=False)
    sys.stdout.write(to_repo_paths(done.stdout, TREE))
    sys.stderr.write(to_repo_paths(done.stderr, TREE))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
