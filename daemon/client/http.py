"""A small client for the HTTP door, over its Unix socket or TCP (``cruised call``, ``cruised test``).

Standard library only (``http.client``), so the command line needs nothing
beyond cruised itself, and any other language can do the same with its own
HTTP client: ``curl --unix-socket <http.socket> http://cruised/...``.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

DEFAULT_TIMEOUT = 300.0


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (the Host header says ``cruised``)."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__("cruised", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Target:
    """Where the HTTP door is: a Unix socket path, or a TCP host and port."""

    unix: str | None = None
    host: str = "127.0.0.1"
    port: int = 9580
    api_key: str | None = None

    @classmethod
    def parse(cls, where: str, api_key: str | None = None) -> Target:
        """``http://host:port``, ``unix:/path`` or a plain socket path."""
        if where.startswith(("http://", "https://")):
            u = urlsplit(where)
            if u.scheme == "https":
                raise ValueError("the HTTP door speaks plain HTTP; put TLS in front of it with a proxy")
            return cls(host=u.hostname or "127.0.0.1", port=u.port or 80, api_key=api_key)
        if where.startswith("unix:"):
            where = where[len("unix:") :]
        return cls(unix=where, api_key=api_key)

    def connection(self, timeout: float = DEFAULT_TIMEOUT) -> http.client.HTTPConnection:
        if self.unix is not None:
            return UnixHTTPConnection(self.unix, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def describe(self) -> str:
        return self.unix if self.unix is not None else f"http://{self.host}:{self.port}"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_ms: float = 0.0
    _json: Any = field(default=None, repr=False)

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")

    def json(self) -> Any:
        if self._json is None:
            self._json = json.loads(self.body)
        return self._json


def request(target: Target, method: str, path: str, body: bytes | None = None, timeout: float = DEFAULT_TIMEOUT) -> Response:
    """One request on a fresh connection; OSError if the door cannot be reached."""
    import time

    headers = {"Content-Type": "application/json"} if body is not None else {}
    if target.api_key:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{target.api_key}:".encode()).decode()
    conn = target.connection(timeout)
    started = time.monotonic()
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data, (time.monotonic() - started) * 1e3)
    finally:
        conn.close()


def run_path(service: str, endpoint: str) -> str:
    return f"/public/api/v1/{service}/{endpoint}/run"
