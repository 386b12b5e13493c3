"""Large buffers through a call's shared file (pool/wire/sharedfile.py): units, then the real daemon."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest

import cruised
from cruised.client import shipping
from cruised.core.channel import Channel
from cruised.pool import worker
from cruised.pool.wire import bundle, frames, sharedfile
from cruised.pool.wire.frames import Kind, Status
from support.daemon import Daemon, in_threads, pool_config, wait_for
from support.invariants import memfds
from support.raw import raw_connect, read_frame

BIG = sharedfile.SHARE_MIN


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def flat(parts: list[Any]) -> bytearray:
    return bytearray(b"".join(bytes(p) for p in parts))


# -- bundles ------------------------------------------------------------------------------------


def test_large_buffers_go_to_the_file_and_come_back() -> None:
    small = np.arange(10.0)
    big1, big2 = np.random.rand(BIG // 8), np.arange(BIG // 4, dtype=np.int32) * 3
    obj = {"s": small, "a": big1, "b": big2, "x": "text"}
    parts = bundle.pack(obj)
    assert bundle.shareable(parts)
    writer = sharedfile.Mapped(sharedfile.create())
    reader = sharedfile.Mapped(os.dup(writer.fd))  # another descriptor of the file, as a worker has
    try:
        shared = bundle.share(parts, writer, grow=sharedfile.FilePool.GROW)
        assert sum(len(bytes(p)) for p in shared) < BIG, "only the small buffer stays in the frame"
        assert os.fstat(writer.fd).st_size == sharedfile.FilePool.GROW  # grown in steps
        with pytest.raises(ValueError, match="shared file"):
            bundle.unpack(flat(shared))  # flagged buffers need the file
        out = bundle.unpack(flat(shared), 0, reader)
        np.testing.assert_array_equal(out["a"], big1)
        np.testing.assert_array_equal(out["b"], big2)
        np.testing.assert_array_equal(out["s"], small)
        out["a"][0] = -1.0  # a private copy: writable, and the file is untouched
        assert bundle.unpack(flat(shared), 0, reader)["a"][0] == big1[0]
        bundle.share(bundle.pack({"a": -big1, "b": big2, "s": small, "x": ""}), writer)  # the file reused
        assert out["b"][1] == big2[1] and out["a"][1] == big1[1], "objects already read never change"
    finally:
        writer.close()
        reader.close()


def test_bundles_stay_inline_when_the_file_cannot_take_them(tmp_path: Any) -> None:
    parts = bundle.pack(np.ones(BIG // 8))
    path = tmp_path / "ro"
    path.write_bytes(b"")
    ro = sharedfile.Mapped(os.open(path, os.O_RDONLY))
    rw = sharedfile.Mapped(sharedfile.create())
    try:
        assert bundle.share(parts, ro) is parts  # a read-only descriptor: the socket path
        assert bundle.share(parts, rw, limit=BIG - 1) is parts  # over the size limit
        assert not bundle.shareable(bundle.pack(np.ones(10)))
    finally:
        ro.close()
        rw.close()


def test_a_file_shorter_than_announced_is_an_error_not_a_fault() -> None:
    writer = sharedfile.Mapped(sharedfile.create())
    reader = sharedfile.Mapped(os.dup(writer.fd))
    try:
        shared = bundle.share(bundle.pack(np.ones(BIG // 8)), writer)
        bundle.unpack(flat(shared), 0, reader)  # mapped at full size...
        os.ftruncate(writer.fd, 100)  # ...then the file shrinks under the mapping
        with pytest.raises(sharedfile.SharedFileError, match="ends at 100 bytes"):
            bundle.unpack(flat(shared), 0, reader)
    finally:
        writer.close()
        reader.close()


def test_a_large_pickle_stream_goes_to_the_file_only_when_asked() -> None:
    """``bytes``, ``str`` and lists pickle in-band, not as buffers: the stream itself moves."""
    blob, text = os.urandom(BIG + 3), "é" * BIG
    writer = sharedfile.Mapped(sharedfile.create())
    reader = sharedfile.Mapped(os.dup(writer.fd))
    try:
        for obj in ([blob], ((blob,), {"t": text}), {"arr": np.arange(BIG // 4), "b": blob}):
            parts = bundle.pack(obj)
            assert bundle.shareable(parts, with_pickle=True)
            assert bundle.share(parts, writer) is parts or "arr" in obj, "without with_pickle the stream stays inline"
            moved = bundle.share(parts, writer, with_pickle=True)
            assert bundle.packed_size(moved) < 4096 and bundle.in_file(flat(moved))
            out = bundle.unpack(flat(moved), 0, reader)
            assert repr(out) == repr(obj) if "arr" not in obj else (out["b"] == blob and np.array_equal(out["arr"], obj["arr"]))
        reader.close()  # the stream was read in place: nothing may still view the mapping
        reader = sharedfile.Mapped(os.dup(writer.fd))
        small = bundle.pack(((1, "x"), {}))
        assert not bundle.shareable(small, with_pickle=True) and not bundle.in_file(flat(small))
        assert not bundle.in_file(b"") and not bundle.in_file(b"\x05\x00\x01"), "truncated: no claim, unpack says why"
        assert bundle.share(small, writer, with_pickle=True) is small
        moved = bundle.share(bundle.pack(blob), writer, with_pickle=True)
        os.ftruncate(writer.fd, 100)  # the stream's file shrank: an error, never a fault
        with pytest.raises(sharedfile.SharedFileError, match="ends at 100 bytes"):
            bundle.unpack(flat(moved), 0, reader)
        with pytest.raises(ValueError, match="none came with it"):
            bundle.unpack(flat(moved))
    finally:
        writer.close()
        reader.close()


@pytest.mark.parametrize(
    "obj, big",
    [
        (b"x" * BIG, True),
        (bytearray(BIG), True),
        ("y" * BIG, True),
        (b"x" * (BIG - 1), False),
        (((b"x" * BIG,), {}), True),  # an argument
        (((1,), {"k": "y" * BIG}), True),  # a keyword argument
        (((1,), {"k": [b"x" * BIG]}), False),  # deeper: pickled right, through pickle.dumps
        ([None] * 17 + [b"x" * BIG], False),  # long containers are not scanned
        (((5,), {}), False),
        (np.ones(BIG), False),  # arrays are out-of-band buffers already
    ],
)
def test_large_in_band_values_pickle_in_pieces_and_load_the_same(obj: Any, big: bool) -> None:
    assert bundle._big_inband(obj) is big
    parts = bundle.pack(obj)
    out = bundle.unpack(flat(parts))
    if isinstance(obj, np.ndarray):
        np.testing.assert_array_equal(out, obj)
    else:
        assert out == obj and type(out) is type(obj)


def test_file_pool_reuses_a_few_files_and_closes_the_rest() -> None:
    gc.collect()  # sockets earlier tests dropped close now, not in the middle of the count
    pool = sharedfile.FilePool()
    before = fd_count()
    files = [pool.take() for _ in range(sharedfile.POOL_IDLE + 3)]
    for m in files:
        pool.give(m)
    assert fd_count() == before + sharedfile.POOL_IDLE
    kept = pool.take()
    assert kept in files
    huge = pool.take()
    os.ftruncate(huge.fd, sharedfile.KEEP_FILE_BYTES + 1)  # sparse: no memory used
    pool.give(huge)  # grown too large to keep idle: closed
    assert fd_count() == before + sharedfile.POOL_IDLE - 1
    pool.close()
    assert fd_count() == before + 1  # only the one still taken
    pool.give(kept)  # given back after close: closed, not kept
    assert fd_count() == before


def test_worker_mappings_are_kept_per_file_and_bounded() -> None:
    cache = sharedfile.MappingCache()
    files = [sharedfile.Mapped(sharedfile.create()) for _ in range(cache.KEEP + 2)]
    try:
        for m in files:
            m.reserve(BIG)
        first = os.dup(files[0].fd)
        a = cache.open(first)
        cache.done(a)
        os.close(first)
        again = os.dup(files[0].fd)  # the same file under a new descriptor: the same mapping
        assert cache.open(again) is a and a.fd == again
        cache.done(a)
        os.close(again)
        for m in files[1:]:
            fd = os.dup(m.fd)
            cache.done(cache.open(fd))
            os.close(fd)
        assert a.mm is None, "the oldest mapping was dropped"
        assert len(cache._maps) == cache.KEEP
        big = sharedfile.Mapped(sharedfile.create())
        files.append(big)
        big.reserve(sharedfile.KEEP_FILE_BYTES + 1)  # sparse: no memory used
        fd = os.dup(big.fd)
        m = cache.open(fd)
        assert m.size == sharedfile.KEEP_FILE_BYTES + 1
        cache.done(m)
        os.close(fd)
        assert m.mm is None and len(cache._maps) == cache.KEEP, "a large file is mapped for its call only"
    finally:
        for m in files:
            m.close()


# -- the supervisor's channel -------------------------------------------------------------------


class Collect:
    def __init__(self) -> None:
        self.frames: list[tuple[int, int, int, int | None]] = []  # kind, status, reqid, fd taken
        self.closed: list[BaseException | None] = []
        self.take = True

    def on_frame(self, channel: Channel, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        self.frames.append((kind, status, reqid, channel.take_fd() if self.take else None))

    def on_close(self, channel: Channel, error: BaseException | None) -> None:
        self.closed.append(error)


class Wire:
    """An event loop and a socketpair: ``peer`` plays the other process, ``ours`` gets a Channel."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.peer, self.ours = socket.socketpair()
        self.channels: list[Channel] = []

    def channel(self, sink: Any, **kw: Any) -> Channel:
        ch = Channel(self.loop, self.ours, sink, 1 << 20, **kw)
        self.channels.append(ch)
        return ch

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.peer.close()
        self.ours.close()
        self.loop.close()


