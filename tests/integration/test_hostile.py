"""Hostile functions, clients and bytes: the daemon keeps serving and loses nothing else."""

from __future__ import annotations

import json
import os
import pickle
import re
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cruised
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind, Status
from support.daemon import Daemon, pool_config, wait_for
from support.raw import raw_connect, read_frame


def test_a_function_that_forks_gets_exactly_one_reply(daemon: Daemon) -> None:
    s = daemon.session(timeout=10)  # a child left in the worker's loop would steal frames: fail, not hang

    def fork_and_return():
        import os as _os

        pid = _os.fork()
        return "child" if pid == 0 else "parent"

    for _ in range(3):  # the child's reply, were it sent, would race the parent's: try a few times
        assert s.call(fork_and_return) == "parent"
    assert [s.call(lambda i=i: i) for i in range(5)] == list(range(5)), "replies stay matched after the fork"
    # a second reply would be a protocol violation, and the worker would be killed for it
    assert s.status()["pools"]["default"]["exits"] == {}


def test_a_function_that_closes_its_channel_fails_only_its_call(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, exec_timeout="60s")}})
    s = d.session()

    def sever():
        import os as _os
        import socket as _socket

        for fd in range(3, 64):
            try:
                if _socket.socket(fileno=_os.dup(fd)).family == _socket.AF_UNIX:
                    _os.dup2(_os.open(_os.devnull, _os.O_RDWR), fd)
            except OSError:
                pass
        return "unreachable reply"

    with pytest.raises(cruised.WorkerCrashed):
        s.call(sever)
    assert s.call(lambda: "healed") == "healed"


def test_huge_output_is_logged_not_fatal(daemon: Daemon) -> None:
    def shout():
        import sys as _s

        for _ in range(2000):
            _s.stdout.write("x" * 1000 + "\n")
        _s.stdout.flush()
        return "done"

    assert daemon.session().call(shout) == "done"
    assert daemon.session().call(lambda: 1) == 1


def test_memory_hog_is_recycled_by_max_rss(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, max_rss="400MiB")}})
    s = d.session()
    hoard: list = []

    def grow():
        import numpy as _np

        hoard.append(_np.ones(80_000_000))  # ~640 MB kept alive in the worker's globals
        return len(hoard)

    first = s.call(os.getpid)
    assert s.call(grow) == 1
    wait_for(lambda: d.status()["pools"]["default"]["exits"].get("recycled") == 1, 20, what="recycled")
    assert s.call(os.getpid) != first


def test_with_max_rss_a_worker_keeps_no_warm_heap_between_calls(start_daemon) -> None:
    """Without a limit, a worker keeps freed large buffers warm for its next call (pool/heap.py).
    max_rss is checked right after every call, so with a limit freed buffers leave at once:
    otherwise a small call after a large one could get the worker recycled for memory it
    no longer uses."""
    from cruised.pool import heap

    blob = os.urandom(24 << 20)

    def private_after_large_calls(d) -> tuple[int, int, int]:
        with d.session() as s:
            pid = s.call(os.getpid)
            base = heap.private_rss(pid)
            for _ in range(3):  # inline first, then through shared files
                assert s.call(lambda b: b[::-1], blob) == blob[::-1]
            assert s.call(os.getpid) == pid
            return pid, base, heap.private_rss(pid)

    _, base, warm = private_after_large_calls(start_daemon({"pools": {"default": pool_config(cruise=1, max=1)}}))
    assert warm > base + (40 << 20), "without a limit the freed buffers stay warm"
    d = start_daemon({"pools": {"default": pool_config(cruise=1, max=1, max_rss=base + (400 << 20))}})
    _, base, after = private_after_large_calls(d)
    assert after < base + (20 << 20), (base, after)
    assert not d.status()["pools"]["default"]["exits"].get("recycled")


def test_a_pickle_that_kills_the_worker_at_load_never_touches_the_supervisor(daemon: Daemon) -> None:
    class Bomb:
        def __reduce__(self):
            return (os._exit, (9,))

    s = daemon.session()
    with pytest.raises(cruised.WorkerCrashed, match="exit code 9"):
        s.call(len, Bomb())
    assert s.call(lambda: "fine") == "fine"
    assert pickle  # kept for symmetry with other hostile-pickle cases


def test_a_pickle_that_raises_at_load_is_an_error_for_that_call(daemon: Daemon) -> None:
    class Raiser:
        def __reduce__(self):
            return (int, ("not a number",))

    with pytest.raises(ValueError, match="invalid literal"):
        daemon.session().call(len, Raiser())


