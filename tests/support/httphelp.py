"""Helpers for tests of the HTTP door: calls over the Unix socket or TCP, endpoint files."""

from __future__ import annotations

import base64
import http.client
import json
import textwrap
from pathlib import Path
from typing import Any

from cruised.client.http import Response, Target, request, run_path


def unix(d: Any) -> Target:
    """The daemon's HTTP Unix socket (from its status)."""
    return Target(unix=d.status()["http"]["socket"])


def tcp(d: Any, api_key: str | None = None) -> Target:
    host, _, port = d.status()["http"]["listen"].rpartition(":")
    return Target(host=host, port=int(port), api_key=api_key)


def call(target: Target, name: str, data: Any = None, raw: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30) -> Response:
    service, endpoint = name.split("/")
    body = raw if raw is not None else json.dumps({} if data is None else data).encode()
    if headers is None:
        return request(target, "POST", run_path(service, endpoint), body, timeout=timeout)
    conn = target.connection(timeout)
    try:
        conn.request("POST", run_path(service, endpoint), body=body, headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def get(target: Target, path: str, headers: dict[str, str] | None = None) -> Response:
    conn = target.connection(30)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


def error_of(resp: Response) -> dict[str, Any]:
    """The JSON error body, checked for the documented shape."""
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"errorType", "message", "detailedMessage"}, body
    return body


def write(path: Path, source: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return str(path)


def persistent(target: Target) -> http.client.HTTPConnection:
    return target.connection(30)
