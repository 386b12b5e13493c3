"""A kdb+ IPC test server in Python, plus a helper that runs it in a child process.

There is no q binary or kdb+ licence on the test machines. This server speaks the real
wire protocol, so real pykx clients (unlicensed) can talk to it. It uses plain sockets,
one thread per connection, and ``pykx.deserialize`` / ``pykx.serialize``. Both work
without a licence.

It must run in a separate process. pykx's C handshake (``khpunc`` in libe) holds the GIL.
A server thread inside the client's interpreter would therefore never get to reply, and
the two would deadlock. Use :func:`run_qserver`, or run the script yourself::

    python tests/support/qserver.py --port 0 [--host 127.0.0.1] [--unix] [--tls CERT KEY]
                            [--users FILE] [--user u:p ...] [--record FILE]

Once bound, it prints ``LISTENING <port>`` to stdout (``--port 0`` picks a free port).
It prints nothing else to stdout; logs go to stderr. It binds loopback only. With
``--unix`` it also listens on the abstract Unix socket ``@/tmp/kx.<port>``, which is what
``pykx.SyncQConnection(port=p, unix=True)`` dials. With ``--tls CERT KEY`` the TCP listener
speaks TLS (for ``tls=True`` clients; libe in the client needs ``SSL_CA_CERT_FILE=CERT`` or
``KX_SSL_VERIFY_SERVER=NO`` in its environment at its first TLS connect: use
:class:`support.qtls.TlsQ`, which runs the client in a process of its own). SIGTERM closes every connection and exits
with status 0 at once.

Handshake (as q does it): the client sends ``user:password`` + an optional capability
byte + NUL. If it is accepted, the server replies with ONE byte: min(capability, 6), or 0
when the client gave no capability. If it is rejected, the server closes the socket and
sends nothing, and pykx raises ``PyKXException('Authentication error')``. Users come from
``--users FILE`` (q's -U format: one ``user:password`` per line; the password is plain
text, or the 32-hex MD5 or the 40-hex SHA-1 of the password, so a plain password that
looks like such a hash cannot be written plain) and from ``--user u:p`` (plain). With no
users configured, anyone is accepted. ``--record FILE`` appends one JSON line per
handshake: ``{"user": str, "ok": bool, "cap": int | null, "t": float}`` (cap is the byte the
client offered; t is ``time.monotonic()``, which on Linux is one clock for every process, so
a test can measure the spacing of a client's connection attempts).

Messages: an 8-byte header (endianness, type 0 async / 1 sync / 2 response, compressed
flag, reserved, uint32 total length) and then the body. Sync messages get a response
(type 2). Errors go back as 0x80 + a NUL-terminated message, which pykx raises as
``QError(message)``. Async messages are evaluated and never answered. Replies are
serialized in the capability agreed in the handshake.

Queries: a string, or a general list ``(query; args...)``. This is what pykx sends for
``conn(query, *args)``; note that pykx sends Python ``str`` args as symbols. Evaluated
against an in-memory ``trade`` table (sym symbol, time timestamp, price float, size long;
1000 rows over AAPL MSFT GOOG IBM, the same every run):

  "trade" | "select from trade"              whole table
  "select from trade where sym=`AAPL"       rows of that sym
  ("{select from trade where sym=x}"; `AAPL)   the same, with the sym as an argument
  ("{x+y}"; a; b)                           a+b (atoms or vectors)
  "1+1"                                     sum of two numeric literals
  "til N"                                   LongVector 0..N-1
  "vwap"                                    keyed table sym -> vwap (sum price*size % sum size)
  "select vwap:size wavg price by sym from trade"   the same keyed table (the q a user would write)
  ("vwap"; `SYM)                            FloatAtom vwap of SYM (0n if unknown)
  ("sleep"; secs) | "sleep secs"            sleeps, then returns secs
  "err" | ("err"; "msg")                    error reply "err" / "msg"
  "close"                                   server closes this connection, without a reply
  ("echo"; x)                               x, unchanged
  ("incr"; `name)                           adds 1 to counter `name, returns the new count
  ("incr"; `name; `close)                   adds 1, then closes this connection without a reply
                                            (a query that "ran" but whose answer was lost)
  (".cruised.test.count"; `name)            LongAtom: counter `name (0 if never incremented)
  ".cruised.test.connections"               LongAtom: accepted handshakes since start
  ".cruised.test.users"                     SymbolVector: accepted user names, first-seen order
  anything else                             error "nyi: <query>"

Wrong argument counts give "rank", and a non-symbol vwap or counter name gives "type". Counters
live in the server process, so a restart resets them. Clients must
connect with ``no_ctx=True``. Without it, pykx sends q-specific context probes on connect.
They get ``nyi`` back, and the constructor fails with an AttributeError. The probes are not
emulated.

pykx import: set ``PYKX_UNLICENSED=true`` (``QARGS=--unlicensed`` also works). That skips
the licensed-q init check in a subprocess (about 0.7 s) and the interactive licence prompt
that an interactive interpreter shows. :class:`QServer` always starts the child unlicensed
(it sets the variable and drops ``PYKX_LICENSED`` / ``QARGS``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import re
import select
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
SYMS = ("AAPL", "MSFT", "GOOG", "IBM")
kx: Any = None  # pykx, imported only by the server, so the helper never pays for it


class QueryError(Exception):
    """Sent back to the client as a kdb+ error reply."""


class CloseConnection(Exception):
    pass


def make_trade(n: int = 1000) -> Any:
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(20240102)
    sym = np.array(SYMS, dtype=object)[rng.integers(0, len(SYMS), n)]
    price = np.round(100 + np.cumsum(rng.normal(0, 0.5, n)), 2)
    return pd.DataFrame(
        {
            "sym": sym,
            "time": pd.Timestamp("2024-01-02 09:30:00") + pd.to_timedelta(np.arange(n) * 250, unit="ms"),
            "price": price,
            "size": rng.integers(1, 50, n).astype(np.int64) * 100,
        }
    )


def check_password(stored: str, given: str) -> bool:
    if re.fullmatch(r"[0-9a-fA-F]{32}", stored):
        stored, given = stored.lower(), hashlib.md5(given.encode()).hexdigest()
    elif re.fullmatch(r"[0-9a-fA-F]{40}", stored):
        stored, given = stored.lower(), hashlib.sha1(given.encode()).hexdigest()
    return hmac.compare_digest(stored.encode(), given.encode())


def error_frame(msg: str) -> bytes:
    body = b"\x80" + msg.encode("utf-8", "replace").replace(b"\0", b" ") + b"\0"
    return struct.pack("<BBBBI", 1, 2, 0, 0, 8 + len(body)) + body


def recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def text_of(k: Any) -> str | None:
    if isinstance(k, (kx.CharVector, kx.CharAtom, kx.SymbolAtom)):
        v = k.py()
        return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    return None


class Server:
    def __init__(self, users: dict[str, str], record: Path | None, tls: ssl.SSLContext | None):
        self.users, self.tls = users, tls
        self.record = record.open("a", encoding="utf-8") if record else None
        self.lock = threading.Lock()
        self.connections = 0
        self.users_seen: list[str] = []
        self.counters: dict[str, int] = {}
        self.trade = make_trade()
        self.trade_k = kx.toq(self.trade)

    def serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(10.0)  # a peer that never finishes TLS or the handshake must not pin a thread
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            cap = self.handshake(conn)
            if cap is not None:
                self.loop(conn, cap)
        except (OSError, ValueError) as e:
            print(f"qserver: connection ended: {e!r}", file=sys.stderr, flush=True)
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def handshake(self, conn: socket.socket) -> int | None:
        raw = b""
        while b"\0" not in raw:
            chunk = conn.recv(256)
            if not chunk or len(raw) > 4096:
                return None
            raw += chunk
        conn.settimeout(None)
        cred = raw[: raw.index(b"\0")]
        cap = None
        if cred and cred[-1] < 32:  # printable bytes are credentials, a control byte is the capability
            cred, cap = cred[:-1], cred[-1]
        user, _, password = cred.decode("utf-8", "replace").partition(":")
        ok = not self.users or (user in self.users and check_password(self.users[user], password))
        with self.lock:
            if ok:
                self.connections += 1
                if user not in self.users_seen:
                    self.users_seen.append(user)
            if self.record:
                self.record.write(json.dumps({"user": user, "ok": ok, "cap": cap, "t": time.monotonic()}) + "\n")
                self.record.flush()  # other processes count these lines while we run
        if not ok:
            return None  # q closes without a word; pykx turns that into "Authentication error"
        agreed = min(cap, 6) if cap is not None else 0
        conn.sendall(bytes([agreed]))
        return agreed

    def loop(self, conn: socket.socket, cap: int) -> None:
        while True:
            hdr = recv_exact(conn, 8)
            if hdr is None:
                return
            order = "little" if hdr[0] == 1 else "big"
            size = int.from_bytes(hdr[4:8], order) | (hdr[3] << 32)  # byte 3: high bits for cap 6
            body = recv_exact(conn, size - 8) if size >= 8 else None
            if body is None:
                return
            try:
                reply = kx.serialize(self.evaluate(kx.deserialize(hdr + body)), mode=cap, wait=2).copy()
            except CloseConnection:
                return
            except QueryError as e:
                reply = error_frame(str(e))
            except Exception as e:  # noqa: BLE001 - a bad message or an unserializable result: q would reply 'type etc.
                reply = error_frame(str(e) or type(e).__name__)
            if hdr[1] == 1:
                conn.sendall(reply)

    def evaluate(self, msg: Any) -> Any:
        query, args = text_of(msg), []
        if query is None and isinstance(msg, kx.List):
            items = list(msg)  # iterating works unlicensed; indexing does not
            if items:
                query, args = text_of(items[0]), items[1:]
        if query is None:
            raise QueryError(f"nyi: {type(msg).__name__}")
        q = query.strip()
        nargs = len(args)

        if nargs == 0 and q in ("trade", "select from trade"):
            return self.trade_k
        if nargs == 0 and (m := re.fullmatch(r"select from trade where sym\s*=\s*`(\w*)", q)):
            return kx.toq(self.trade[self.trade["sym"] == m[1]].reset_index(drop=True))
        if q == "{select from trade where sym=x}":
            if nargs != 1:
                raise QueryError("rank")
            if not isinstance(args[0], kx.SymbolAtom):
                raise QueryError("type")
            return kx.toq(self.trade[self.trade["sym"] == text_of(args[0])].reset_index(drop=True))
        if q == "{x+y}":
            if nargs != 2:
                raise QueryError("rank")
            return kx.toq(args[0].np() + args[1].np())
        if nargs == 0 and (m := re.fullmatch(r"(-?\d+(?:\.\d*)?)\s*\+\s*(-?\d+(?:\.\d*)?)", q)):
            num = float if "." in q else int
            return kx.toq(num(m[1]) + num(m[2]))
        if nargs == 0 and (m := re.fullmatch(r"til\s+(\d+)", q)):
            return kx.LongVector(__import__("numpy").arange(int(m[1]), dtype="int64"))
        if nargs == 0 and re.fullmatch(r"select\s+vwap\s*:\s*size\s+wavg\s+price\s+by\s+sym\s+from\s+trade", q):
            return self.vwap(None)
        if q == "vwap":
            if nargs and text_of(args[0]) is None:
                raise QueryError("type")
            return self.vwap(text_of(args[0]) if nargs else None)
        if (q == "sleep" and nargs == 1) or (nargs == 0 and re.fullmatch(r"sleep\s+[\d.]+", q)):
            secs = args[0] if nargs else kx.toq(float(q[5:]))
            time.sleep(max(0.0, float(secs.py())))
            return secs
        if q == "err":
            raise QueryError((text_of(args[0]) if nargs else None) or "err")
        if q == "close":
            raise CloseConnection
        if q == "echo":
            if nargs != 1:
                raise QueryError("rank")
            return args[0]
        if q in ("incr", ".cruised.test.count"):
            if not 1 <= nargs <= (2 if q == "incr" else 1):
                raise QueryError("rank")
            name = text_of(args[0]) if isinstance(args[0], kx.SymbolAtom) else None
            if name is None or (nargs == 2 and text_of(args[1]) != "close"):
                raise QueryError("type")
            with self.lock:
                if q == "incr":
                    self.counters[name] = self.counters.get(name, 0) + 1
                count = self.counters.get(name, 0)
            if nargs == 2:
                raise CloseConnection
            return kx.LongAtom(count)
        if q == ".cruised.test.connections":
            with self.lock:
                return kx.LongAtom(self.connections)
        if q == ".cruised.test.users":
            with self.lock:
                return kx.SymbolVector(list(self.users_seen))
        raise QueryError(f"nyi: {q}")

    def vwap(self, sym: str | None) -> Any:
        t = self.trade
        if sym is not None:
            rows = t[t["sym"] == sym]
            return kx.FloatAtom(float((rows.price * rows["size"]).sum() / rows["size"].sum()) if len(rows) else float("nan"))
        g = t.assign(pv=t.price * t["size"]).groupby("sym", sort=True)[["pv", "size"]].sum()
        return kx.toq((g.pv / g["size"]).rename("vwap").to_frame())


def listen(host: str, port: int, unix: bool) -> list[socket.socket]:
    addr = socket.gethostbyname(host)
    if not ipaddress.ip_address(addr).is_loopback:
        raise SystemExit(f"qserver: refusing non-loopback host {host!r}")
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart() rebinds past TIME_WAIT
    tcp.bind((addr, port))
    tcp.listen(128)
    socks = [tcp]
    if unix:
        us = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        us.bind(f"\0/tmp/kx.{tcp.getsockname()[1]}")  # abstract: nothing on disk to clean up
        us.listen(128)
        socks.append(us)
    return socks


def parse_users(files: Sequence[str], pairs: Sequence[str]) -> dict[str, str]:
    lines = [ln for f in files for ln in Path(f).read_text().splitlines()] + list(pairs)
    users = {}
    for ln in lines:
        if ln.strip():
            u, _, p = ln.strip().partition(":")
            users[u] = p
    return users


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="kdb+ IPC test server (see module docstring)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--unix", action="store_true")
    ap.add_argument("--users", action="append", default=[], metavar="FILE")
    ap.add_argument("--user", action="append", default=[], metavar="U:P")
    ap.add_argument("--record", type=Path)
    ap.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    a = ap.parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(0)  # raising is what breaks the main thread out of select()

    signal.signal(signal.SIGTERM, on_term)
    os.environ.setdefault("PYKX_UNLICENSED", "true")
    global kx
    import pykx

    kx = pykx
    tls = None
    if a.tls:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(*a.tls)
    server = Server(parse_users(a.users, a.user), a.record, tls)
    socks = listen(a.host, a.port, a.unix)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    print(f"LISTENING {socks[0].getsockname()[1]}", flush=True)
    try:
        while True:
            for key, _ in sel.select():
                conn, _ = key.fileobj.accept()
                if conn.family == socket.AF_INET:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                threading.Thread(target=server.serve_conn, args=(conn,), daemon=True).start()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        sys.stdout.flush()
        # _exit closes every socket (clients see EOF at once), does not wait for connection threads
        # that may be mid-sleep, and skips pykx's noisy K.__del__ at interpreter shutdown
        os._exit(0)


class QServer:
    """One qserver child process. Use it through :func:`run_qserver`."""

    def __init__(self, args: Sequence[str] = (), timeout: float = 20.0):
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="qserver-")
        self.port = 0
        self._args: list[str] = []
        it = iter(args)
        for arg in it:  # --port is ours to manage, so restart() can reuse the bound port
            if arg == "--port":
                self.port = int(next(it))
            elif arg.startswith("--port="):
                self.port = int(arg.split("=", 1)[1])
            else:
                self._args.append(arg)
        if "--record" in self._args:
            self.record_path = Path(self._args[self._args.index("--record") + 1])
        else:
            self.record_path = Path(self._tmp.name) / "handshakes.jsonl"
            self._args += ["--record", str(self.record_path)]
        self.stderr_path = Path(self._tmp.name) / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> QServer:
        # The server never needs a licence; pinning unlicensed mode keeps it the same on every machine
        env = {k: v for k, v in os.environ.items() if k not in ("PYKX_LICENSED", "QARGS")}
        env["PYKX_UNLICENSED"] = "true"
        # stderr goes to a file: a chatty server must never block on a pipe that nobody reads
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), "--port", str(self.port), *self._args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
                start_new_session=True,
            )  # a ^C in the test's terminal must not hit the server first
        try:
            self.port = self._await_listening()
        except BaseException:
            self.stop()
            raise
        return self

    def _await_listening(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        fd, buf = self.proc.stdout.fileno(), b""
        while True:
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if line.startswith(b"LISTENING "):
                    return int(line.split()[1])
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"qserver not listening after {self.timeout}s: {self.stderr()}")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"qserver exited before listening: {self.stderr()}")
                buf += chunk

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM, SIGKILL after ``grace`` seconds, and always reap. Returns the exit code."""
        p = self.proc
        if p is None:
            return None
        try:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(grace)
                except subprocess.TimeoutExpired:
                    p.kill()
        finally:
            p.wait()
            if p.stdout:
                p.stdout.close()
        return p.returncode

    def restart(self) -> QServer:
        self.stop()
        return self.start()

    def handshakes(self) -> list[dict[str, Any]]:
        if not self.record_path.exists():
            return []
        return [json.loads(ln) for ln in self.record_path.read_text().splitlines() if ln.strip()]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._tmp.cleanup()


@contextlib.contextmanager
def run_qserver(*args: str, timeout: float = 20.0) -> Iterator[QServer]:
    """Start ``qserver.py *args`` and yield the running :class:`QServer`. The process is
    always reaped on exit, even when start-up fails."""
    srv = QServer(args, timeout=timeout)
    try:
        yield srv.start()
    finally:
        srv.close()


if __name__ == "__main__":
    main()