@pytest.fixture
def wire() -> Any:
    w = Wire()
    yield w
    w.close()


def _spin(loop: asyncio.AbstractEventLoop, until: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        loop.run_until_complete(asyncio.sleep(0.001))


def _memfd_with(data: bytes) -> int:
    fd = sharedfile.create()
    os.write(fd, data)
    return fd


def test_channel_gives_each_flagged_frame_its_descriptor_in_order(wire: Wire) -> None:
    sink = Collect()
    wire.channel(sink, accept_fds=True)
    fds = [_memfd_with(bytes([i]) * 3) for i in range(3)]
    batch = [
        frames.frame(Kind.CALL, 1, b"x", frames.CARRIES_FD),
        frames.frame(Kind.PING, 2),
        frames.frame(Kind.CALL, 3, b"y", frames.CARRIES_FD),
        frames.frame(Kind.CALL, 4, b"z", frames.CARRIES_FD),
    ]
    wire.peer.sendmsg([b"".join(batch)], sharedfile.rights(fds))
    sharedfile.close_all(fds)
    _spin(wire.loop, lambda: len(sink.frames) == 4)
    got = [(reqid, fd) for _, _, reqid, fd in sink.frames]
    assert [r for r, _ in got] == [1, 2, 3, 4] and got[1][1] is None
    for i, (_, fd) in enumerate(x for x in got if x[1] is not None):
        assert os.pread(fd, 3, 0) == bytes([i]) * 3  # the right file with the right frame
        os.close(fd)


def test_channel_closes_descriptors_nobody_took(wire: Wire) -> None:
    sink = Collect()
    sink.take = False
    wire.channel(sink, accept_fds=True)
    before = fd_count()
    fd = _memfd_with(b"abc")
    wire.peer.sendmsg([frames.frame(Kind.CALL, 1, b"", frames.CARRIES_FD)], sharedfile.rights([fd]))
    os.close(fd)
    _spin(wire.loop, lambda: len(sink.frames) == 1)
    assert fd_count() == before  # ours closed, and the received one too (it was never taken)


def test_a_flagged_frame_without_a_descriptor_breaks_the_connection(wire: Wire) -> None:
    sink = Collect()
    errors: list[str] = []
    wire.channel(sink, accept_fds=True, on_frame_error=lambda c, e: errors.append(str(e)))
    wire.peer.sendall(frames.frame(Kind.CALL, 7, b"", frames.CARRIES_FD) + frames.frame(Kind.PING, 8))
    _spin(wire.loop, lambda: bool(sink.closed))
    assert errors and "none came with it" in errors[0] and sink.frames == [], "nothing after the bad frame"


def test_a_worker_takes_each_flagged_calls_file_from_its_descriptor_socket() -> None:
    """What the launcher does (a file on the descriptor socket, then the CALL on the channel),
    read back by the worker's channel: each flagged CALL gets its own file, in order."""
    chan_ours, chan_theirs = socket.socketpair()
    fds_ours, fds_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds_theirs.setblocking(False)
    rx = worker.Channel(chan_theirs, 1 << 20, fds_theirs)
    files = [_memfd_with(bytes([i]) * 2) for i in range(3)]
    try:
        for i, fd in enumerate(files):
            fds_ours.sendmsg([b"F"], sharedfile.rights([fd]))
            chan_ours.sendall(frames.frame(Kind.CALL, i, b"args", frames.CARRIES_FD) + frames.frame(Kind.PING, 100 + i))
        for i in range(3):
            assert rx.read() is not None and rx.frame_fd is not None
            assert os.pread(rx.frame_fd, 2, 0) == bytes([i]) * 2
            os.close(rx.frame_fd)
            assert rx.read() is not None and rx.frame_fd is None  # the PING behind it has none
        chan_ours.sendall(frames.frame(Kind.CALL, 9, b"", frames.CARRIES_FD))  # a file that never came
        with pytest.raises(frames.FrameError, match="none came"):
            rx.read()
    finally:
        sharedfile.close_all(files)
        for sock in (chan_ours, chan_theirs, fds_ours, fds_theirs):
            sock.close()


# -- through the real daemon ---------------------------------------------------------------------


def echo(x: Any) -> Any:
    return x


def test_large_arguments_and_results_round_trip_through_the_daemon(daemon: Daemon) -> None:
    s = daemon.session()
    sup = daemon.proc.pid  # type: ignore[union-attr]  # proc is set while the daemon runs
    s.call(echo, 1)
    mine = memfds()  # other tests' sessions in this process may keep files of their own
    one_mb = np.random.rand(1 << 17)
    np.testing.assert_array_equal(s.call(echo, one_mb), one_mb)
    big = np.random.rand(8 << 20)  # 64 MB
    np.testing.assert_array_equal(s.call(lambda a: a[::-1].copy(), big), big[::-1])
    df = pd.DataFrame({"a": np.arange(100_000), "b": np.random.rand(100_000), "s": ["x"] * 100_000})
    pd.testing.assert_frame_equal(s.call(echo, df), df)
    assert s.call(lambda a: float(a.sum()), one_mb) == pytest.approx(float(one_mb.sum()))  # large in, small out
    np.testing.assert_array_equal(s.call(lambda n: np.ones(n), 1 << 17), np.ones(1 << 17))  # small in, large out
    mixed = (one_mb, np.arange(5), one_mb * 2)
    out = s.call(lambda t: (t[2], t[1], t[0]), mixed)
    np.testing.assert_array_equal(out[0], one_mb * 2)
    np.testing.assert_array_equal(out[2], one_mb)
    with pytest.raises(ZeroDivisionError):
        s.call(lambda a: 1 / 0, one_mb)
    for i in range(30):  # the client reuses its files: descriptors do not grow with calls
        assert s.call(lambda a, k: a[k], one_mb, i) == one_mb[i]
    results = list(s.map(lambda a: a * 2, [one_mb] * 40, window=16))
    assert all(np.array_equal(r, one_mb * 2) for r in results)
    assert memfds() <= mine + 2 * sharedfile.POOL_IDLE
    wait_for(lambda: memfds(sup) == 0, what="the supervisor holding no shared file")
    s.close()
    assert memfds() == mine, "closing the session closes its files"


class ReplySizes:
    """Records the size of every non-empty reply frame a session's connection reads."""

    def __init__(self, session: Any) -> None:
        self.conn = session._connection()
        self.sizes: list[int] = []
        deliver = self.conn._deliver

        def recording(frame: bytearray, status: int, reqid: int) -> None:
            if len(frame) > frames.HEADER_SIZE:  # not the empty answer to a REGISTER
                self.sizes.append(len(frame))
            deliver(frame, status, reqid)

        self.conn._deliver = recording

    def take(self) -> list[int]:
        out, self.sizes = self.sizes, []
        return out


def test_a_function_with_large_results_gets_a_file_for_them(daemon: Daemon) -> None:
    """A query returning a table has small arguments: its first large result comes inline, and
    from then on its calls carry a file, so the result does not pass through the daemon. A
    function whose results turn small stops taking files."""
    s = daemon.session()
    sup = daemon.proc.pid  # type: ignore[union-attr]  # proc is set while the daemon runs
    s.call(echo, np.ones(BIG))  # the connection asks PASS_FDS once
    s.call(echo, np.ones(BIG))
    replies = ReplySizes(s)

    def table(n: int) -> Any:
        import numpy as np

        return {"price": np.arange(n, dtype=float), "sym": "s" * n}

    shipped = s._ship(table)
    for _ in range(4):
        out = s.call(table, BIG)
        np.testing.assert_array_equal(out["price"], np.arange(BIG, dtype=float))
        assert out["sym"] == "s" * BIG
    sizes = replies.take()
    assert sizes[0] > 2 * BIG and all(n < 4096 for n in sizes[1:]), sizes
    assert shipped.big_results
    results = list(s.map(table, [BIG] * 20, window=8))
    assert all(r["sym"] == "s" * BIG for r in results) and all(n < 4096 for n in replies.take())
    assert s.call(table, 3)["sym"] == "sss"
    assert not shipped.big_results, "small results: the next calls go without a file"
    assert s.call(table, 3)["sym"] == "sss"
    wait_for(lambda: memfds(sup) == 0, what="the supervisor holding no shared file")
    s.close()


def test_large_in_band_values_travel_in_the_file_both_ways(daemon: Daemon) -> None:
    s = daemon.session()
    s.call(echo, np.ones(BIG))  # PASS_FDS answered: files from the next call on
    replies = ReplySizes(s)
    blob = os.urandom(1 << 20)
    for obj in (blob, "é" * (1 << 19), (blob, np.arange(BIG)), [blob, 1, "x"]):
        out = s.call(echo, obj)
        if isinstance(obj, tuple):
            assert out[0] == blob and np.array_equal(out[1], obj[1])
        else:
            assert out == obj
    assert all(n < 4096 for n in replies.take()), "every result came through the file"
    assert s.call(lambda b: len(b), blob) == len(blob)
    with pytest.raises(ValueError, match="1048576"):
        s.call(lambda b: (_ for _ in ()).throw(ValueError(len(b))), blob)
    s.close()


def test_a_client_that_does_not_say_it_reads_pickles_from_files_gets_them_inline(daemon: Daemon) -> None:
    """An older client never flags PICKLE_IN_FILE: its results' pickle streams stay in the frame,
    only their buffers use the file, as before the flag existed."""
    s = daemon.session()
    s.call(echo, np.ones(BIG))
    conn = s._connection()
    assert conn.file_pickle, "this daemon announced FILE_PICKLE in its PASS_FDS answer"
    conn.file_pickle = False
    replies = ReplySizes(s)
    blob, arr = os.urandom(1 << 20), np.random.rand(BIG)
    out = s.call(echo, (blob, arr))
    assert out[0] == blob and np.array_equal(out[1], arr)
    (size,) = replies.take()
    assert len(blob) < size < len(blob) + 4096, "the pickle inline, the array in the file"
    s.close()


def test_a_daemon_that_announces_no_features_gets_no_pickle_in_files() -> None:
    from cruised.client import session as client

    conn = client._Connection.__new__(client._Connection)
    conn.pass_fds, conn.file_pickle = None, False
    conn._pass_fds_lock = threading.Lock()
    sent: list[Any] = []
    conn.send = lambda requests, callback=None, result_file=False: sent.append(callback)  # type: ignore[method-assign]  # a recorder in place of the method
    for payload, expect in ((b"", False), (frames.FEATURES.pack(0), False), (frames.FEATURES.pack(frames.FILE_PICKLE), True)):
        conn.pass_fds, sent[:] = None, []
        assert conn._may_pass_fds() is False  # the first large call goes inline while asking
        slot = client._Pending()
        slot.resolve(Status.OK, bytearray(frames.frame(Kind.REPLY, 1, payload)))
        sent[0](slot)
        assert conn.pass_fds is True and conn.file_pickle is expect


def test_shared_files_are_released_on_every_kind_of_answer(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"pools": {"default": pool_config(min=1, cruise=1, max=1, queue_size=2, queue_timeout="1s", exec_timeout="2s")}})
    s = d.session()
    sup = d.proc.pid  # type: ignore[union-attr]  # proc is set while the daemon runs
    s.call(echo, 1)
    mine = memfds()
    arr = np.random.rand(1 << 17)

    def nap(a: Any, secs: float) -> int:
        import time as _t

        _t.sleep(secs)
        return len(a)

    blocker = s.submit(nap, arr, 1.5)
    wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 1, what="the worker busy")
    waiting = [s.submit(nap, arr, 0) for _ in range(4)]  # 2 queue (then time out), 2 refused: full
    outcomes = []
    for f in waiting:
        try:
            outcomes.append(f.result(30))
        except cruised.CruisedError as exc:
            outcomes.append(type(exc).__name__)
    assert blocker.result(30) == len(arr)
    assert sorted(map(str, outcomes)) == ["QueueFull", "QueueFull", "QueueTimeout", "QueueTimeout"]
    with pytest.raises(cruised.ExecutionTimeout):
        s.call(nap, arr, 10)  # its worker is killed; the client closes that file rather than reuse it
    with pytest.raises(cruised.WorkerCrashed):
        s.call(lambda a: os._exit(3), arr)
    np.testing.assert_array_equal(s.call(echo, arr), arr)

    # a client that leaves with shared calls in the queue
    other = d.session()
    futs = [other.submit(nap, arr, 0.3) for _ in range(3)]
    other.close()
    del futs
    wait_for(lambda: d.status()["pools"]["default"]["workers"]["busy"] == 0, what="the pool idle again")
    wait_for(lambda: memfds(sup) == 0, what="the supervisor holding no shared file")
    assert memfds() <= mine + 2 * sharedfile.POOL_IDLE
    s.close()
    assert memfds() == mine, "every call's file was closed or pooled, and the pool is closed"


