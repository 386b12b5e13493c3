"""Deeply nested requests and results through the real daemon: refused, never fatal to the worker.

One daemon with both front doors and a one-worker pool, so "the worker
survived" is checkable exactly: the same pid answers before and after, and
the pool counts no crash. The q messages are built by hand (tests/support/qraw.py
sends the bytes): pykx itself cannot build, or survive reading, a list nested
100,000 levels deep.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cruised.pool import nesting
from support.daemon import Daemon, pool_config
from support.httphelp import call, error_of, unix, write
from support.qraw import ASYNC, RawQ, kx, q_compress, sym

EPS = """
import os


def echo(**data):
    return {"pid": os.getpid(), "data": data}


def pid():
    return os.getpid()


def takes(*args):
    return os.getpid()


def deep(n):
    value = 0
    for _ in range(n):
        value = [value]
    return value
"""

DEEP = 100_000


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("nesting")
    code = write(root / "eps.py", EPS)
    config = {
        "http": {"listen": "127.0.0.1:0"},
        "qipc": {"listen": "127.0.0.1:0"},
        "pools": {"default": pool_config(min=1, cruise=1, max=1)},  # one worker: a crash would change its pid
        "services": {"t": {"endpoints": {name: {"code": code, "function": name} for name in ("echo", "pid", "takes", "deep")}}},
    }
    daemon = Daemon(config, root, args=[], env={"PYKX_UNLICENSED": "true"})
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.cleanup_or_fail()


def worker_pid(d: Daemon) -> int:
    resp = call(unix(d), "t/pid")
    assert resp.status == 200, resp.body
    return int(resp.json()["response"])


def no_crash(d: Daemon) -> None:
    pool = d.status()["pools"]["default"]
    assert pool["requests"].get("crashed", 0) == 0, pool


def nested_json(levels: int) -> bytes:
    """``{"a": [[...]]}``: the object is one level, so ``levels - 1`` arrays."""
    return b'{"a": ' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}"


# -- HTTP --------------------------------------------------------------------------------


def test_http_body_nested_100k_deep_is_a_400_naming_the_limit_and_the_worker_lives(d: Daemon) -> None:
    before = worker_pid(d)
    resp = call(unix(d), "t/echo", raw=nested_json(DEEP))
    assert resp.status == 400, resp.body
    err = error_of(resp)
    assert err["errorType"] == "BadRequest"
    assert f"nested deeper than {nesting.MAX_DEPTH} levels" in err["message"], err
    assert worker_pid(d) == before
    no_crash(d)


def test_http_body_at_the_limit_is_served_and_one_level_more_is_not(d: Daemon) -> None:
    at = nested_json(nesting.MAX_DEPTH)
    resp = call(unix(d), "t/echo", raw=at)
    assert resp.status == 200, resp.body
    assert resp.json()["response"]["data"] == json.loads(at)
    assert call(unix(d), "t/echo", raw=nested_json(nesting.MAX_DEPTH + 1)).status == 400
    # brackets inside strings are text, not nesting
    assert call(unix(d), "t/echo", {"s": "[" * DEEP}).status == 200


def test_http_result_nested_100k_deep_is_a_500_and_the_worker_lives(d: Daemon) -> None:
    before = worker_pid(d)
    resp = call(unix(d), "t/deep", {"n": DEEP})
    assert resp.status == 500, resp.body
    err = error_of(resp)
    assert err["errorType"] == "ResultNotSerializable"
    assert f"nested deeper than {nesting.MAX_DEPTH} levels" in err["message"], err
    assert worker_pid(d) == before
    no_crash(d)


# -- kdb+ IPC ----------------------------------------------------------------------------


def q_call(head: list[Any], levels: int, tail: list[Any] | None = None, msgtype: int = 1) -> bytes:
    """The IPC message ``(head...; <a list nested levels deep>; tail...)``, built by hand."""

    def items(objs: list[Any]) -> bytes:
        if not objs:
            return b""
        return bytes(kx.serialize(kx.toq(objs), mode=6, wait=1).copy())[8 + 6 :]  # the items alone

    deep = b"\x00\x00\x01\x00\x00\x00" * levels + b"\xf9" + struct.pack("<q", 7)
    tail = tail or []
    body = b"\x00\x00" + struct.pack("<i", len(head) + 1 + len(tail)) + items(head) + deep + items(tail)
    return bytes([1, msgtype, 0, 0]) + struct.pack("<I", 8 + len(body)) + body


def q_pid(q: RawQ) -> int:
    return int(q.call([sym("t/pid"), None]).py())


def test_q_argument_nested_100k_deep_is_refused_naming_the_limit_and_the_worker_lives(d: Daemon) -> None:
    with RawQ(d.status()["qipc"]["port"]) as q:
        before = q_pid(q)
        q.send_bytes(q_call([sym("t/takes")], DEEP))
        with pytest.raises(kx.QError, match=rf"^cruised: arguments nested deeper than {nesting.MAX_DEPTH} levels .* #\d+$"):
            q.recv()
        assert q_pid(q) == before
        # at the limit it is served (the argument's own list is level one)
        q.send_bytes(q_call([sym("t/takes")], nesting.MAX_DEPTH - 1))
        assert q.recv()[1].py() == before
    no_crash(d)


def test_q_callback_call_nested_too_deep_is_answered_through_its_callback(d: Daemon) -> None:
    # deep enough to refuse, shallow enough for the door's own look at the last two items
    with RawQ(d.status()["qipc"]["port"]) as q:
        before = q_pid(q)
        q.send_bytes(q_call([sym("t/takes")], nesting.MAX_DEPTH + 10, [sym("onResult"), 42], msgtype=ASYNC))
        msgtype, msg = q.recv()
        assert msgtype == ASYNC
        name, reqid, (failed, text) = list(msg)
        assert (name.py(), reqid.py(), failed.py()) == ("onResult", 42, True)
        assert bytes(text.py()).decode().startswith(f"cruised: arguments nested deeper than {nesting.MAX_DEPTH} levels")
        assert q_pid(q) == before
    no_crash(d)


def test_q_async_message_nested_100k_deep_leaves_daemon_and_worker_up(d: Daemon) -> None:
    # an async message whose tail may be a callback: the door reads its items in the supervisor
    # only when they are shallow enough (pykx's deserializer would overflow the stack)
    with RawQ(d.status()["qipc"]["port"]) as q:
        before = q_pid(q)
        q.send_bytes(q_call([sym("t/takes")], DEEP, [sym("onResult"), 42], msgtype=ASYNC))
        # a sync call on the same handle runs after it: the daemon and the worker are still up
        assert q_pid(q) == before
    assert d.proc is not None and d.proc.poll() is None
    no_crash(d)


def test_q_result_nested_100k_deep_is_an_error_and_the_worker_lives(d: Daemon) -> None:
    with RawQ(d.status()["qipc"]["port"]) as q:
        before = q_pid(q)
        with pytest.raises(kx.QError, match=r"^cruised: cannot convert list to q: nested deeper than .* #\d+$"):
            q.call([sym("t/deep"), DEEP])
        assert q_pid(q) == before
    no_crash(d)


def test_the_limit_is_documented_where_callers_read_it() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    qdocs = (Path(__file__).resolve().parents[2] / "docs" / "q-developers.md").read_text()
    assert f"nested deeper than {nesting.MAX_DEPTH} levels" in readme
    assert f"nested deeper than {nesting.MAX_DEPTH} levels" in qdocs


def test_q_compressed_message_nested_100k_deep_leaves_the_supervisor_up(d: Daemon) -> None:
    # q compresses what it sends to another host; pykx decompresses only by deserializing, which
    # overflowed the supervisor's stack on this message: the door decompresses it in Python
    with RawQ(d.status()["qipc"]["port"]) as q:
        before = q_pid(q)
        q.send_bytes(q_compress(q_call([sym("t/takes")], DEEP)))
        with pytest.raises(kx.QError, match=rf"nested deeper than {nesting.MAX_DEPTH} levels"):
            q.recv()
        assert q_pid(q) == before
    assert d.proc is not None and d.proc.poll() is None
    no_crash(d)
