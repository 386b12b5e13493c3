"""The HTTP front door through the real daemon: calls over the Unix socket and TCP, the error table, API keys.

One daemon serves the whole module (its endpoints cover every row of the
error table); tests that need their own settings start their own.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind
from support.daemon import Daemon, pool_config, wait_for
from support.httphelp import basic, call, error_of, get, tcp, unix, write

KEY = "k-test-1234567890"
FILE_KEY = "k-from-file-0987654321"

EPS = """
import os
import signal
import time

import numpy as np
import pandas as pd

LOADS = 0
LOADS += 1  # module-level code: runs once per worker
CALLS = 0


def hello(name="world"):
    return {"greeting": f"Hello, {name}!"}


def add(a, b):
    return a + b


def anything(**data):
    return data


def noargs():
    return "pong"


def boom(x):
    raise ValueError(f"bad x: {x}")


def teapot(code):
    raise DkuCustomApiException("no coffee here", http_status_code=code)


def gone():
    from cruised import ApiError

    raise ApiError("it moved", http_status_code=410, error_type="Gone")


def custom():
    resp = DkuCustomHttpResponse.create_text_response("a,b\\n1,2\\n", content_type="text/csv", status=201)
    resp.add_header("Set-Cookie", "one=1")
    resp.add_header("Set-Cookie", "two=2")
    resp.headers["X-Custom"] = "yes"
    return resp


def numeric():
    return {
        "arr": np.array([1.5, np.nan, 3.0]),
        "i": np.int64(7),
        "b": np.bool_(True),
        "df": pd.DataFrame({"sym": ["a", "b"], "px": [1.0, 2.0]}),
        "s": pd.Series([1, 2], index=["x", "y"]),
        "when": pd.Timestamp("2024-01-02T03:04:05"),
        "nan": float("nan"),
    }


def unserializable():
    return {"rows": [{"ok": 1}, {"blob": b"raw"}]}


def crash():
    os.kill(os.getpid(), signal.SIGKILL)


def state():
    global CALLS
    CALLS += 1
    return {"folders": folders, "pid": os.getpid(), "loads": LOADS, "calls": CALLS}


def block(path):
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return "released"


def big(n):
    return "x" * n