def _register(sock: socket.socket, fn: Callable[..., Any], pool: str = "default") -> bytes:
    captured: list[shipping.Capture] = []
    blob = shipping.dump_function(fn, captured)
    key = shipping.function_key(blob, {})
    meta = json.dumps({"python": shipping.PYTHON, "libraries": {}, "name": "f"}).encode()
    sock.sendall(frames.frame(Kind.REGISTER, 1, frames.register_head(pool, key, meta) + blob))
    assert read_frame(sock)[1] == Status.OK
    return key


#: the arguments of a small call: one array, only ever packed (never changed), so one for all
_SMALL_ARGS = ((np.ones(10),), {})


def _flagged_call(key: bytes, reqid: int, obj: Any = _SMALL_ARGS, pool: str = "default") -> bytes:
    """A CALL that announces a shared file (small: one sendmsg takes it whole)."""
    body = flat(bundle.pack(obj))
    return frames.frame(Kind.CALL, reqid, frames.call_head(pool, 0, key) + bytes(body), frames.CARRIES_FD)


def test_a_bundle_claiming_a_stream_in_a_file_it_lacks_fails_only_its_call(daemon: Daemon) -> None:
    """A CALL without a file whose bundle says its pickle stream is in one: that call gets the
    reason as its error, and the connection and the worker go on."""
    sock = raw_connect(daemon.socket)
    try:
        key = _register(sock, echo)
        import struct

        body = flat(bundle.pack(((1,), {})))
        n, ln = struct.unpack_from("<HQ", body)
        struct.pack_into("<HQ", body, 0, n, ln | sharedfile.IN_FILE)  # claims the stream is in a file
        sock.sendall(frames.frame(Kind.CALL, 2, frames.call_head("default", 0, key) + bytes(body), frames.PICKLE_IN_FILE))
        _, status, reqid, reply = read_frame(sock)
        assert (status, reqid) == (Status.ERROR, 2) and b"none came with it" in reply
        sock.sendall(frames.frame(Kind.CALL, 3, frames.call_head("default", 0, key) + bytes(flat(bundle.pack(((5,), {}))))))
        _, status, reqid, reply = read_frame(sock)
        assert (status, reqid) == (Status.OK, 3) and bundle.unpack(reply) == 5
    finally:
        sock.close()