def _connect_as(path: str, uid: int) -> tuple[int, str]:
    """Connect from a forked child running as ``uid``; return (status, message) it was sent."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            os.close(r)
            os.setgid(uid)
            os.setuid(uid)
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.settimeout(10)
            c.connect(path)
            try:
                c.sendall(frames.frame(Kind.PING, 1))
            except BrokenPipeError:
                pass  # a refused peer's socket is closed right after the refusal is written: still read it
            _, status, _, body = read_frame(c)
            os.write(w, json.dumps([status, body.decode() or "{}"]).encode())
            code = 0
        except BaseException as exc:  # noqa: BLE001 - tell the parent what went wrong
            os.write(w, json.dumps([-1, json.dumps({"message": f"child failed: {exc!r}"})]).encode())
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    status, body = json.loads(data)
    return status, json.loads(body).get("message", "")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
def test_peer_uid_allowlist_refuses_others(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"socket_mode": "0666", "allow_uids": [0]}})
    os.chmod(d.sockdir, 0o755)
    status, message = _connect_as(d.socket, 65534)
    assert status == Status.ACCESS_DENIED and "uid 65534" in message, message
    assert _connect_as(d.socket, 0)[0] == Status.OK
    assert "refused connection" in d.log()


def test_connection_limit_refuses_cleanly(start_daemon) -> None:
    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"max_connections": 5}})
    held = [raw_connect(d.socket) for _ in range(5)]
    for c in held:  # make sure all five are admitted
        c.sendall(frames.frame(Kind.PING, 1))
        assert read_frame(c)[1] == Status.OK
    extra = raw_connect(d.socket)
    _, status, _, body = read_frame(extra)
    assert status == Status.QUEUE_FULL and "max_connections" in json.loads(body)["message"]
    held.pop().close()
    wait_for(lambda: d.session().call(lambda: 1) == 1, 10, what="a freed slot")
    for c in held:
        c.close()


_kinds = st.sampled_from([int(k) for k in Kind] + [0, 7, 200, 255])


@st.composite
def hostile_frames(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(st.binary(min_size=1, max_size=64))
    kind = draw(_kinds)
    payload = draw(st.binary(max_size=300))
    if choice == 1:
        return frames.frame(kind, draw(st.integers(0, 2**64 - 1)), payload, draw(st.integers(0, 0xFFFF)))
    if choice == 2:  # lies about its length
        raw = bytearray(frames.frame(kind, 1, payload))
        struct.pack_into("<I", raw, 0, draw(st.integers(0, 2**32 - 1)))
        return bytes(raw[: draw(st.integers(1, len(raw)))])
    if choice == 3:  # a CALL or REGISTER with a plausible head and junk after it
        head = frames.call_head("default", draw(st.integers(0, 2**32 - 1)), draw(st.binary(min_size=16, max_size=16)))
        return frames.frame(draw(st.sampled_from([Kind.CALL, Kind.REGISTER, Kind.CHECK])), 3, head + payload)
    raw = bytearray(frames.frame(kind, 2, payload))
    raw[4] = draw(st.integers(0, 255))  # version
    return bytes(raw)


FUZZ_EXAMPLES = int(os.environ.get("CRUISED_FUZZ_FRAMES", "150"))


@pytest.fixture(scope="module")
def fuzz_daemon(tmp_path_factory):
    from support.daemon import Daemon as D

    d = D({"pools": {"default": pool_config(cruise=1, max=2)}, "daemon": {"max_message_bytes": "1MiB", "read_timeout": "1s"}}, tmp_path_factory.mktemp("fuzz"))
    d.start()
    yield d
    d.cleanup()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(blobs=st.lists(hostile_frames(), min_size=1, max_size=4))
def test_fuzzed_frames_leave_the_daemon_serving(fuzz_daemon: Daemon, blobs: list[bytes]) -> None:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(fuzz_daemon.socket)
    try:
        for b in blobs:
            c.sendall(b)
    except OSError:
        pass  # the daemon may hang up on us: that is allowed
    finally:
        c.close()
    probe = raw_connect(fuzz_daemon.socket)
    probe.sendall(frames.frame(Kind.PING, 77))
    assert read_frame(probe)[1:3] == (Status.OK, 77)
    probe.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch users")
def test_workers_run_as_the_configured_unprivileged_user(start_daemon, tmp_path) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    d = start_daemon({"pools": {"default": pool_config(), "jail": pool_config(user="nobody")}})
    jail = d.session(pool="jail")
    assert jail.call(os.getuid) == nobody.pw_uid
    assert jail.call(os.getgid) == nobody.pw_gid
    with pytest.raises(PermissionError):
        jail.call(lambda p: open(p).read(), str(secret))
    assert d.session().call(os.getuid) == 0, "other pools are unaffected"


def test_unknown_pool_user_is_a_config_error() -> None:
    from cruised import config

    with pytest.raises(config.ConfigErrors, match=re.escape("pools.p.user: no such user: no-such-user-xyz")):
        config.parse({"pools": {"p": {"user": "no-such-user-xyz"}}})