"""


@pytest.fixture(scope="module")
def door(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("door")
    code = write(root / "eps.py", EPS)
    broken = write(root / "broken.py", "raise RuntimeError('model file missing')\n")
    (root / "f1").mkdir()
    (root / "f2").mkdir()
    (root / "keys.txt").write_text(f"# one key per line\n{FILE_KEY}\n")

    def ep(function: str, pool: str = "default", **kw: Any) -> dict[str, Any]:
        return {"code": code, "function": function, "pool": pool, **kw}

    config = {
        "daemon": {"max_message_bytes": "64KiB"},
        "http": {"listen": "127.0.0.1:0"},
        "pools": {
            "default": pool_config(cruise=2, max=3),
            # one worker, one queue slot, a short queue timeout: full and timed-out queues on demand
            "tiny": pool_config(max=1, queue_size=1, queue_timeout="1s", exec_timeout="20s"),
            "short": pool_config(max=1, exec_timeout="1s"),
        },
        "services": {
            "t": {
                "endpoints": {
                    "hello": ep("hello", test_queries=[{"name": "kx"}, {}]),
                    "add": ep("add", test_queries=[{"a": 1, "b": 2}, {"a": 1}]),
                    "anything": ep("anything"),
                    "noargs": ep("noargs"),
                    "boom": ep("boom"),
                    "teapot": ep("teapot"),
                    "gone": ep("gone"),
                    "custom": ep("custom"),
                    "numeric": ep("numeric"),
                    "unserializable": ep("unserializable"),
                    "crash": ep("crash"),
                    "state": ep("state", folders=[str(root / "f1"), str(root / "f2")]),
                    "big": ep("big"),
                    "block": ep("block", pool="tiny"),
                    "hang": ep("block", pool="short"),
                    "broken": {"code": broken, "function": "f"},
                    "missing": ep("no_such_function"),
                }
            },
            "secure": {
                "api_keys": [KEY],
                "api_keys_file": str(root / "keys.txt"),
                "endpoints": {"hello": ep("hello")},
            },
        },
    }
    d = Daemon(config, root, args=[])
    d.start()
    try:
        yield d
    finally:
        d.cleanup_or_fail()


# -- successful calls ------------------------------------------------------------------


def test_call_over_unix_socket_returns_response_and_timing(door: Daemon) -> None:
    resp = call(unix(door), "t/hello", {"name": "kx"})
    assert resp.status == 200
    body = resp.json()
    assert body["response"] == {"greeting": "Hello, kx!"}
    assert set(body["timing"]) == {"queue_ms", "exec_ms", "total_ms"}
    assert all(isinstance(v, (int, float)) and v >= 0 for v in body["timing"].values())
    assert "exec;dur=" in resp.headers["server-timing"]


def test_call_over_tcp(door: Daemon) -> None:
    resp = call(tcp(door), "t/add", {"a": 2, "b": 40})
    assert resp.status == 200 and resp.json()["response"] == 42


def test_curl_over_unix_socket_as_in_readme(door: Daemon) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    sock = door.status()["http"]["socket"]
    out = subprocess.run(
        [curl, "-s", "--unix-socket", sock, "http://cruised/public/api/v1/t/hello/run", "-d", '{"name": "kx"}'],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert json.loads(out.stdout)["response"] == {"greeting": "Hello, kx!"}


def test_parameters_by_name_kwargs_and_zero_arguments(door: Daemon) -> None:
    t = unix(door)
    assert call(t, "t/hello", {}).json()["response"] == {"greeting": "Hello, world!"}
    assert call(t, "t/anything", {"x": 1, "weird key": [1, 2]}).json()["response"] == {"x": 1, "weird key": [1, 2]}
    assert call(t, "t/noargs", raw=b"").json()["response"] == "pong"  # an empty body is {}
    assert call(t, "t/noargs", {}).json()["response"] == "pong"


def test_numpy_and_pandas_results_follow_the_conversion_rule(door: Daemon) -> None:
    r = call(unix(door), "t/numeric").json()["response"]
    assert r == {
        "arr": [1.5, None, 3.0],
        "i": 7,
        "b": True,
        "df": [{"sym": "a", "px": 1.0}, {"sym": "b", "px": 2.0}],
        "s": {"x": 1, "y": 2},
        "when": "2024-01-02T03:04:05",
        "nan": None,
    }


def test_module_code_runs_once_per_worker_and_sees_folders(door: Daemon, tmp_path: Path) -> None:
    t = unix(door)
    seen: dict[int, list[int]] = {}
    for _ in range(6):
        r = call(t, "t/state").json()["response"]
        assert r["loads"] == 1
        assert r["folders"] == [os.path.join(door.workdir, "f1"), os.path.join(door.workdir, "f2")]
        seen.setdefault(r["pid"], []).append(r["calls"])
    for calls in seen.values():  # module globals persist between calls in one worker
        assert calls == sorted(calls) and len(set(calls)) == len(calls)


def test_custom_response(door: Daemon) -> None:
    resp = call(unix(door), "t/custom")
    assert resp.status == 201
    assert resp.body == b"a,b\n1,2\n"
    assert resp.headers["content-type"] == "text/csv"
    assert resp.headers["x-custom"] == "yes"
    conn = unix(door).connection()
    try:
        conn.request("POST", "/public/api/v1/t/custom/run", body=b"{}")
        raw = conn.getresponse()
        assert raw.msg.get_all("Set-Cookie") == ["one=1", "two=2"]
        raw.read()
    finally:
        conn.close()


# -- the error table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "got an array"),
        (b'"text"', "got a string"),
        (b"\xff\xfe{", "not UTF-8"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
    ],
)
def test_400_bad_json(door: Daemon, raw: bytes, fragment: str) -> None:
    resp = call(unix(door), "t/add", raw=raw)
    assert resp.status == 400
    err = error_of(resp)
    assert err["errorType"] == "BadRequest"
    assert fragment in err["message"]


def test_400_bad_parameters_name_them(door: Daemon) -> None:
    t = unix(door)
    err = error_of(call(t, "t/add", {"a": 1}))
    assert err["errorType"] == "BadArguments" and "missing required parameter 'b'" in err["message"]
    err = error_of(call(t, "t/add", {"a": 1, "b": 2, "c": 3, "d": 4}))
    assert "unexpected parameters 'c', 'd'" in err["message"] and "add(a, b)" in err["message"]
    err = error_of(call(t, "t/noargs", {"x": 1}))
    assert "unexpected parameter 'x'" in err["message"]


def test_404_unknown_service_endpoint_and_route(door: Daemon) -> None:
    t = unix(door)
    resp = call(t, "nope/hello")
    assert resp.status == 404 and "no service 'nope'" in error_of(resp)["message"]
    resp = call(t, "t/nope")
    assert resp.status == 404 and "no endpoint 'nope'" in error_of(resp)["message"]
    resp = get(t, "/public/api/v1/t")
    assert resp.status == 404 and error_of(resp)["errorType"] == "NotFound"
    resp = get(t, "/public/api/v1/t/hello/run")
    assert resp.status == 405 and error_of(resp)["errorType"] == "MethodNotAllowed"


def test_500_function_raised_carries_the_remote_traceback(door: Daemon) -> None:
    resp = call(unix(door), "t/boom", {"x": 5})
    assert resp.status == 500
    err = error_of(resp)
    assert err["errorType"] == "FunctionError"
    assert err["message"].endswith("ValueError: bad x: 5")
    assert "eps.py" in err["detailedMessage"] and "in boom" in err["detailedMessage"]
    assert "pool/endpoint.py" not in err["detailedMessage"]  # only the user's frames


def test_500_result_not_serializable_says_what_and_where(door: Daemon) -> None:
    resp = call(unix(door), "t/unserializable")
    assert resp.status == 500
    err = error_of(resp)
    assert err["errorType"] == "ResultNotSerializable"
    assert "$.rows[1].blob is of type bytes" in err["message"]


def test_500_result_larger_than_the_message_limit(door: Daemon) -> None:
    err = error_of(call(unix(door), "t/big", {"n": 200_000}))
    assert err["errorType"] == "ResultTooLarge"
    assert call(unix(door), "t/big", {"n": 1000}).status == 200  # and the worker still serves


def test_custom_error_statuses(door: Daemon) -> None:
    t = unix(door)
    resp = call(t, "t/teapot", {"code": 418})
    assert resp.status == 418
    assert error_of(resp) == {"errorType": "ApiError", "message": "no coffee here", "detailedMessage": "no coffee here"}
    resp = call(t, "t/gone")
    assert resp.status == 410 and error_of(resp)["errorType"] == "Gone"
    resp = call(t, "t/teapot", {"code": 200})  # not an error status: an ordinary failure
    assert resp.status == 500 and error_of(resp)["errorType"] == "FunctionError"


def test_502_worker_crashed_and_is_replaced(door: Daemon) -> None:
    resp = call(unix(door), "t/crash")
    assert resp.status == 502
    err = error_of(resp)
    assert err["errorType"] == "WorkerCrashed" and "SIGKILL" in err["message"]
    assert call(unix(door), "t/hello").status == 200


def test_503_endpoint_whose_code_failed_to_load(door: Daemon) -> None:
    t = unix(door)
    resp = call(t, "t/broken")
    assert resp.status == 503
    err = error_of(resp)
    assert err["errorType"] == "EndpointUnavailable"
    assert "RuntimeError: model file missing" in err["message"]
    assert "broken.py" in err["detailedMessage"]
    err = error_of(call(t, "t/missing"))
    assert "defines no function 'no_such_function'" in err["message"] and "hello" in err["message"]
    # the others in the same pool and the same workers are unaffected
    assert call(t, "t/hello").status == 200
    st = door.status()["services"]["t"]["endpoints"]
    assert st["broken"]["state"] == "failed" and st["hello"]["state"] == "loaded"
    assert "endpoint t/broken failed to load" in door.log()
    ready = get(t, "/readyz")
    assert ready.status == 503
    assert any("t/broken" in r for r in ready.json()["reasons"])


def test_504_execution_timeout_kills_the_worker(door: Daemon, tmp_path: Path) -> None:
    resp = call(unix(door), "t/hang", {"path": str(tmp_path / "never")})
    assert resp.status == 504
    err = error_of(resp)
    assert err["errorType"] == "ExecutionTimeout" and "execution timeout of 1s" in err["message"]


def test_503_queue_full_and_504_queue_timeout(door: Daemon, tmp_path: Path) -> None:
    t = unix(door)
    release = tmp_path / "release"
    results: dict[str, Any] = {}

    def send(tag: str) -> None:
        results[tag] = call(t, "t/block", {"path": str(release)})

    def pool() -> dict[str, Any]:
        return door.status()["pools"]["tiny"]

    first = threading.Thread(target=send, args=("running",))
    first.start()
    try:
        wait_for(lambda: pool()["workers"]["busy"] == 1, what="the tiny pool's worker to be busy")
        second = threading.Thread(target=send, args=("queued",))
        second.start()
        wait_for(lambda: pool()["queue"]["depth"] == 1, what="a queued call")
        full = call(t, "t/block", {"path": str(release)})
        assert full.status == 503
        assert error_of(full)["errorType"] == "QueueFull"
        assert full.headers["retry-after"] == "1"
        second.join(30)
        timed_out = results["queued"]
        assert timed_out.status == 504
        assert error_of(timed_out)["errorType"] == "QueueTimeout"
    finally:
        release.touch()
        first.join(30)
    assert results["running"].status == 200 and results["running"].json()["response"] == "released"


def test_413_body_above_max_message_bytes(door: Daemon) -> None:
    t = unix(door)
    big = json.dumps({"blob": "x" * 70_000}).encode()
    resp = call(t, "t/anything", raw=big)
    assert resp.status == 413 and error_of(resp)["errorType"] == "PayloadTooLarge"
    # without a Content-Length (chunked), counted while it streams in
    conn = t.connection()
    try:
        chunks = (b"x" * 8192 for _ in range(32))
        conn.request("POST", "/public/api/v1/t/anything/run", body=chunks, encode_chunked=True)
        raw = conn.getresponse()
        assert raw.status == 413
        raw.read()
    finally:
        conn.close()
    small = json.dumps({"blob": "x" * 60_000}).encode()
    assert call(t, "t/anything", raw=small).status == 200


# -- API keys ----------------------------------------------------------------------------


def test_api_keys_over_tcp(door: Daemon) -> None:
    t = tcp(door)
    resp = call(t, "secure/hello", {})
    assert resp.status == 401
    assert error_of(resp)["errorType"] == "Unauthorized"
    assert resp.headers["www-authenticate"].startswith("Basic")
    assert call(t, "secure/hello", {}, headers=basic("wrong-key")).status == 401
    assert call(t, "secure/hello", {}, headers={"Authorization": "Bearer wrong-key"}).status == 401
    assert call(t, "secure/hello", {}, headers=basic(KEY)).json()["response"] == {"greeting": "Hello, world!"}
    assert call(t, "secure/hello", {}, headers={"Authorization": f"Bearer {KEY}"}).status == 200
    assert call(t, "secure/hello", {}, headers=basic(FILE_KEY)).status == 200
    # a service without keys stays open; the Unix socket needs none
    assert call(t, "t/hello", {}).status == 200
    assert call(unix(door), "secure/hello", {}).status == 200
    # status and metrics over TCP need a key once keys exist; the probes never do
    assert get(t, "/status").status == 401
    assert get(t, "/status", headers=basic(KEY)).status == 200
    assert get(t, "/metrics").status == 401
    assert get(t, "/healthz").status == 200
    assert KEY not in door.log() and FILE_KEY not in door.log()


def test_no_shipped_functions_over_tcp(door: Daemon) -> None:
    """TCP speaks only HTTP: a native frame sent there is a bad HTTP request, never a registration."""
    t = tcp(door)
    meta = json.dumps({"python": "3.11", "libraries": {}, "name": "f"}).encode()
    frame = frames.frame(Kind.REGISTER, 1, frames.register_head("default", b"k" * 16, meta) + b"blob")
    with socket.create_connection((t.host, t.port), timeout=10) as s:
        s.sendall(frame)
        reply = s.recv(4096)
    assert reply.split(b"\r\n", 1)[0] in (b"HTTP/1.0 400 Bad Request", b"HTTP/1.1 400 Bad Request")
    assert get(t, "/public/api/v1/default/call").status == 404


# -- status, probes, metrics, CLI --------------------------------------------------------------


def test_status_healthz_readyz_metrics(door: Daemon) -> None:
    t = unix(door)
    st = get(t, "/status").json()
    assert st["pools"]["default"]["ready"] is True
    hello = st["services"]["t"]["endpoints"]["hello"]
    assert hello["state"] == "loaded" and hello["pool"] == "default" and hello["test_queries"] == [{"name": "kx"}, {}]
    assert st["services"]["secure"]["api_keys"] is True
    assert get(t, "/healthz").json()["status"] == "alive"
    metrics = get(t, "/metrics")
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_cli_call(door: Daemon) -> None:
    ok = door.cli("call", "t/hello", "--data", '{"name": "cli"}')
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"greeting": "Hello, cli!"}
    full = door.cli("call", "t/add", "-d", '{"a": 1, "b": 1}', "--full")
    assert json.loads(full.stdout)["response"] == 2 and "timing" in json.loads(full.stdout)
    bad = door.cli("call", "t/add", "--data", '{"a": 1}')
    assert bad.returncode == 1 and bad.stdout == ""
    assert json.loads(bad.stderr)["errorType"] == "BadArguments"
    csv = door.cli("call", "t/custom")
    assert csv.returncode == 0 and csv.stdout == "a,b\n1,2\n"
    tcp_call = door.cli("call", "secure/hello", "--url", f"http://{door.status()['http']['listen']}", "--api-key", KEY)
    assert tcp_call.returncode == 0, tcp_call.stderr
    usage = door.cli("call", "no-slash")
    assert usage.returncode == 2


def test_cli_test_plays_test_queries(door: Daemon) -> None:
    good = door.cli("test", "t/hello")
    assert good.returncode == 0, good.stdout + good.stderr
    lines = good.stdout.splitlines()
    assert lines[0].split() == ["endpoint", "query", "status", "time", "result"]
    assert "Hello, kx!" in lines[1] and lines[1].split()[:3] == ["t/hello", "1", "200"]
    assert lines[-1] == "2 ok, 0 failed"
    bad = door.cli("test", "t/add")  # its second query lacks a parameter
    assert bad.returncode == 1
    assert "BadArguments" in bad.stdout and bad.stdout.splitlines()[-1] == "1 ok, 1 failed"
    assert door.cli("test", "t/nope").returncode == 1


def test_peer_allowlist_on_the_http_socket(start_daemon: Any) -> None:
    other = os.getuid() + 4242
    d = start_daemon(
        {"daemon": {"allow_uids": [other]}, "pools": {"default": pool_config()}},
        wait_ready=False,
    )
    sock = str(Path(d.socket).parent / "cruised-http.sock")
    from cruised.client.http import Target

    t = Target(unix=sock)
    wait_for(lambda: get(t, "/healthz").status == 200, what="the HTTP door")
    resp = get(t, "/status")
    assert resp.status == 403 and error_of(resp)["errorType"] == "AccessDenied"


def test_expect_continue_oversized_body_is_refused_before_it_is_sent(door: Daemon) -> None:
    sock_path = door.status()["http"]["socket"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(sock_path)
        s.sendall(
            b"POST /public/api/v1/t/anything/run HTTP/1.1\r\nHost: cruised\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\nExpect: 100-continue\r\n\r\n"
        )
        head = s.recv(4096)  # no body sent: the answer must come anyway
    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"PayloadTooLarge" in head or b"Content-Length" in head


def test_hundreds_of_endpoints_in_one_pool(start_daemon: Any, tmp_path: Path) -> None:
    """Endpoint specs travel on each worker's channel, so their number is not bounded by a spawn message."""
    code = write(tmp_path / "many.py", "def f(i=0):\n    return i\n")
    folder = tmp_path / ("a-rather-long-folder-name-" * 3)
    folder.mkdir()
    endpoints = {f"endpoint-number-{i:04d}": {"code": code, "function": "f", "folders": [str(folder)]} for i in range(400)}
    d = start_daemon({"pools": {"default": pool_config()}, "services": {"many": {"endpoints": endpoints}}})
    t = unix(d)
    wait_for(lambda: get(t, "/readyz").status == 200, 60, 0.05, "all endpoints loaded")
    assert call(t, "many/endpoint-number-0399", {"i": 399}).json()["response"] == 399