def test_hostile_descriptors_fail_only_their_request(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"max_message_bytes": "8MiB"}})
    sup = d.proc.pid  # type: ignore[union-attr]  # proc is set while the daemon runs
    c = raw_connect(d.socket)
    key = _register(c, echo)
    baseline = fd_count(sup)  # one client, one worker: nothing else opens descriptors meanwhile

    early = sharedfile.create()
    c.sendmsg([_flagged_call(key, 9)], sharedfile.rights([early]))  # before PASS_FDS: the file is lost
    _kind, status, reqid, body = read_frame(c)
    assert (status, reqid) == (Status.BAD_REQUEST, 9) and "before PASS_FDS" in json.loads(body)["message"]
    os.close(early)
    c.sendall(frames.frame(Kind.PASS_FDS, 20))
    assert read_frame(c)[1:3] == (Status.OK, 20)

    r, w = os.pipe()
    c.sendmsg([_flagged_call(key, 10)], sharedfile.rights([r]))  # not a memfd
    _, status, reqid, body = read_frame(c)
    assert (status, reqid) == (Status.BAD_REQUEST, 10) and "not a memfd" in json.loads(body)["message"]

    huge = sharedfile.create()
    os.ftruncate(huge, 16 << 20)  # sparse, but over daemon.max_message_bytes
    c.sendmsg([_flagged_call(key, 11)], sharedfile.rights([huge]))
    _, status, reqid, body = read_frame(c)
    assert (status, reqid) == (Status.BAD_REQUEST, 11) and "daemon.max_message_bytes" in json.loads(body)["message"]

    c.sendmsg([frames.frame(Kind.PING, 12, b"", frames.CARRIES_FD)], sharedfile.rights([huge]))
    _, status, reqid, body = read_frame(c)
    assert (status, reqid) == (Status.BAD_REQUEST, 12) and "only a CALL" in json.loads(body)["message"]

    c.sendall(frames.frame(Kind.PING, 13))  # the connection still serves
    assert read_frame(c)[1:3] == (Status.OK, 13)
    for fd in (r, w, huge):
        os.close(fd)
    wait_for(lambda: fd_count(sup) == baseline, what="every passed descriptor closed")

    # a flag with no descriptor cannot be told apart from a lost one: the connection ends
    c.sendall(_flagged_call(key, 14))
    _, status, reqid, body = read_frame(c)
    assert status == Status.BAD_REQUEST and "none came with it" in json.loads(body)["message"]
    with pytest.raises(ConnectionError):
        read_frame(c)
    c.close()
    s = d.session()
    assert s.call(lambda: "still serving") == "still serving"


