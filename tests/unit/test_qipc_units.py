"""Unit tests of the kdb+ IPC door's parts: config, logins, framing, pykx.remote recognition, conversions.

The door itself is tested through the real daemon in test_qipc.py; these
pin down the pieces' rules one by one, in process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cruised import config as config_mod
from cruised.config import ConfigErrors, QipcConfig
from cruised.doors import access
from cruised.doors.qipc import auth as qauth
from cruised.doors.qipc import remote as qremote
from cruised.doors.qipc import wire as qwire
from cruised.doors.qipc.door import RESERVE, build_qcall
from cruised.pool import qcall
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind
from support.qraw import kx, q_compress

# -- config --------------------------------------------------------------------------------


def _parse(raw: dict[str, Any], tmp_path: Path) -> Any:
    return config_mod.parse(raw, tmp_path)


def test_qipc_is_off_by_default_and_documented() -> None:
    cfg = config_mod.parse({})
    assert cfg.qipc.listen is None and cfg.qipc.unix and cfg.qipc.allow_loopback_without_password
    keys = {row[0] for row in config_mod.describe()}
    assert {"qipc.listen", "qipc.users_file", "qipc.endpoint_users", "qipc.remote_pool", "qipc.callback_concurrency"} <= keys


def test_qipc_config_errors_name_their_key(tmp_path: Path) -> None:
    (tmp_path / "bad-users.txt").write_text("alice:pw\nno-colon-here\n")
    with pytest.raises(ConfigErrors) as info:
        _parse(
            {
                "qipc": {
                    "listen": "localhost",
                    "tls_cert": "cert.pem",
                    "users_file": "bad-users.txt",
                    "callback_concurrency": 0,
                    "remote_pool": "nope",
                    "endpoint_users": {"svc/missing": ["alice"]},
                }
            },
            tmp_path,
        )
    text = str(info.value)
    assert "qipc.listen: expected host:port" in text
    assert "qipc.tls_cert: tls_cert and tls_key go together" in text
    assert "qipc.tls_cert: no such file" in text
    assert "qipc.users_file: " in text and "line 2: expected user:password" in text and "no-colon" not in text
    assert "qipc.callback_concurrency: must be positive" in text


def test_qipc_references_are_checked_against_pools_and_endpoints(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors) as info:
        _parse({"qipc": {"listen": "127.0.0.1:0", "remote_pool": "nope", "endpoint_users": {"svc/missing": ["alice"]}}}, tmp_path)
    text = str(info.value)
    assert "qipc.remote_pool: no pool named 'nope'" in text
    assert "qipc.endpoint_users.svc/missing: no endpoint 'svc/missing'" in text


def test_no_loopback_trust_needs_a_users_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigErrors, match=re.escape("qipc.allow_loopback_without_password: is false and there is no users_file")):
        _parse({"qipc": {"listen": "127.0.0.1:5010", "allow_loopback_without_password": False}}, tmp_path)


def test_qipc_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "u.txt").write_text("a:b\n")
    cfg = _parse({"qipc": {"listen": "127.0.0.1:5010", "users_file": "u.txt"}}, tmp_path)
    assert cfg.qipc.users_file == str(tmp_path / "u.txt") and cfg.qipc.address() == ("127.0.0.1", 5010)


# -- logins ----------------------------------------------------------------------------------


def test_password_formats() -> None:
    assert qauth.password_matches("secret", "secret") and not qauth.password_matches("secret", "Secret")
    md5 = hashlib.md5(b"pw").hexdigest()
    assert qauth.password_matches(md5, "pw") and qauth.password_matches(md5.upper(), "pw") and not qauth.password_matches(md5, md5)
    sha1 = hashlib.sha1(b"pw").hexdigest()
    assert qauth.password_matches(sha1, "pw") and not qauth.password_matches(sha1, "pw ")


def test_login_rules(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:pw\n\n# comment\n")
    trusting = qauth.Authenticator(QipcConfig(users_file=str(users)))
    assert trusting.login("anyone", "", local=True)  # loopback, no password
    assert not trusting.login("alice", "wrong", local=True)  # a password that is sent is checked
    assert trusting.login("alice", "pw", local=False)
    assert not trusting.login("anyone", "", local=False)
    strict = qauth.Authenticator(QipcConfig(users_file=str(users), allow_loopback_without_password=False))
    assert not strict.login("alice", "", local=True) and strict.login("alice", "pw", local=True)
    open_door = qauth.Authenticator(QipcConfig())
    assert open_door.login("x", "y", local=True) and not open_door.login("x", "y", local=False)


def test_users_file_is_re_read_when_it_changes(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text("alice:pw\n")
    auth = qauth.Authenticator(QipcConfig(users_file=str(users)))
    assert not auth.login("bob", "pw2", local=False)
    users.write_text("alice:pw\nbob:pw2\n")
    os.utime(users, ns=(1, 10**18))  # a different mtime, whatever the clock's resolution
    assert auth.login("bob", "pw2", local=False)
    users.write_text("broken line\n")
    os.utime(users, ns=(1, 2 * 10**18))
    assert auth.login("bob", "pw2", local=False)  # an unreadable update keeps the last good table


def test_loopback_detection() -> None:
    assert qauth.is_loopback(("127.0.0.1", 5)) and qauth.is_loopback(("::1", 5, 0, 0))
    assert not qauth.is_loopback(("10.0.0.1", 5)) and not qauth.is_loopback(None)


# -- framing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "user", "password", "cap", "agreed"),
    [
        (b"alice:pw\x06", "alice", "pw", 6, 6),
        (b":\x03", "", "", 3, 3),
        (b"bob", "bob", "", None, 0),
        (b"bob\x09", "bob", "", 9, 6),
        (b"a:b:c\x01", "a", "b:c", 1, 1),
    ],
)
def test_parse_handshake(raw: bytes, user: str, password: str, cap: int | None, agreed: int) -> None:
    hs = qwire.parse_handshake(raw)
    assert (hs.user, hs.password, hs.capability, hs.agreed) == (user, password, cap, agreed)


def test_parse_header() -> None:
    h = qwire.parse_header(bytes([1, 1, 0, 0]) + struct.pack("<I", 100))
    assert (h.little, h.msgtype, h.compressed, h.total) == (True, 1, False, 100)
    assert qwire.parse_header(bytes([0, 0, 1, 0]) + struct.pack(">I", 100)).total == 100
    assert qwire.parse_header(bytes([1, 0, 0, 2]) + struct.pack("<I", 5)).total == (2 << 32) + 5
    for bad in (bytes([2, 1, 0, 0]) + struct.pack("<I", 100), bytes([1, 3, 0, 0]) + struct.pack("<I", 100), bytes([1, 1, 0, 0]) + struct.pack("<I", 8)):
        with pytest.raises(qwire.WireError):
            qwire.parse_header(bad)


def _msg(obj: Any) -> bytes:
    return bytes(kx.serialize(obj if isinstance(obj, kx.K) else kx.toq(obj), mode=6, wait=1).copy())


def test_peek_routes_by_shape() -> None:
    p = qwire.peek(_msg([kx.SymbolAtom("svc/ep"), 1, 2]), True)
    assert (p.head, p.nargs, p.text) == ("svc/ep", 2, None)
    p = qwire.peek(_msg([kx.CharVector("svc/ep")]), True)
    assert (p.head, p.nargs) == ("svc/ep", 0)
    assert qwire.peek(_msg(kx.CharVector("1+1")), True).text == "1+1"
    assert qwire.peek(_msg(kx.SymbolAtom("x")), True).text == "x"
    p = qwire.peek(_msg([1, 2]), True)
    assert p.head is None and p.head_type == -7
    m = _msg([kx.SymbolAtom("svc/ep"), kx.LongVector(np.arange(5))])
    p = qwire.peek(m, True)
    # the arguments start where the name ends: re-wrapped as a list they are exactly the call's arguments
    args = bytes([0, 0]) + struct.pack("<i", p.nargs) + m[p.args_at :]
    again = kx.deserialize(qwire.ipc_header(True, 1, 8 + len(args)) + args)
    assert [x.np().tolist() for x in again] == [[0, 1, 2, 3, 4]]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_peek_of_garbage_raises_only_wire_errors(body: bytes) -> None:
    msg = bytes([1, 1, 0, 0]) + struct.pack("<I", 8 + len(body)) + body
    try:
        qwire.peek(msg, True)
    except qwire.WireError:
        pass


# -- pykx.remote recognition --------------------------------------------------------------------


def test_the_installed_pykx_remote_messages_are_recognised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capture what kx.remote really sends (its connection replaced) and classify each message."""
    import pykx.remote as remote

    sent: list[tuple[Any, tuple[Any, ...]]] = []

    class Capture:
        def __init__(self, *a: Any, **k: Any) -> None:
            pass

        def __call__(self, query: Any, *args: Any) -> Any:
            sent.append((query, args))
            return True

    monkeypatch.setattr(remote, "SyncQConnection", Capture)
    session = remote.session(port=1, libraries={"np": "numpy"})

    @remote.function(session)
    def f(x):
        return x

    f(1)
    kinds = [qremote.classify_text(q) or qremote.classify_lambda(q) for q, _ in sent]
    assert kinds == ["probe", "library", "call"]
    assert qremote.classify_text('@[system"l ",;"pykx.q";{\'"Failed to load KDB-X Python with error: ",x}]') == "load"
    assert qremote.classify_lambda("{x+y}") is None and qremote.classify_text("`pykx in key `.q") is None


