"""One adapter per system under test, all with the same small surface.

``call(fn, arg)`` is one synchronous round trip; ``pipelined(fn, args)`` is
the system's own idiom for keeping many calls in flight from one client
(``Executor.map``, ``Pool.imap``, ``ray.get([...])``, ``Session.map``);
``worker_pids()`` names the processes that run the calls (memory rows).
``fn`` is a name in ``bench.funcs``. Every pool-based peer gets as many
workers as cruised's benchmark pool (``WORKERS``).

Adapters whose package is missing raise ``Unavailable`` with the reason; the
runner turns that into a "skipped" note instead of a failure.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Callable
from typing import Any

from . import funcs
from .floor import FloorSystem

#: workers per pool for every system: one per core on the 2-core reference machine
WORKERS = 2
#: calls kept in flight by the pipelined rows of cruised and the floor
WINDOW = 32


class Unavailable(RuntimeError):
    """This system cannot run here (package not installed, feature not built)."""


class System:
    name = "?"
    label = "?"
    #: None when pipelined() is supported, else why not
    no_pipeline: str | None = None

    def prepare(self, obj: Any) -> Any:
        return obj

    def call(self, fn: str, arg: Any) -> Any:
        raise NotImplementedError

    def pipelined(self, fn: str, args: list[Any]) -> list[Any]:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        """Distinct pids seen running calls (after ``warm_imports`` ran in each)."""
        seen: set[int] = set()
        for _ in range(20):
            seen.update(self.pipelined("warm_imports", [None] * (4 * WORKERS)))
            if len(seen) >= WORKERS:
                break
        return sorted(seen)

    def close(self) -> None:
        pass


class Floor(System):
    no_pipeline = None

    def __init__(self, hops: int) -> None:
        self.f = FloorSystem(hops, WINDOW)
        self.name = self.f.name
        self.label = "floor: 2-process echo" if hops == 1 else "floor: 2-hop echo (client->middle->worker)"

    def prepare(self, obj: Any) -> Any:
        # exactly the bytes cruised puts on the wire for this argument (call head + bundle)
        from cruised.pool.wire import bundle, frames

        n = len(frames.call_head("fast", 0, b"\0" * 16)) + bundle.packed_size(bundle.pack(((obj,), {})))
        return self.f.prepare(n)

    def call(self, fn: str, arg: Any) -> Any:
        return self.f.call(arg)

    def pipelined(self, fn: str, args: list[Any]) -> list[Any]:
        self.f.pipelined(args[0], len(args))
        return [None] * len(args)

    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        self.f.close()


class PPE(System):
    name = "ppe"
    label = "concurrent.futures.ProcessPoolExecutor"

    def __init__(self, workers: int = WORKERS) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.ex = ProcessPoolExecutor(max_workers=workers)

    def call(self, fn: str, arg: Any) -> Any:
        return self.ex.submit(getattr(funcs, fn), arg).result()

    def pipelined(self, fn: str, args: list[Any]) -> list[Any]:
        return list(self.ex.map(getattr(funcs, fn), args))

    def close(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class MultiprocessPool(System):
    name = "multiprocess"
    label = "multiprocess.Pool"

    def __init__(self, workers: int = WORKERS) -> None:
        try:
            import multiprocess
        except ImportError as exc:
            raise Unavailable(f"multiprocess not installed ({exc})") from None
        self.pool = multiprocess.Pool(workers)

    def call(self, fn: str, arg: Any) -> Any:
        return self.pool.apply(getattr(funcs, fn), (arg,))

    def pipelined(self, fn: str, args: list[Any]) -> list[Any]:
        # chunksize=1: one message per call, like every other row (bigger chunks batch calls together)
        return list(self.pool.imap(getattr(funcs, fn), args, chunksize=1))

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class Pebble(System):
    name = "pebble"
    label = "pebble.ProcessPool"

    def __init__(self, workers: int = WORKERS) -> None:
        try:
            import pebble
        except ImportError:
            raise Unavailable("pebble not installed (pip install 'cruised[bench]')") from None
        self.pool = pebble.ProcessPool(max_workers=workers)

    def call(self, fn: str, arg: Any) -> Any:
        return self.pool.schedule(getattr(funcs, fn), args=(arg,)).result()

    def pipelined(self, fn: str, args: list[Any]) -> list[Any]:
        return list(self.pool.map(getattr(funcs, fn), args, chunksize=1).result())

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


class Ray(System):
    name = "ray"
    label = "Ray tasks"

    def __init__(self, workers: int = WORKERS) -> None:
        try:
            import ray
        except ImportError:
            raise Unavailable("ray not installed (pip install 'cruised[bench]' pulls it where a wheel exists)") from None
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False, configure_logging=False)
        self.ray = ray
        self.remote = {name: ray.remote(getattr(funcs, name)) for name in ("add10", "echo", "nap", "getpid", "warm_imports")}

    def call(self, fn: str, arg: Any) -> Any:
        return self.ray.get(self.remote[fn].remote(arg))

    def pipelined(self, fn: str, args: list[Any]) -> list[Any]:
        f = self.remote[fn]
        return self.ray.get([f.remote(a) for a in args])

    def close(self) -> None:
        self.ray.shutdown()


class Cruised(System):
    name = "cruised"
    label = "cruised (native client)"

    def __init__(self, socket_path: str, pool: str = "fast", window: int = WINDOW) -> None:
        import cruised

        self.session = cruised.session(socket=socket_path, pool=pool)
        self.window = window
        self.fns: dict[str, Callable[..., Any]] = {}
        self._cruised = cruised

    def _fn(self, name: str) -> Callable[..., Any]:
        f = self.fns.get(name)
        if f is None:
            f = self.fns[name] = self._cruised.function(self.session)(getattr(funcs, name))
        return f

    def call(self, fn: str, arg: Any) -> Any:
        return self._fn(fn)(arg)

    def pipelined(self, fn: str, args: list[Any]) -> list[Any]:
        return list(self.session.map(self._fn(fn), args, window=self.window))

    def close(self) -> None:
        self.session.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: keep-alive, no new dependency."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


class LeanHTTPConnection:
    """A minimal keep-alive HTTP/1.1 client over a Unix socket: one send per request, one parse per answer.

    What a client library does on the wire, without its per-call overhead: the request
    is written with a single ``sendall``; the answer's status line and headers are
    parsed, and exactly Content-Length body bytes are read (a chunked answer, which
    the door never sends, is an error). ``Connection: close`` in an answer closes
    the socket; the next request reconnects.
    """

    def __init__(self, path: str, timeout: float = 30.0, host: str = "cruised") -> None:
        self.path = path
        self.timeout = timeout
        self.host = host.encode()
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.path)
        self.sock, self.buf = s, b""
        return s

    def request(self, method: str, target: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
        """(status, headers with lower-case names, body)."""
        sock = self.sock or self._connect()
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
            method.encode(),
            target.encode(),
            self.host,
            content_type.encode(),
            len(body),
        )
        sock.sendall(head + body)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            buf += self._recv(sock)
        lines = buf[:end].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ConnectionError(f"not an HTTP answer: {lines[0]!r}")
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ConnectionError(f"bad header line {line!r}")
            headers[name.strip().lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise ConnectionError("chunked answers are not supported by this client")
        length = int(headers.get("content-length", "0"))
        start = end + 4
        while len(buf) < start + length:
            buf += self._recv(sock)
        body_out, self.buf = buf[start : start + length], buf[start + length :]
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, body_out

    def _recv(self, sock: socket.socket) -> bytes:
        data = sock.recv(65536)
        if not data:
            self.close()
            raise ConnectionError("the server closed the connection mid-answer")
        return data

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


#: the planned endpoint door's URL for the benchmark service (see run.py: http_config)
HTTP_PATH = "/public/api/v1/bench/add10/run"


class HTTPDoor(System):
    """The HTTP door with the lean client: what the door itself costs, as any efficient client sees it."""

    name = "cruised-http"
    label = "cruised (HTTP endpoint, keep-alive)"
    no_pipeline = "HTTP/1.1 without pipelining: see the 8-client row"

    def __init__(self, socket_path: str) -> None:
        self.conn = LeanHTTPConnection(socket_path)

    def call(self, fn: str, arg: Any) -> Any:
        if fn != "add10":
            raise Unavailable("the HTTP row only has the add10 endpoint")
        status, _, body = self.conn.request("POST", HTTP_PATH, json.dumps({"x": arg}).encode())
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
        return json.loads(body)["response"]

    def worker_pids(self) -> list[int]:
        return []

    def close(self) -> None:
        self.conn.close()


class HTTPDoorStdlib(HTTPDoor):
    """The same calls through the standard library's http.client (about 150 µs of client CPU more per call)."""

    name = "cruised-http-stdlib"
    label = "cruised (HTTP endpoint, http.client)"

    def __init__(self, socket_path: str) -> None:
        self.stdlib = UnixHTTPConnection(socket_path)
        self.headers = {"Content-Type": "application/json"}

    def call(self, fn: str, arg: Any) -> Any:
        if fn != "add10":
            raise Unavailable("the HTTP row only has the add10 endpoint")
        # bytes, not str: http.client sends a bytes body in the same send() as the head
        self.stdlib.request("POST", HTTP_PATH, body=json.dumps({"x": arg}).encode(), headers=self.headers)
        resp = self.stdlib.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:200]!r}")
        return json.loads(body)["response"]

    def close(self) -> None:
        self.stdlib.close()


def make(name: str, sockets: dict[str, str]) -> System:
    if name == "floor-1hop":
        return Floor(1)
    if name == "floor-2hop":
        return Floor(2)
    if name == "ppe":
        return PPE()
    if name == "multiprocess":
        return MultiprocessPool()
    if name == "pebble":
        return Pebble()
    if name == "ray":
        return Ray()
    if name == "cruised":
        return Cruised(sockets["native"])
    if name in ("cruised-http", "cruised-http-stdlib"):
        if not sockets.get("http"):
            raise Unavailable("this daemon has no HTTP door (no `http:` config support); row skipped")
        return HTTPDoor(sockets["http"]) if name == "cruised-http" else HTTPDoorStdlib(sockets["http"])
    raise ValueError(f"unknown system {name!r}")


SYSTEMS = ["floor-1hop", "floor-2hop", "ppe", "multiprocess", "pebble", "ray", "cruised", "cruised-http", "cruised-http-stdlib"]