# -- the keep-alive fast path (daemon/doors/http/fast.py) and its hand-off to aiohttp ----------------


def _raw_exchange(sock: socket.socket, data: bytes, answers: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data`` at once, read ``answers`` complete HTTP answers (Content-Length framed)."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    buf = b""
    if data:
        sock.sendall(data)
    while len(out) < answers:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            lines = buf[:end].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            size = int(headers.get("content-length", "0"))
            if len(buf) >= end + 4 + size:
                out.append((int(lines[0].split()[1]), headers, buf[end + 4 : end + 4 + size]))
                buf = buf[end + 4 + size :]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(out)} answers"
        buf += chunk
    return out


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: cruised\r\nContent-Type: application/json\r\n{extra}Content-Length: {len(body)}\r\n\r\n".encode() + body


_PARITY_CASES = [
    ("/public/api/v1/t/add/run", b'{"a": 2, "b": 40}'),  # 200
    ("/public/api/v1/t/nope/run", b"{}"),  # 404 unknown endpoint
    ("/public/api/v1/zz/add/run", b"{}"),  # 404 unknown service
    ("/public/api/v1/t/add/run", b"[1]"),  # 400 BadRequest (from the worker)
    ("/public/api/v1/t/add/run", b'{"a": 1}'),  # 400 BadArguments
    ("/public/api/v1/t/custom/run", b""),  # the function's CustomResponse
    ("/public/api/v1/t/boom/run", b'{"x": 1}'),  # 500 FunctionError
    ("/public/api/v1/t/teapot/run", b'{"code": 418}'),  # the function's own HTTP status
    ("/public/api/v1/t/broken/run", b"{}"),  # 503 EndpointUnavailable
]