def test_function_keys_cover_source_name_and_libraries() -> None:
    k = qremote.function_key(b"def f(): pass", "f", {})
    assert len(k) == frames.KEY_SIZE
    assert k != qremote.function_key(b"def f(): pass", "g", {})
    assert k != qremote.function_key(b"def f(): pass", "f", {"np": "numpy"})
    assert k == qremote.function_key(b"def f(): pass", "f", {})


def test_source_is_compiled_as_pykx_does_drop_the_decorator_and_trim() -> None:
    src = b"    @kx.remote.function(s)\n    def nested(x):\n        return helper + x\n"
    fn = qcall.load_source({"name": "nested"}, src, {"helper": 10}, lambda libs: {})
    assert fn(1) == 11
    with pytest.raises(NameError, match="does not define a function of that name"):
        qcall.load_source({"name": "other"}, src, {}, lambda libs: {})


# -- conversions and the shared rules ------------------------------------------------------------


def test_error_lines_are_one_short_line_ending_in_the_id() -> None:
    assert qcall.error_line("ValueError: bad\nthing\0here", 7) == "ValueError: bad thing here #7"
    long = qcall.error_line("x" * 1000, 123)
    assert len(long) == qcall.ERROR_TEXT_MAX and long.endswith("... #123")
    with pytest.raises(kx.QError, match=r"^cruised: busy #3$"):
        kx.deserialize(qcall.error_frame("cruised: busy #3"))


