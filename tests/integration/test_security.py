"""Hostile HTTP and secrets: the HTTP door under fuzzed requests, and no secret anywhere it could leak."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support.daemon import Daemon, pool_config, wait_for
from support.httphelp import basic, call, get, tcp, unix, write
from support.qserver import run_qserver

HTTP_FUZZ = int(os.environ.get("CRUISED_FUZZ_HTTP", "120"))


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory):
    work = tmp_path_factory.mktemp("httpfuzz")
    code = write(work / "ep.py", "def echo(**data):\n    return data\n")
    d = Daemon(
        {
            "pools": {"default": pool_config()},
            "daemon": {"max_message_bytes": "64KiB", "read_timeout": "1s"},
            "services": {"s": {"endpoints": {"echo": {"code": code, "function": "echo"}}}},
        },
        work,
    )
    d.start()
    yield d
    d.cleanup()


_methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "BREW", ""])
_paths = st.one_of(
    st.sampled_from(["/public/api/v1/s/echo/run", "/status", "/metrics", "/healthz", "/readyz", "/public/api/v1/x/y/run", "/"]),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=80).map(lambda p: "/" + p),
)
_headers = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["Content-Length", "Transfer-Encoding", "Content-Type", "Authorization", "Expect", "Connection"]), st.text(max_size=30)),
        st.tuples(st.text(alphabet="abcdefXYZ-", min_size=1, max_size=12), st.text(max_size=20)),
    ),
    max_size=5,
)


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.binary(min_size=1, max_size=300))  # not HTTP at all
    method, path = draw(_methods), draw(_paths)
    lines = [f"{method} {path} HTTP/1.1", "Host: cruised"]
    for k, v in draw(_headers):
        lines.append(f"{k}: {v}".replace("\r", "").replace("\n", ""))
    body = draw(st.one_of(st.binary(max_size=200), st.just(json.dumps({"a": 1}).encode()), st.just(b'{"a": [1, 2, {"b": null}]}')))
    if draw(st.booleans()):
        lines.append(f"Content-Length: {len(body) if draw(st.booleans()) else draw(st.integers(0, 10**7))}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogatepass") + body
    return raw[: draw(st.integers(1, len(raw)))] if draw(st.integers(0, 4)) == 0 else raw


@settings(max_examples=HTTP_FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(raw=http_requests())
def test_fuzzed_http_requests_leave_the_door_serving(http_daemon: Daemon, raw: bytes) -> None:
    path = http_daemon.status()["http"]["socket"]
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(3)
    c.connect(path)
    try:
        c.sendall(raw)
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
    except OSError:
        pass  # the door may hang up on garbage: allowed
    finally:
        c.close()
    assert get(unix(http_daemon), "/healthz").status == 200
    resp = call(unix(http_daemon), "s/echo", {"k": 1})
    assert resp.status == 200 and json.loads(resp.body)["response"] == {"k": 1}


def test_secrets_never_reach_logs_status_metrics_or_error_replies(start_daemon, tmp_path: Path) -> None:
    q_password = "qpw-SECRET-5b1e"
    api_key = "apikey-SECRET-77c2"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]
    with run_qserver("--user", f"alice:{q_password}") as qsrv:
        code = write(tmp_path / "ep.py", "def ping():\n    return q('til 3').py()\n")
        d = start_daemon(
            {
                "pools": {
                    "default": pool_config(q={"port": qsrv.port, "username": "alice", "password": q_password, "reconnect": {"initial": "50ms", "max": "200ms"}})
                },
                "http": {"listen": f"127.0.0.1:{http_port}"},
                "services": {"s": {"api_keys": [api_key], "endpoints": {"ping": {"code": code, "function": "ping"}}}},
            }
        )
        replies = []
        ok = call(tcp(d, api_key=api_key), "s/ping")
        assert ok.status == 200 and json.loads(ok.body)["response"] == [0, 1, 2]
        replies.append(call(tcp(d), "s/ping", headers=basic(api_key[:-1] + "x")).body)  # a near-miss key
        replies.append(call(tcp(d), "s/ping", headers={"Authorization": f"Bearer {api_key}x"}).body)
        qsrv.stop()  # q errors now: their messages must not carry the password either
        replies.append(call(tcp(d, api_key=api_key), "s/ping").body)
        with d.session() as s:
            replies.append(json.dumps(s.status()).encode())
            metrics = s.metrics()
            with pytest.raises(Exception) as info:
                s.call(lambda: q("til 1"))  # noqa: F821 - the worker's q global
            replies.append(str(info.value).encode())
        replies.append(get(unix(d), "/status").body)
        wait_for(lambda: "q" in d.log(), 10, what="log written")
        d.stop()
    haystacks = {"log": d.log(), "metrics": metrics, **{f"reply{i}": r.decode(errors="replace") for i, r in enumerate(replies)}}
    for where, text in haystacks.items():
        for secret in (q_password, api_key):
            assert secret not in text, f"{secret!r} leaked into {where}"