def _comparable(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, str], Any]:
    status, headers, body = answer
    headers = {k: v for k, v in headers.items() if k not in ("date", "server-timing")}
    try:
        parsed = json.loads(body)
    except ValueError:
        return status, headers, body
    if isinstance(parsed, dict):
        parsed.pop("timing", None)
        if "detailedMessage" in parsed and "Traceback" in str(parsed["detailedMessage"]):
            parsed["detailedMessage"] = "<traceback>"
        headers.pop("content-length", None)  # the timing figures differ in length
    return status, headers, parsed


def test_fast_path_answers_exactly_as_aiohttp_does(door: Daemon) -> None:
    """Each case on a fresh connection (fast path) and on one handed to aiohttp by a first GET."""
    path = door.status()["http"]["socket"]
    for target, body in _PARITY_CASES:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as fast, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as slow:
            fast.settimeout(30)
            slow.settimeout(30)
            fast.connect(path)
            slow.connect(path)
            (fast_answer,) = _raw_exchange(fast, _post(target, body), 1)
            health, slow_answer = _raw_exchange(slow, b"GET /healthz HTTP/1.1\r\nHost: cruised\r\n\r\n" + _post(target, body), 2)
        assert health[0] == 200
        assert _comparable(fast_answer) == _comparable(slow_answer), target
        assert fast_answer[1]["server"] == slow_answer[1]["server"] and fast_answer[1]["date"].endswith(" GMT")