@pytest.mark.parametrize(
    ("nargs", "symbol", "arity", "callback"),
    [
        (3, True, {"min": 1, "max": 1}, True),  # f(x) with `cb; id appended
        (2, True, {"min": 2, "max": 2}, False),  # f(a, b) called with two arguments, the first a symbol
        (4, True, {"min": 2, "max": 4}, True),  # both would fit: the convention wins
        (4, True, {"min": 1, "max": 1}, True),  # fits neither: the callback gets the rank error
        (3, False, {"min": 1, "max": 1}, False),  # no symbol: plain
        (1, True, None, False),
        (2, True, None, True),  # arity unknown (not loaded yet): the shape decides
    ],
)
def test_deferred_sync_rule(nargs: int, symbol: bool, arity: dict[str, Any] | None, callback: bool) -> None:
    assert qcall.wants_callback(nargs, symbol, arity) is callback


def test_positional_range() -> None:
    def f(a, b=1, *args, c, d=2, **kw):
        return a

    r = qcall.positional_range(f)
    assert (r["min"], r["max"], r["var_keyword"], r["required_keywords"]) == (1, None, True, ["c"])
    assert r["names"] == ["a", "b", "c", "d"]


def test_q_to_python_mapping() -> None:
    assert qcall.to_python(kx.CharVector("héllo")) == "héllo"
    assert qcall.to_python(kx.SymbolAtom("a")) == "a"
    assert qcall.to_python(kx.SymbolVector(["a", "b"])) == ["a", "b"]
    v = qcall.to_python(kx.toq(np.arange(3)))
    assert isinstance(v, np.ndarray) and v.tolist() == [0, 1, 2]
    assert isinstance(qcall.to_python(kx.toq(pd.DataFrame({"x": [1]}))), pd.DataFrame)
    assert qcall.to_python(kx.toq({"a": kx.CharVector("t")})) == {"a": "t"}
    assert qcall.to_python(kx.toq(None)) is None
    assert qcall.to_python(kx.toq([1, kx.CharVector("s")])) == [1, "s"]