def test_only_memfds_are_accepted_and_a_read_only_one_gets_its_result_inline(start_daemon: Callable[..., Daemon], tmp_path: Any) -> None:
    """A file on a real filesystem is refused before anything touches it (on FUSE or a hard NFS
    mount, fstat or close could block the event loop); a memfd passed read-only still works, its
    result coming back inline because the worker cannot write into it."""
    d = start_daemon({"pools": {"default": pool_config()}})
    c = raw_connect(d.socket)
    key = _register(c, lambda a: a * 2)
    c.sendall(frames.frame(Kind.PASS_FDS, 2))
    assert read_frame(c)[1:3] == (Status.OK, 2)

    disk = tmp_path / "args"
    disk.write_bytes(b"x" * 100)
    fd = os.open(disk, os.O_RDONLY)
    c.sendmsg([_flagged_call(key, 3)], sharedfile.rights([fd]))
    os.close(fd)
    _, status, reqid, body = read_frame(c)
    assert (status, reqid) == (Status.BAD_REQUEST, 3) and "not a memfd" in json.loads(body)["message"]

    arr = np.random.rand(BIG // 8)
    m = sharedfile.Mapped(sharedfile.create())
    parts = bundle.share(bundle.pack(((arr,), {})), m)
    ro = os.open(f"/proc/self/fd/{m.fd}", os.O_RDONLY)  # the same memfd, opened read-only
    c.sendmsg([frames.frame(Kind.CALL, 5, frames.call_head("default", 0, key) + bytes(flat(parts)), frames.CARRIES_FD)], sharedfile.rights([ro]))
    os.close(ro)
    _, status, reqid, body = read_frame(c)
    assert (status, reqid) == (Status.OK, 5)
    np.testing.assert_array_equal(bundle.unpack(body), arr * 2)  # inline: no file needed to read it
    m.close()
    c.close()


def test_descriptors_no_frame_claims_end_the_connection(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"pools": {"default": pool_config()}, "daemon": {"read_timeout": "1s"}})
    sup = d.proc.pid  # type: ignore[union-attr]  # proc is set while the daemon runs
    c = raw_connect(d.socket)
    c.sendall(frames.frame(Kind.PASS_FDS, 1))
    assert read_frame(c)[1:3] == (Status.OK, 1)
    baseline = fd_count(sup)
    files = [sharedfile.create() for _ in range(20)]
    c.sendmsg([frames.frame(Kind.PING, 2)], sharedfile.rights(files))  # a PING claims none of them
    sharedfile.close_all(files)
    assert read_frame(c)[1:3] == (Status.OK, 2)
    _, status, _, _ = read_frame(c)  # then, after daemon.read_timeout, the refusal
    assert status == Status.BAD_REQUEST
    with pytest.raises(ConnectionError):
        read_frame(c)
    wait_for(lambda: fd_count(sup) <= baseline, what="the unclaimed descriptors closed")
    c.close()