def _timings(sock_path: str, first: bytes, calls: int) -> list[tuple[float, float, float]]:
    """(queue_ms, exec_ms, total_ms) of ``calls`` sequential add calls on one connection, after ``first``
    (b"": the calls stay on the fast path; a GET: aiohttp serves them)."""
    out = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(sock_path)
        if first:
            assert _raw_exchange(s, first, 1)[0][0] == 200
        for i in range(calls):
            ((status, headers, body),) = _raw_exchange(s, _post("/public/api/v1/t/add/run", json.dumps({"a": i, "b": 1}).encode()), 1)
            assert status == 200 and json.loads(body)["response"] == i + 1
            t = json.loads(body)["timing"]
            figures = (t["queue_ms"], t["exec_ms"], t["total_ms"])
            assert headers["server-timing"] == f"queue;dur={t['queue_ms']:.3f}, exec;dur={t['exec_ms']:.3f}, total;dur={t['total_ms']:.3f}"
            out.append(figures)
    return out


@pytest.mark.parametrize("first", [b"", b"GET /healthz HTTP/1.1\r\nHost: cruised\r\n\r\n"], ids=["fast-path", "aiohttp"])
def test_timing_figures_are_on_one_fine_grained_clock(door: Daemon, first: bytes) -> None:
    """Under uvloop (the daemon's default loop), whose loop.time() has millisecond resolution, total_ms
    once read 0.000 or 1.000 for every call, below queue_ms + exec_ms: every figure is on the
    dispatcher's monotonic clock now."""
    assert "event loop: uvloop" in door.log()
    timings = _timings(door.status()["http"]["socket"], first, 12)
    for queue_ms, exec_ms, total_ms in timings:
        # the request arrives before its job is admitted and is answered after it finished; each
        # figure is rounded to 0.001 ms on its own, so their sum may exceed total_ms by 0.002 at most
        assert total_ms + 0.002 >= queue_ms + exec_ms, timings
        assert exec_ms > 0, timings
    # a sub-millisecond call's total is a whole number of milliseconds about once in a thousand;
    # twelve of them in a row only on a millisecond clock
    assert any(total_ms != round(total_ms) for _, _, total_ms in timings), timings