def test_python_to_q_mapping() -> None:
    assert isinstance(qcall.to_q("text"), kx.CharVector)
    assert isinstance(qcall.to_q([1, 2]), kx.LongVector) and isinstance(qcall.to_q([1.0, 2]), kx.FloatVector)
    assert isinstance(qcall.to_q([True, False]), kx.BooleanVector)
    assert [type(x).__name__ for x in qcall.to_q(["a", 1])] == ["CharVector", "LongAtom"]
    d = qcall.to_q({"k": "v"})
    assert isinstance(d.keys(), kx.SymbolVector) and isinstance(next(iter(d.values())), kx.CharVector)
    assert isinstance(qcall.to_q(pd.DataFrame({"s": ["a"]})), kx.Table)
    assert isinstance(qcall.to_q(np.array(["a", "b"])), kx.SymbolVector)
    with pytest.raises(qcall.NotConvertible) as info:
        qcall.to_q(object())
    assert info.value.what == "object"


# -- the QCALL frame --------------------------------------------------------------------------------


def test_qcall_frame_is_cut_from_the_receive_buffer_without_a_copy() -> None:
    msg = _msg([kx.SymbolAtom("svc/ep"), kx.LongVector(np.arange(1000)), kx.CharVector("x")])
    buf = bytearray(RESERVE) + bytearray(msg)
    p = qwire.peek(memoryview(buf)[RESERVE:], True)
    prefix = bytes([0, 0]) + struct.pack("<i", p.nargs)
    head = {"target": "endpoint", "name": "svc/ep", "cap": 6, "mode": "sync"}
    frame = build_qcall(buf, RESERVE + p.args_at, len(buf), prefix, head, True)
    assert frame is buf  # built in place
    total, kind, _, _ = frames.parse_header(frame, 1 << 30)
    assert total == len(frame) and kind == Kind.QCALL
    (n,) = qcall.HEAD_LEN.unpack_from(frame, frames.HEADER_SIZE)
    start = frames.HEADER_SIZE + qcall.HEAD_LEN.size
    assert json.loads(bytes(frame[start : start + n])) == head
    args = list(kx.deserialize(bytes(frame[start + n :])))
    assert args[0].np().tolist() == list(range(1000)) and bytes(args[1].py()) == b"x"


def test_qcall_frame_with_a_head_too_long_for_the_reserve_is_copied() -> None:
    msg = _msg([kx.SymbolAtom("e"), 1])
    buf = bytearray(RESERVE) + bytearray(msg)
    p = qwire.peek(memoryview(buf)[RESERVE:], True)
    head = {"target": "endpoint", "name": "n" * 2000, "cap": 6, "mode": "sync"}
    frame = build_qcall(buf, RESERVE + p.args_at, len(buf), bytes([0, 0]) + struct.pack("<i", 1), head, True)
    assert frame is not buf
    (n,) = qcall.HEAD_LEN.unpack_from(frame, frames.HEADER_SIZE)
    start = frames.HEADER_SIZE + qcall.HEAD_LEN.size
    assert json.loads(bytes(frame[start : start + n]))["name"] == "n" * 2000
    assert [x.py() for x in kx.deserialize(bytes(frame[start + n :]))] == [1]


