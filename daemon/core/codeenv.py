"""Code envs: running a pool's workers under another Python interpreter.

A pool with ``python: /path/to/venv/bin/python`` starts its template (and so
its workers) as ``/path/to/venv/bin/python -m cruised.pool.template``. That
env does not need cruised installed: the launcher puts a private directory
first on the template's ``PYTHONPATH``, holding a package ``cruised`` whose
``pool`` is a symlink to this daemon's own ``pool/`` directory and whose
``__init__`` re-exports the endpoint helpers (``ApiError``,
``CustomResponse``). So the worker code always speaks this daemon's wire
format, whatever cruised version (if any) the env has installed, and endpoint
code may ``from cruised import ApiError`` in any pool.

What the env needs
    Nothing but Python 3.10 or later and the endpoints' own libraries:
    ``cruised.pool`` imports only the standard library. Shipped functions
    (``@cruised.function``), and their arguments and results when they hold
    what the client's ``__main__`` defined, are pickled by cloudpickle; the
    shim appends the daemon's own cloudpickle (pure Python) at the END of the
    path, so an env without it loads them and an env with its own cloudpickle
    uses that (it must then be a 3.x, as the client's: a stream names
    cloudpickle's own loader functions). They also need the
    client's Python minor version: registration refuses a mismatch, naming
    both versions.

Why a template failed
    The template's own stderr (import errors, a wrong interpreter) is read
    here, logged with a ``pool=`` tag, and its last line goes into the pool's
    error, so ``cruised status`` says "No module named ..." rather than
    "exit code 1".
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import shutil
import sys
import tempfile
from typing import IO

import cloudpickle

import cruised.pool

log = logging.getLogger("cruised.codeenv")

_SHIM_INIT = '''"""The daemon's worker package, for a pool's own interpreter (written by cruised; do not edit)."""
import sys

# the daemon's cloudpickle, for shipped functions, LAST on the path: one the env has installed wins
if {fallback!r} not in sys.path:
    sys.path.append({fallback!r})

from .pool.api import ApiError, CustomResponse, DkuCustomApiException, DkuCustomHttpResponse  # noqa: E402,F401 - after the path set-up; re-exported
'''

_shim: str | None = None


def shim_dir() -> str:
    """The directory to put first on a foreign interpreter's path (created once per daemon)."""
    global _shim
    if _shim is None or not os.path.isdir(_shim):
        root = tempfile.mkdtemp(prefix="cruised-codeenv-")
        path = os.path.join(root, "path")
        fallback = os.path.join(root, "fallback")
        pkg = os.path.join(path, "cruised")
        os.makedirs(pkg)
        os.mkdir(fallback)
        with open(os.path.join(pkg, "__init__.py"), "w", encoding="utf-8") as fh:
            fh.write(_SHIM_INIT.format(fallback=fallback))
        os.symlink(os.path.dirname(os.path.abspath(cruised.pool.__file__)), os.path.join(pkg, "pool"))
        os.symlink(os.path.dirname(os.path.abspath(cloudpickle.__file__)), os.path.join(fallback, "cloudpickle"))
        atexit.register(shutil.rmtree, root, True)
        _shim = path
    return _shim


def is_foreign(python: str) -> bool:
    """Whether ``python`` is another interpreter than the daemon's own (which has cruised installed)."""
    return os.path.abspath(python) != os.path.abspath(sys.executable)


def template_env(python: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` adjusted so that ``python -m cruised.pool.template`` works under ``python``."""
    if not is_foreign(python):
        return env
    env = dict(env)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = shim_dir() + (os.pathsep + old if old else "")
    env.pop("PYTHONHOME", None)  # the daemon's home would break another installation
    return env


class TemplateOutput:
    """A template's stderr: logged line by line, the last lines kept to explain a failure."""

    TAIL = 8

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: str, stream: IO[bytes]) -> None:
        self.loop = loop
        self.pool = pool
        self.stream = stream
        self.fd = stream.fileno()
        os.set_blocking(self.fd, False)
        self.buf = bytearray()
        self.tail: collections.deque[str] = collections.deque(maxlen=self.TAIL)
        self.open = True
        loop.add_reader(self.fd, self.read)

    def read(self) -> None:
        """Take whatever is there (until EOF or nothing more to read now)."""
        while self.open:
            try:
                data = os.read(self.fd, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self.close()
                return
            self.buf += data
            while b"\n" in self.buf:
                line, _, rest = bytes(self.buf).partition(b"\n")
                self.buf = bytearray(rest)
                self._line(line)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            self.tail.append(line)
            log.warning("pool=%s template: %s", self.pool, line)

    def close(self) -> None:
        if not self.open:
            return
        self.open = False
        self.loop.remove_reader(self.fd)
        if self.buf:
            self._line(bytes(self.buf))
            self.buf.clear()
        self.stream.close()

    def last_line(self) -> str | None:
        return self.tail[-1] if self.tail else None


def exit_message(python: str, code: int | None, output: TemplateOutput | None) -> str:
    """Why a template exited before it was ready, in one line."""
    if output is not None:
        output.read()
    last = output.last_line() if output is not None else None
    how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
    if last:
        return f"{python} could not start the pool's template ({how}): {last}"
    return f"{python} could not start the pool's template ({how}, no output): is it a Python 3.10+ interpreter?"