def test_fast_path_pipelined_requests_answer_in_order_then_hand_off(door: Daemon) -> None:
    path = door.status()["http"]["socket"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        calls = b"".join(_post("/public/api/v1/t/add/run", json.dumps({"a": i, "b": 1}).encode()) for i in range(5))
        answers = _raw_exchange(s, calls + b"GET /healthz HTTP/1.1\r\nHost: cruised\r\n\r\n" + _post("/public/api/v1/t/add/run", b'{"a": 7, "b": 1}'), 7)
    assert [json.loads(b)["response"] for _, _, b in answers[:5]] == [1, 2, 3, 4, 5]
    assert answers[5][0] == 200 and json.loads(answers[5][2])["status"] == "alive"  # aiohttp's route, same connection
    assert answers[6][0] == 200 and json.loads(answers[6][2])["response"] == 8  # and calls go on, through aiohttp


def test_fast_path_connection_close_and_split_writes(door: Daemon) -> None:
    path = door.status()["http"]["socket"]
    request = _post("/public/api/v1/t/add/run", b'{"a": 1, "b": 2}', extra="Connection: close\r\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(path)
        for i in range(0, len(request), 7):  # the head and body arrive in pieces
            s.sendall(request[i : i + 7])
        (answer,) = _raw_exchange(s, b"", 1)
        assert answer[0] == 200 and json.loads(answer[2])["response"] == 3
        assert answer[1]["connection"] == "close"
        assert s.recv(1) == b""  # closed after the answer