def test_a_large_first_call_from_a_callback_does_not_deadlock(daemon: Daemon) -> None:
    """The first call with large buffers asks the daemon (PASS_FDS) without waiting: a future's
    callback runs on the thread reading replies, and a wait there could never end."""
    s = daemon.session()
    arr = np.random.rand(1 << 17)
    done = threading.Event()
    got: list[Any] = []

    def then(_: Any) -> None:
        s.submit(echo, arr).add_done_callback(lambda f: (got.append(f.result()), done.set()))

    s.submit(echo, 1).add_done_callback(then)
    assert done.wait(30), "the callback's call never finished"
    np.testing.assert_array_equal(got[0], arr)
    for _ in range(3):  # later calls on the connection pass files
        np.testing.assert_array_equal(s.call(echo, arr), arr)
    assert s._connection().pass_fds is True
    s.close()


def test_a_function_that_forks_cannot_write_the_callers_file(daemon: Daemon) -> None:
    s = daemon.session()
    arr = np.random.rand(1 << 17)

    def fork_and_return(a: Any) -> Any:
        import os as _os

        child = _os.fork() == 0
        return a * (2.0 if child else 3.0)

    for _ in range(2):  # the second one passes a file
        np.testing.assert_array_equal(s.call(fork_and_return, arr), arr * 3.0)
    for _ in range(5):  # the children are gone; the files they could have reached hold the right bytes
        np.testing.assert_array_equal(s.call(echo, arr + 1), arr + 1)
    s.close()


