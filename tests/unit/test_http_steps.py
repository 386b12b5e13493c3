"""The HTTP door's steps (daemon/doors/http/steps.py) against a fake DoorHost: no daemon, no sockets but a socketpair.

The steps see the daemon only through DoorHost; these tests give them one that
has a config, one dispatcher (tests/support/fakes.make) and a list of refused
logins, and nothing else.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cruised import config
from cruised.core.dispatch import Dispatcher, Job, WorkerState
from cruised.doors.http.steps import Caller, Refusal, Steps, now, presented_key, timing
from cruised.pool.wire.frames import Kind
from support import fakes

KEY = "k-unit-1234567890"


class Host:
    """The DoorHost the steps get: what they may ask of the daemon, and a record of refused logins."""

    def __init__(self, cfg: config.Config, disp: Dispatcher | None) -> None:
        self.config = cfg
        self.disp = disp
        self.state = "ready"
        self.refused: list[str] = []

    @property
    def loop(self) -> Any:
        raise AssertionError("the steps need no event loop")

    def dispatcher(self, pool: str) -> Dispatcher | None:
        return self.disp if self.disp is not None and pool == self.disp.name else None

    def all_dispatchers(self) -> list[Dispatcher]:
        return [self.disp] if self.disp is not None else []

    def no_such_pool(self, pool: str) -> str:
        return f"no pool {pool!r}"

    def status(self) -> dict[str, Any]:
        return {}

    def pool_status(self) -> dict[str, dict[str, Any]]:
        return {}

    def readiness(self) -> list[str]:
        return []

    def render_metrics(self) -> bytes:
        return b""

    def request_reload(self, done: Callable[[bool, str], None]) -> None:
        done(False, "not in these tests")

    def auth_failed(self, door: str) -> None:
        self.refused.append(door)


def _config(tmp_path: Path, **daemon: Any) -> config.Config:
    code = tmp_path / "eps.py"
    code.write_text("def f():\n    return 1\n")
    raw = {
        "daemon": daemon,
        "pools": {"p": {"min": 1, "cruise": 1, "max": 1}},
        "services": {
            "open": {"endpoints": {"ok": {"code": str(code), "function": "f", "pool": "p"}, "bad": {"code": str(code), "function": "f", "pool": "p"}}},
            "keyed": {"api_keys": [KEY], "endpoints": {"ok": {"code": str(code), "function": "f", "pool": "p"}}},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return config.load(path)


@pytest.fixture
def disp() -> Dispatcher:
    d, _, _ = fakes.make()
    (worker,) = [w for w in d.workers.values() if w.state is WorkerState.STARTING]
    d.on_worker_ready(
        worker,
        {"pid": 1, "python": "3.11", "endpoints": {"open/ok": {"ok": True}, "open/bad": {"ok": False, "error": "RuntimeError: no model", "traceback": "tb"}}},
    )
    return d


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def tcp(authorization: str | None = None) -> Caller:
    return Caller(None, "127.0.0.1", "POST", "/public/api/v1/keyed/ok/run", authorization, over_unix=False)


def refusal(fn: Callable[[], object]) -> tuple[int, dict[str, str], dict[str, Any]]:
    with pytest.raises(Refusal) as info:
        fn()
    resp = info.value.response
    assert isinstance(resp.body, bytes)
    body = json.loads(resp.body)
    assert set(body) == {"errorType", "message", "detailedMessage"}
    return resp.status, dict(resp.headers), body


def test_route_names_the_endpoint_and_its_pool(tmp_path: Path, disp: Dispatcher) -> None:
    steps = Steps(Host(_config(tmp_path), disp))
    assert steps.route("open", "ok", tcp())[:2] == ("open/ok", "p")
    status, _, body = refusal(lambda: steps.route("nope", "ok", tcp()))
    assert (status, body["errorType"]) == (404, "NotFound") and "services: keyed, open" in body["message"]
    status, _, body = refusal(lambda: steps.route("open", "nope", tcp()))
    assert status == 404 and "endpoints: bad, ok" in body["message"]


def test_api_keys_over_tcp_and_refused_logins_reach_the_host(tmp_path: Path, disp: Dispatcher) -> None:
    host = Host(_config(tmp_path), disp)
    steps = Steps(host)
    status, headers, body = refusal(lambda: steps.route("keyed", "ok", tcp()))
    assert (status, body["errorType"]) == (401, "Unauthorized") and headers["WWW-Authenticate"].startswith("Basic")
    status, _, body = refusal(lambda: steps.route("keyed", "ok", tcp("Bearer wrong")))
    assert status == 401 and "invalid API key" in body["message"]
    assert host.refused == ["http", "http"]
    basic = "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()
    assert steps.route("keyed", "ok", tcp(basic))[:2] == ("keyed/ok", "p")
    assert steps.route("keyed", "ok", tcp(f"Bearer {KEY}"))[:2] == ("keyed/ok", "p")
    assert host.refused == ["http", "http"]
    assert presented_key("Basic !!not-base64") is None and presented_key("Digest x") is None


def test_the_unix_socket_checks_peer_credentials_not_keys(tmp_path: Path, disp: Dispatcher, pair: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = pair

    def unix() -> Caller:
        return Caller(ours, None, "POST", "/public/api/v1/keyed/ok/run", None, over_unix=True)

    assert Steps(Host(_config(tmp_path), disp)).route("keyed", "ok", unix())[:2] == ("keyed/ok", "p")  # no key needed
    assert Steps(Host(_config(tmp_path, allow_uids=[os.getuid()]), disp)).route("keyed", "ok", unix())[:2] == ("keyed/ok", "p")
    host = Host(_config(tmp_path, allow_uids=[os.getuid() + 4242]), disp)
    status, _, body = refusal(lambda: Steps(host).route("keyed", "ok", unix()))
    assert (status, body["errorType"]) == (403, "AccessDenied") and f"uid {os.getuid()}" in body["message"]


def test_admit_refuses_a_pool_not_running_and_an_endpoint_that_failed_to_load(tmp_path: Path, disp: Dispatcher) -> None:
    steps = Steps(Host(_config(tmp_path), disp))
    assert steps.admit("open/ok", "p") is disp
    status, _, body = refusal(lambda: steps.admit("open/bad", "p"))
    assert (status, body["errorType"], body["detailedMessage"]) == (503, "EndpointUnavailable", "tb")
    assert "RuntimeError: no model" in body["message"]
    status, _, body = refusal(lambda: Steps(Host(_config(tmp_path), None)).admit("open/ok", "p"))
    assert (status, body["errorType"]) == (500, "InternalError")


def test_too_large_closes_the_connection(tmp_path: Path) -> None:
    steps = Steps(Host(_config(tmp_path, max_message_bytes="64KiB"), None))
    resp = steps.too_large()
    assert resp.status == 413 and resp.keep_alive is False and b"65536 bytes" in bytes(resp.body)  # type: ignore[arg-type]


def test_timing_is_in_milliseconds_on_the_dispatchers_clock() -> None:
    t0 = now() - 0.001  # the request arrived 1 ms ago; its job has run since
    job = Job(id=1, kind=Kind.ENDPOINT, frame=bytearray(), sink=fakes.Sink(), client=None, client_reqid=0)
    job.admitted = t0 + 0.0001
    job.started = job.admitted + 0.0002
    job.finished = job.started + 0.0005
    queue_ms, exec_ms, total_ms = timing(job, t0)
    assert queue_ms == pytest.approx(0.2) and exec_ms == pytest.approx(0.5)
    assert total_ms >= 1.0 and total_ms >= queue_ms + exec_ms
    never_ran = Job(id=2, kind=Kind.ENDPOINT, frame=bytearray(), sink=fakes.Sink(), client=None, client_reqid=0)
    never_ran.admitted = now()
    assert timing(never_ran, t0)[1] == 0.0