def test_login_says_how_it_got_in(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("alice:pw\n")
    trusting = qauth.Authenticator(QipcConfig(users_file=str(users)))
    assert trusting.login("anyone", "", local=True) == qauth.LOOPBACK  # endpoint calls only: never code
    assert trusting.login("alice", "pw", local=True) == qauth.PASSWORD
    assert trusting.login("alice", "pw", local=False) == qauth.PASSWORD
    assert qauth.Authenticator(QipcConfig()).login("x", "y", local=True) == qauth.LOCAL  # no file to check it against


def test_abstract_socket_code_rule_is_the_native_allowlist_else_our_own_uid() -> None:
    assert qauth.peer_may_run_code(1000, 1000, [], [], own_uid=1000)
    assert not qauth.peer_may_run_code(1001, 1000, [], [], own_uid=1000)
    assert qauth.peer_may_run_code(1001, 50, [1001], [], own_uid=0) and qauth.peer_may_run_code(7, 50, [], [50], own_uid=0)
    assert not qauth.peer_may_run_code(0, 0, [1001], [], own_uid=0)  # an allowlist replaces the own-uid rule


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.9.9.9", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("db-host", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert access.is_loopback_host(host) is loopback


def test_http_exposure_names_keyless_services_only_beyond_loopback() -> None:
    def cfg(listen: str | None) -> Any:
        services = {
            "open": {"endpoints": {"e": {"code": __file__, "function": "f"}}},
            "keyed": {"api_keys": ["k"], "endpoints": {"e": {"code": __file__, "function": "f"}}},
        }
        return config_mod.parse({"pools": {"default": {}}, "services": services, "http": {"listen": listen}})

    warning = access.http_exposure(cfg("0.0.0.0:9580"))
    assert warning is not None and "services open have no api_keys" in warning and "keyed" not in warning
    assert access.http_exposure(cfg("127.0.0.1:9580")) is None
    assert access.http_exposure(cfg(None)) is None
    line = access.http_line(cfg("0.0.0.0:9580"), "0.0.0.0:9580")
    assert "API keys for keyed" in line and "no key for open" in line


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=3000), st.integers(min_value=1, max_value=40))  # q never compresses a bare header
def test_decompress_inverts_kdb_compression(body: bytes, repeat: int) -> None:
    plain = bytes([1, 1, 0, 0]) + struct.pack("<I", 8 + len(body) * repeat) + body * repeat  # repeats give back-references
    packed = q_compress(plain)
    assert packed[2] == 1
    assert bytes(qwire.decompress(packed, little=True)) == plain


def test_decompress_of_a_pykx_message_deserializes_to_the_same_object() -> None:
    obj = kx.toq({"a": list(range(500)), "b": ["x" * 40] * 50})
    plain = bytes(kx.serialize(obj, mode=6, wait=1).copy())
    again = kx.deserialize(bytes(qwire.decompress(q_compress(plain), little=True)))
    assert again.py() == obj.py()


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        (lambda b: b[:-3], "ends early"),
        (lambda b: b[:12] + b"\xff\x07\x09" + b[15:], "points outside"),  # a reference before anything was written
        (lambda b: b[:8] + struct.pack("<I", 8) + b[12:], "too small"),
    ],
)
def test_decompress_refuses_a_malformed_stream(mangle: Any, error: str) -> None:
    plain = bytes([1, 1, 0, 0]) + struct.pack("<I", 8 + 600) + bytes(range(200)) * 3
    with pytest.raises(qwire.WireError, match=error):
        qwire.decompress(mangle(q_compress(plain)), little=True)