def test_concurrent_clients_with_large_arguments(daemon: Daemon) -> None:
    arr = np.random.rand(1 << 17)

    def client(k: int) -> None:
        s = daemon.session()  # a connection each: their files pass the supervisor side by side
        for i in range(20):
            np.testing.assert_array_equal(s.call(lambda a, m: a * m, arr, k + i), arr * (k + i))
        s.close()

    errors = in_threads(client, 4, timeout=120)
    assert not errors, errors


@pytest.mark.parametrize(
    ("status", "error", "reused"),
    [
        (Status.OK, None, True),
        (Status.ERROR, None, True),
        (Status.QUEUE_FULL, None, True),
        (Status.QUEUE_TIMEOUT, None, True),
        (Status.EXEC_TIMEOUT, None, False),  # its worker may have been copying when it was killed
        (Status.WORKER_CRASHED, None, False),
        (Status.INTERNAL, cruised.DaemonUnavailable("gone"), False),
    ],
)
def test_the_client_reuses_a_file_only_when_no_worker_can_touch_it(status: int, error: Any, reused: bool) -> None:
    from cruised.client import session as client

    conn = client._Connection.__new__(client._Connection)  # only its file pool is used here
    conn.files = sharedfile.FilePool()
    slot = client._Pending()
    slot.shared = sharedfile.Mapped(sharedfile.create())
    slot.resolve(status, None, error)
    m = slot.shared
    conn.release(slot)
    assert slot.shared is None
    assert (m.fd >= 0) is reused and (conn.files.take() is m) is reused
    conn.files.close()


