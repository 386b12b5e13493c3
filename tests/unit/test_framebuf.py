"""The one frame reader of the client, the supervisor and the worker (pool/wire/framebuf.py)."""

from __future__ import annotations

import random

import pytest

from cruised.pool.wire import frames
from cruised.pool.wire.framebuf import FrameBuffer
from cruised.pool.wire.frames import Kind, Status

SIZE = 1000  # the buffer: the frames below are smaller, about as large, and far larger


def _stream(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for i in range(60):
        n = rng.choice([0, 1, 15, 16, 200, SIZE - 16, SIZE - 15, SIZE, 3 * SIZE, 40_000])
        out.append(frames.frame(rng.choice([Kind.CALL, Kind.REPLY]), i + 1, bytes(rng.getrandbits(8) for _ in range(n)), rng.choice([0, Status.ERROR])))
    return out


def _feed(fb: FrameBuffer, data: bytes, pieces: random.Random) -> list[tuple[bytes, int, int, int]]:
    """Receive ``data`` in pieces of random sizes, as a reader would; every frame with its header."""
    got = []
    pos = 0
    while pos < len(data):
        view = fb.space()
        assert view.nbytes > 0, "an empty view would read as EOF"
        n = min(view.nbytes, pieces.randint(1, 3 * SIZE), len(data) - pos)
        view[:n] = data[pos : pos + n]
        pos += n
        while (f := fb.next(n)) is not None:
            n = 0
            got.append((bytes(f), *fb.header[2:]))
    return got


@pytest.mark.parametrize("seed", range(8))
def test_frames_come_out_whole_and_in_order_whatever_the_read_sizes(seed: int) -> None:
    sent = _stream(seed)
    fb = FrameBuffer(SIZE, 1 << 20)
    got = _feed(fb, b"".join(sent), random.Random(seed))
    assert [g[0] for g in got] == sent
    assert [g[1:] for g in got] == [frames.parse_header(f, 1 << 20)[1:] for f in sent]
    assert fb.held() == 0 and fb.start == fb.end == 0


def test_a_frame_that_does_not_fit_behind_what_is_held_is_read_into_its_own_buffer() -> None:
    fb = FrameBuffer(SIZE, 1 << 20)
    small = frames.frame(Kind.REPLY, 1, b"s" * 500)
    medium = frames.frame(Kind.REPLY, 2, b"m" * 700)  # fits the buffer, not behind the small one
    after = frames.frame(Kind.REPLY, 3, b"a")
    data = small + medium + after
    view = fb.space()
    view[:600] = data[:600]  # the small frame and the medium one's first 84 bytes
    assert bytes(fb.next(600) or b"") == small
    assert fb.next() is None and fb.big is not None and fb.held() == 84
    rest = fb.space()
    assert rest.nbytes == len(medium) - 84, "exactly the frame's missing bytes: nothing behind it lands there"
    rest[:] = data[600 : 516 + len(medium)]
    got = fb.next(rest.nbytes)
    assert got is not None and bytes(got) == medium and fb.header[4] == 2
    assert fb.big is None and fb.space().nbytes == SIZE, "the buffer is whole again for what follows"


def test_a_frame_that_fits_is_completed_in_place_and_copied_out() -> None:
    fb = FrameBuffer(SIZE, 1 << 20)
    f = frames.frame(Kind.CALL, 9, bytes(range(256)) * 2)
    fb.space()[:100] = f[:100]
    assert fb.next(100) is None and fb.big is None and fb.held() == 100
    fb.space()[: len(f) - 100] = f[100:]
    got = fb.next(len(f) - 100)
    assert got is not None and bytes(got) == f
    fb.space()[:4] = b"XXXX"  # the buffer is reused: the frame handed out must not change with it
    assert bytes(got) == f


def test_only_a_partial_header_is_moved_to_make_room() -> None:
    fb = FrameBuffer(SIZE, 1 << 20)
    first = frames.frame(Kind.REPLY, 1, b"x" * (SIZE - 16 - 10))  # leaves 10 bytes at the end
    second = frames.frame(Kind.REPLY, 2, b"y")
    fb.space()[:SIZE] = (first + second)[:SIZE]
    assert bytes(fb.next(SIZE) or b"") == first
    assert fb.next() is None and fb.held() == 10  # less than a header: nothing to check yet
    view = fb.space()
    assert fb.start == 0 and fb.end == 10 and view.nbytes == SIZE - 10
    view[: len(second) - 10] = second[10:]
    assert bytes(fb.next(len(second) - 10) or b"") == second


def test_space_makes_room_for_a_reader_reentered_with_frames_left() -> None:
    """A handler that reads the same stream again (the supervisor drains a channel it is delivering
    from) asks for space with whole frames still held: they move, and come out next, in order."""
    fb = FrameBuffer(64, 1 << 20)
    f1, f2, f3 = (frames.frame(Kind.PING, i, b"p" * 16) for i in (1, 2, 3))
    fb.space()[:64] = f1 + f2
    assert bytes(fb.next(64) or b"") == f1  # f2 is left whole, and the buffer is full
    view = fb.space()
    assert view.nbytes == 32 and fb.start == 0
    view[:32] = f3
    assert bytes(fb.next(32) or b"") == f2
    assert bytes(fb.next() or b"") == f3


def test_space_refuses_a_buffer_full_of_frames_nobody_took() -> None:
    fb = FrameBuffer(64, 1 << 20)
    fb.space()[:64] = frames.frame(Kind.PING, 1, b"p" * 16) * 2
    fb.end = 64  # received, but a reader that misuses the buffer never asked next() to cut them
    with pytest.raises(RuntimeError, match="full of frames"):
        fb.space()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({4: 9}, "version 9"),
        ({0: 3, 1: 0, 2: 0, 3: 0}, "shorter than a header"),
        ({0: 0xFF, 1: 0xFF, 2: 0, 3: 0}, "exceeds the limit of 4096 bytes"),
    ],
)
def test_a_bad_header_is_refused_with_its_request_id(patch: dict[int, int], message: str) -> None:
    raw = bytearray(frames.frame(Kind.CALL, 77, b"z" * 100))
    for i, b in patch.items():
        raw[i] = b
    fb = FrameBuffer(SIZE, 4096)
    fb.space()[: len(raw)] = raw
    with pytest.raises(frames.FrameError, match=message) as info:
        fb.next(len(raw))
    assert info.value.reqid == 77


def test_an_oversized_frame_is_refused_before_its_payload_is_buffered() -> None:
    fb = FrameBuffer(SIZE, 4096)
    fb.space()[:16] = frames.header(Kind.CALL, 5, 10_000)
    with pytest.raises(frames.FrameError, match="exceeds the limit"):
        fb.next(16)
    assert fb.big is None


def test_release_drops_the_buffer_and_what_it_held() -> None:
    fb = FrameBuffer(256 << 10, 1 << 20)
    fb.space()[:16] = frames.header(Kind.CALL, 5, 1 << 19)  # a big frame begun
    assert fb.next(16) is None and fb.big is not None
    fb.release()
    assert fb.big is None and fb.held() == 0 and len(fb.buf) <= frames.HEADER_SIZE
