"""Unit tests for the hot-path internals tuned in issue 6: the worker's buffered
channel, bundle fast paths, and the client's small-request send."""

from __future__ import annotations

import os
import pickle
import socket
import threading

import numpy as np
import pytest

from cruised.client import session as client
from cruised.pool import worker
from cruised.pool.wire import bundle, frames


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    return a, b


#: always readable: what the worker channel's poll() waits on for a Trickle, whose data is always there
_READABLE = os.open(os.devnull, os.O_RDONLY)


class Trickle:
    """A socket stand-in whose recv_into returns at most ``step`` bytes: frames arrive in pieces."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def setsockopt(self, *_: object) -> None:
        pass  # buffer sizing (pool/wire/sockopt.py) has nothing to size here

    def fileno(self) -> int:
        return _READABLE

    def recv_into(self, view: memoryview) -> int:
        n = min(self.step, view.nbytes, len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def recvmsg_into(self, buffers: list[memoryview], ancbufsize: int = 0) -> tuple[int, list[object], int, None]:
        return self.recv_into(buffers[0]), [], 0, None


FRAMES = [frames.frame(frames.Kind.CALL, i, bytes(range(256)) * n) for i, n in enumerate([0, 1, 5, 1100, 3, 0, 2000, 1])]


@pytest.mark.parametrize("step", [1, 7, 16, 4096, 1 << 20])
def test_worker_channel_reassembles_frames_whatever_the_read_sizes(step: int) -> None:
    ch = worker.Channel(Trickle(b"".join(FRAMES), step), 1 << 30)  # type: ignore[arg-type]  # Trickle stands in for the socket
    got = []
    while (f := ch.read()) is not None:
        got.append(bytes(f))
    assert got == FRAMES


def test_worker_channel_small_buffer_forces_big_frame_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "RECV_SIZE", 1000)  # frames of 280 KB must take the own-buffer path
    ch = worker.Channel(Trickle(b"".join(FRAMES), 333), 1 << 30)  # type: ignore[arg-type]  # Trickle stands in for the socket
    got = []
    while (f := ch.read()) is not None:
        got.append(bytes(f))
    assert got == FRAMES


def test_worker_channel_frames_are_independent_of_the_buffer() -> None:
    ch = worker.Channel(Trickle(b"".join(FRAMES[:3]), 1 << 20), 1 << 30)  # type: ignore[arg-type]  # Trickle stands in for the socket
    first = ch.read()
    snapshot = bytes(first)  # type: ignore[arg-type]  # read() gave a frame here, not None (end of stream)
    ch.read()
    ch.read()
    assert bytes(first) == snapshot  # type: ignore[arg-type]  # read() gave a frame here, not None (end of stream)


def test_worker_channel_eof_mid_frame_and_oversized_frame() -> None:
    ch = worker.Channel(Trickle(FRAMES[3][:-5], 100), 1 << 30)  # type: ignore[arg-type]  # Trickle stands in for the socket
    assert ch.read() is None
    ch = worker.Channel(Trickle(FRAMES[3], 100), 1000)  # type: ignore[arg-type]  # Trickle stands in for the socket
    with pytest.raises(frames.FrameError, match="exceeds the limit"):
        ch.read()


def test_worker_reply_small_and_large_round_trip() -> None:
    a, b = _pair()
    tx, rx = worker.Channel(b, 1 << 30), worker.Channel(a, 1 << 30)
    arr = np.arange(300_000.0)  # 2.4 MB: the scatter-list path, larger than the socket buffer
    got: list[bytearray | None] = []
    reader = threading.Thread(target=lambda: got.extend(rx.read() for _ in range(3)))
    reader.start()
    tx.reply(7, frames.Status.OK, [b"ab", memoryview(b"cd")])
    tx.reply(8, frames.Status.ERROR, [])
    tx.reply(9, frames.Status.OK, bundle.pack(arr))
    reader.join(10)
    assert bytes(got[0]) == frames.frame(frames.Kind.REPLY, 7, b"abcd", frames.Status.OK)  # type: ignore[arg-type]  # read() gave a frame here, not None (end of stream)
    assert bytes(got[1]) == frames.frame(frames.Kind.REPLY, 8, b"", frames.Status.ERROR)  # type: ignore[arg-type]  # read() gave a frame here, not None (end of stream)
    assert np.array_equal(bundle.unpack(got[2], frames.HEADER_SIZE), arr)  # type: ignore[arg-type]  # read() gave a frame here, not None (end of stream)
    a.close()
    b.close()


@pytest.mark.parametrize(
    "obj",
    [1, ((1,), {"k": "v"}), b"x" * 1000, np.arange(10.0), [np.arange(3), np.ones((2, 2))], None],
)
def test_bundle_round_trip_and_truncation(obj: object) -> None:
    parts = bundle.pack(obj)
    blob = b"".join(bytes(p) for p in parts)
    assert bundle.packed_size(parts) == len(blob)
    back = bundle.unpack(bytearray(b"pad" + blob), 3)
    if isinstance(obj, list):
        assert len(back) == len(obj) and all(np.array_equal(x, y) for x, y in zip(obj, back, strict=True))
    elif isinstance(obj, np.ndarray):
        assert np.array_equal(obj, back)
    else:
        assert back == obj
    for cut in (0, 1, 9, len(blob) - 1):
        with pytest.raises((ValueError, pickle.UnpicklingError, EOFError)):
            bundle.unpack(blob[:cut])


def test_bundle_without_buffers_has_the_short_index() -> None:
    parts = bundle.pack((1, 2))
    assert len(parts) == 2 and bytes(parts[0])[:2] == b"\0\0"


@pytest.mark.parametrize("size", [10, client.SMALL_SEND, client.SMALL_SEND + 1, 3 << 20])
def test_client_sendall_delivers_every_byte(size: int) -> None:
    a, b = _pair()
    parts = [frames.header(frames.Kind.CALL, 1, size), memoryview(np.full(size // 8 + 1, 7, dtype="int64")).cast("B")[:size]]
    expect = b"".join(bytes(p) for p in parts)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(expect):
            chunk = b.recv(1 << 20)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    client._sendall(a, parts)
    reader.join(10)
    assert bytes(got) == expect
    a.close()
    b.close()


def test_client_a_reply_cut_off_mid_frame_fails_the_connection_with_a_clear_error() -> None:
    """A daemon that dies half-way through a large reply: the call raises DaemonUnavailable (not a
    bare ConnectionResetError), and the connection is marked broken, so the next call reconnects."""
    import cruised

    path = f"/tmp/cr-midframe-{os.getpid()}.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def half_a_reply() -> None:
        conn, _ = server.accept()
        with conn:
            request = conn.recv(frames.HEADER_SIZE)
            reqid = frames.HEADER.unpack(request)[4]
            # a reply announced larger than the client's read buffer (its big-frame path), cut short
            conn.sendall(frames.header(frames.Kind.REPLY, reqid, 4 * client.RECV_SIZE) + b"x" * 1000)

    t = threading.Thread(target=half_a_reply, daemon=True)
    t.start()
    try:
        s = client.Session(socket=path)
        with pytest.raises(cruised.DaemonUnavailable, match="lost in the middle of a reply"):
            s.ping()
        assert s._conn is not None and s._conn.broken is not None, "the connection is known broken"
        t.join(10)
    finally:
        server.close()
        os.unlink(path)
