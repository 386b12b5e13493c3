"""The supervisor's framed channel: what a peer sent before it went away is never lost."""

from __future__ import annotations

import asyncio
import itertools
import socket

from cruised.core.channel import Channel
from cruised.pool.wire import frames
from cruised.pool.wire.frames import Kind


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_frame(self, channel: Channel, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        self.events.append(("frame", reqid))

    def on_peer_gone(self, channel: Channel) -> None:
        self.events.append(("gone", 0))

    def on_close(self, channel: Channel, error: BaseException | None) -> None:
        self.events.append(("close", 0))


def test_a_failed_write_delivers_what_the_peer_sent_before_closing() -> None:
    """A worker replies, then dies before we read the reply; our next write fails (EPIPE).
    The reply is still in our receive queue and must reach the dispatcher (holding depends on it)."""

    async def scenario() -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sink = Recorder()
        channel = Channel(loop, ours, sink, 1 << 20, name="t")
        # no await until the end: the loop never gets to read the channel, so the write is what notices
        theirs.sendall(frames.frame(Kind.REPLY, 7) + frames.frame(Kind.REPLY, 8))
        theirs.close()  # the peer is gone
        channel.write([frames.frame(Kind.CALL, 9)])
        channel._flush()
        assert channel.closed
        return sink.events

    events = asyncio.run(scenario())
    assert events == [("gone", 0), ("frame", 7), ("frame", 8), ("close", 0)]


def test_a_closed_channel_lets_go_of_its_receive_buffer() -> None:
    """A channel and its sink form a cycle (a worker's also through its Worker), so a closed one can
    live until a full collection; its 256 KiB buffer must not live that long (soak RSS growth)."""

    async def scenario() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channel = Channel(loop, ours, Recorder(), 1 << 20, name="t")
        before = len(channel.incoming.buf)
        theirs.close()
        channel.drain()  # reads the end of the stream: closes
        return before, len(channel.incoming.buf)

    before, after = asyncio.run(scenario())
    assert before >= 256 << 10 and after <= frames.HEADER_SIZE


class Forwarder:
    """A sink that writes each frame it gets to ``out`` and notes whether the peer could already
    read it before ``on_frame`` returned (what a client waiting for its reply sees)."""

    def __init__(self, out: Channel, peer: socket.socket) -> None:
        self.out, self.peer = out, peer
        self.seen_at_return: list[bytes] = []
        self.closed_inside = False

    def on_frame(self, channel: Channel, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        self.out.write([bytes(buf)])
        self.closed_inside |= self.out.closed
        try:
            self.seen_at_return.append(self.peer.recv(1 << 16, socket.MSG_DONTWAIT))
        except BlockingIOError:
            self.seen_at_return.append(b"")

    def on_close(self, channel: Channel, error: BaseException | None) -> None:
        pass


def _forwarding(frames_in: list[bytes], peer_gone: bool = False) -> tuple[Forwarder, bool]:
    """Frames sent to channel A in one write; A's sink forwards each to channel B."""

    async def scenario() -> tuple[Forwarder, bool]:
        loop = asyncio.get_running_loop()
        a_ours, a_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b_ours, b_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out = Channel(loop, b_ours, Recorder(), 1 << 20, name="b")
        sink = Forwarder(out, b_theirs)
        Channel(loop, a_ours, sink, 1 << 20, name="a")
        if peer_gone:
            b_theirs.shutdown(socket.SHUT_RD)  # B's writes now fail with EPIPE
        a_theirs.sendall(b"".join(frames_in))
        deadline = loop.time() + 5
        while len(sink.seen_at_return) < len(frames_in) and loop.time() < deadline:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0)  # the read's batch flush has run
        return sink, out.closed

    return asyncio.run(scenario())


def test_the_last_frame_of_a_read_is_answered_before_its_handler_returns() -> None:
    """A lone call's reply goes out while the dispatcher still does its bookkeeping (WriteBatch.eager)."""
    sink, _ = _forwarding([frames.frame(Kind.REPLY, 1, b"x")])
    assert sink.seen_at_return == [frames.frame(Kind.REPLY, 1, b"x")]


def test_frames_read_together_are_answered_with_one_send() -> None:
    """Pipelined frames: the writes of all but the last wait, and go out with the last one's."""
    f1, f2, f3 = (frames.frame(Kind.REPLY, i, b"y") for i in (1, 2, 3))
    sink, _ = _forwarding([f1, f2, f3])
    assert sink.seen_at_return == [b"", b"", f1 + f2 + f3]


def test_an_eager_write_to_a_gone_peer_closes_only_after_the_handler() -> None:
    """The send error of an eager write is left to the batch's flush: the channel is not closed
    under a sink that is still running (the dispatcher is not re-entered mid-update)."""
    sink, closed = _forwarding([frames.frame(Kind.REPLY, 1)], peer_gone=True)
    assert sink.closed_inside is False
    assert closed is True


class Frames:
    def __init__(self) -> None:
        self.got: list[tuple[bytes, int, int, int]] = []

    def on_frame(self, channel: Channel, buf: bytearray, kind: int, status: int, reqid: int) -> None:
        self.got.append((bytes(buf), kind, status, reqid))

    def on_close(self, channel: Channel, error: BaseException | None) -> None:
        pass


def test_frames_sent_in_pieces_arrive_whole_and_a_partial_one_is_timed() -> None:
    """Small, buffer-sized and far larger frames, cut anywhere: each reaches the sink whole with its
    header, and ``partial_since`` (daemon.read_timeout) runs exactly while a frame is incomplete."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sink = Frames()
        channel = Channel(loop, ours, sink, 8 << 20, name="t")
        sizes = [0, 100, (256 << 10) - 16, 256 << 10, 3 << 20, 50, 1]
        sent = [frames.frame(Kind.CALL if i % 2 else Kind.REPLY, i + 1, bytes([i]) * n, i) for i, n in enumerate(sizes)]
        stream = b"".join(sent)
        # pieces of at most 100 kB: the peer's socket takes each whole before the channel reads
        cuts = sorted({0, 7, 16, 130, 131, *range(200_000, len(stream) - 20, 100_000), len(stream) - 20, len(stream)})
        for a, b in itertools.pairwise(cuts):
            theirs.sendall(stream[a:b])
            channel.drain()
            whole = sum(len(f) for f in sent[: len(sink.got)])
            assert whole <= b and (channel.partial_since is None) == (whole == b), (a, b)
        assert [g[0] for g in sink.got] == sent
        assert [g[1:] for g in sink.got] == [frames.parse_header(f, 8 << 20)[1:] for f in sent]
        channel.close()
        theirs.close()

    asyncio.run(scenario())