def test_shared_files_survive_workers_killed_mid_call(start_daemon: Callable[..., Daemon]) -> None:
    """Pipelined 1 MB calls from three clients while busy workers are SIGKILLed: every call gets
    its own right answer or WorkerCrashed, and afterwards no shared file is left open in the
    supervisor (held calls requeued after a kill were sent again with their files)."""
    from support.invariants import BusyKiller

    d = start_daemon({"pools": {"default": pool_config(min=2, cruise=2, max=2, queue_size=128, prefetch=4)}})
    sup = d.proc.pid  # type: ignore[union-attr]  # proc is set while the daemon runs
    arr = np.random.rand(1 << 17)
    outcomes: dict[str, int] = {"ok": 0, "crashed": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        s = d.session()
        futs = [(i, s.submit(lambda a, m: a[:4] * m, arr, k * 1000 + i)) for i in range(40)]
        for i, f in futs:
            try:
                np.testing.assert_array_equal(f.result(60), arr[:4] * (k * 1000 + i))
                key = "ok"
            except cruised.WorkerCrashed:
                key = "crashed"
            with lock:
                outcomes[key] += 1
        s.close()

    killer = BusyKiller(d.status, every=0.02, seed=7, limit=6)
    killer.start()
    try:
        errors = in_threads(client, 3, timeout=120)
    finally:
        kills = killer.stop()
    assert not errors, errors
    assert kills >= 1, "the scenario needs workers killed mid-call"
    assert outcomes["ok"] + outcomes["crashed"] == 120 and outcomes["crashed"] <= kills, (outcomes, kills)
    wait_for(lambda: memfds(sup) == 0, what="the supervisor holding no shared file")
