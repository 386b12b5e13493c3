"""A pykx TLS client (``SyncQConnection(tls=True)``) that runs in a process of its own.

Why a process: libe, the C library under pykx's IPC client, reads its TLS settings from the
environment (``SSL_CA_CERT_FILE``, ``KX_SSL_VERIFY_SERVER``, ``KX_SSL_CA_CERT_FILE``, ...) once,
at the process's first TLS connection attempt -- even one that fails -- and keeps them for the
life of the process; setting them afterwards changes nothing (importing pykx does not read
them). In one pytest process, the first test to open a pykx TLS connection therefore fixes the
TLS settings of every later one: a test that trusts its own throwaway certificate through
``SSL_CA_CERT_FILE`` makes a later test that turns verification off with
``KX_SSL_VERIFY_SERVER=NO`` fail with pykx's bare "Connection error" (the other certificate is
not trusted). And an env var set in ``os.environ`` for libe leaks into every daemon a later
test starts (the harness copies ``os.environ``), where the workers' libe reads it too.

So every pykx TLS client in the tests is a :class:`TlsQ`: a child interpreter started with
exactly the TLS settings it is given (every inherited ``KX_SSL_*``/``SSL_*`` variable is
dropped first), holding one connection; calls go to it over a pipe (length-prefixed pickles)
and results come back as Python values (``.py()``), errors as the exception pykx raised
there. Nothing in the test process's environment or its own libe is touched.

    with TlsQ(port, tls_env={"KX_SSL_VERIFY_SERVER": "NO"}, username="u", password="p") as c:
        assert c("demo/add", 20, 1) == 21
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

SCRIPT = Path(__file__).resolve()
HEADER = struct.Struct("<I")


def _is_tls_setting(name: str) -> bool:
    # libe's names (strings in libe.so): KX_SSL_CERT_FILE, KX_SSL_CA_CERT_FILE, KX_SSL_CA_CERT_PATH,
    # KX_SSL_KEY_FILE, KX_SSL_CIPHER_LIST, KX_SSL_VERIFY_CLIENT/SERVER, and SSL_CERT_FILE,
    # SSL_CA_CERT_FILE, SSL_CA_CERT_PATH, ... without the prefix
    return name.startswith(("KX_SSL_", "SSL_"))


class TlsQ:
    """``pykx.SyncQConnection(host, port, tls=True, no_ctx=True, ...)`` in a child process whose
    libe sees ``tls_env`` and no other TLS setting. Raises what pykx raised if it cannot connect."""

    def __init__(
        self,
        port: int,
        *,
        tls_env: dict[str, str],
        host: str = "127.0.0.1",
        username: str = "",
        password: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="qtls")
        self.stderr_path = Path(self._tmp.name) / "stderr.log"
        env = {k: v for k, v in os.environ.items() if not _is_tls_setting(k) and k not in ("PYKX_LICENSED", "QARGS")}
        env.update(tls_env)
        env["PYKX_UNLICENSED"] = "true"  # a client needs no licence: the same on every machine
        env.setdefault("PYKX_SUPPRESS_WARNINGS", "true")
        # stderr goes to a file: a chatty child must never block on a pipe that nobody reads
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                start_new_session=True,  # a ^C in the test's terminal must not hit the client first
            )
        try:
            self._exchange((host, port, {"username": username, "password": password, "timeout": timeout}))
        except BaseException:
            self.close()
            raise

    def __call__(self, query: str, *args: Any) -> Any:
        """``conn(query, *args).py()`` in the child; a pykx error there is raised here."""
        return self._exchange((query, args))

    def _exchange(self, message: object) -> Any:
        assert self.proc.stdin is not None
        _send(self.proc.stdin, message)
        outcome, value = self._receive()
        if outcome == "error":
            raise value
        return value

    def _receive(self) -> Any:
        assert self.proc.stdout is not None
        fd, buf = self.proc.stdout.fileno(), b""
        deadline = time.monotonic() + self.timeout + 10  # pykx bounds the connect and reply itself; this is the backstop
        while len(buf) < HEADER.size or len(buf) < HEADER.size + HEADER.unpack_from(buf)[0]:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the pykx TLS client did not answer within {self.timeout + 10}s: {self.stderr()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"the pykx TLS client exited (status {self.proc.wait()}): {self.stderr()}")
                buf += chunk
        return pickle.loads(buf[HEADER.size :])

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def close(self) -> None:
        """Close the connection (EOF on the child's stdin), reap the child (SIGKILL after 10 s)."""
        p = self.proc
        try:
            if p.stdin is not None:
                try:
                    p.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
        finally:
            if p.stdout is not None:
                p.stdout.close()
            self._tmp.cleanup()

    def __enter__(self) -> TlsQ:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _send(out: BinaryIO, message: object) -> None:
    data = pickle.dumps(message)
    out.write(HEADER.pack(len(data)) + data)
    out.flush()


def _read(src: BinaryIO) -> Any:
    head = src.read(HEADER.size)
    if len(head) < HEADER.size:
        return None  # EOF: the parent is done
    return pickle.loads(src.read(HEADER.unpack(head)[0]))


def _reply(out: BinaryIO, outcome: str, value: object) -> None:
    try:
        _send(out, (outcome, value))
    except (pickle.PicklingError, TypeError, AttributeError) as exc:  # an unpicklable result or exception: say what it was instead
        _send(out, ("error", RuntimeError(f"cannot send back {value!r}: {exc}")))


def _child() -> None:
    import pykx as kx

    src, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything pykx prints goes to stderr: stdout carries only replies
    host, port, kw = _read(src)
    try:
        conn = kx.SyncQConnection(host, port, tls=True, no_ctx=True, **kw)
    except Exception as exc:  # noqa: BLE001 - whatever pykx raised, the parent raises
        _reply(out, "error", exc)
        return
    _reply(out, "ok", None)
    with conn:
        while (message := _read(src)) is not None:
            query, args = message
            try:
                _reply(out, "ok", conn(query, *args).py())
            except Exception as exc:  # noqa: BLE001 - whatever pykx raised, the parent raises
                _reply(out, "error", exc)


if __name__ == "__main__":
    _child()
