"""The supervisor's framed channel: what a peer sent before it went away is never lost."""

from __future__ import annotations

import asyncio
import socket

from cruised.channel import Channel
from cruised.pool import frames
from cruised.pool.frames import Kind


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
        before = len(channel._buf)
        theirs.close()
        channel.drain()  # reads the end of the stream: closes
        return before, len(channel._buf)

    before, after = asyncio.run(scenario())
    assert before > 0 and after == 0
