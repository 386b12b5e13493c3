"""The wire format and bundles, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from cruised.pool.wire import bundle, frames, rawbuf
from cruised.pool.wire.frames import Kind, Status


def test_header_layout_is_little_endian_and_counts_after_the_size_field() -> None:
    raw = frames.frame(Kind.CALL, 0x0102030405060708, b"abc", Status.OK)
    assert raw[:4] == (12 + 3).to_bytes(4, "little")
    assert raw[4] == frames.VERSION and raw[5] == Kind.CALL
    assert raw[8:16] == (0x0102030405060708).to_bytes(8, "little")
    assert frames.parse_header(raw, 1 << 20) == (len(raw), Kind.CALL, 0, 0x0102030405060708)


def test_oversize_frame_is_refused_with_its_reqid() -> None:
    raw = frames.header(Kind.CALL, 77, 10_000)
    with pytest.raises(frames.FrameError) as info:
        frames.parse_header(raw, 4096)
    assert info.value.reqid == 77 and "max_message_bytes" in str(info.value)


def test_wrong_version_is_refused() -> None:
    raw = bytearray(frames.frame(Kind.PING, 1))
    raw[4] = 9
    with pytest.raises(frames.FrameError, match="version 9"):
        frames.parse_header(raw, 4096)


def test_length_shorter_than_a_header_is_refused() -> None:
    raw = bytearray(frames.frame(Kind.PING, 1))
    raw[0:4] = (3).to_bytes(4, "little")
    with pytest.raises(frames.FrameError, match="shorter than a header"):
        frames.parse_header(raw, 4096)


def test_call_head_round_trip_and_reqid_patch() -> None:
    key = bytes(range(16))
    buf = bytearray(frames.frame(Kind.CALL, 5, frames.call_head("pool-ä", 1500, key) + b"ARGS"))
    pool, timeout_ms, k, off = frames.parse_call(buf)
    assert (pool, timeout_ms, k, bytes(buf[off:])) == ("pool-ä", 1500, key, b"ARGS")
    assert frames.call_key(buf) == (key, off)  # the worker's shortcut agrees
    frames.set_reqid(buf, 99)
    assert frames.parse_header(buf, 1 << 20)[3] == 99


def test_truncated_call_is_a_frame_error() -> None:
    buf = bytearray(frames.frame(Kind.CALL, 5, frames.pack_name("p") + b"\x01"))
    with pytest.raises(frames.FrameError):
        frames.parse_call(buf)
    for short in (buf, bytearray(frames.frame(Kind.CALL, 5))):  # a key cut short; no name at all
        with pytest.raises(frames.FrameError):
            frames.call_key(short)


def test_register_round_trip() -> None:
    key = b"k" * 16
    buf = bytearray(frames.frame(Kind.REGISTER, 1, frames.register_head("default", key, b'{"python": "3.11"}') + b"CODE"))
    pool, k, meta, off = frames.parse_register(buf)
    assert (pool, k, meta, bytes(buf[off:])) == ("default", key, b'{"python": "3.11"}', b"CODE")


def test_bundle_round_trip_keeps_arrays_out_of_band() -> None:
    arr = np.arange(100_000, dtype=np.float64)
    parts = bundle.pack(({"a": arr, "s": "x"}, 3))
    assert any(isinstance(p, memoryview) and p.nbytes == arr.nbytes for p in parts), "array must travel out of band"
    flat = bytearray(b"".join(bytes(p) for p in parts))
    obj, n = bundle.unpack(flat)
    assert n == 3 and obj["s"] == "x"
    np.testing.assert_array_equal(obj["a"], arr)
    # zero-copy: the array views the received buffer
    assert np.shares_memory(obj["a"], np.frombuffer(flat, dtype=np.uint8))


def test_bundle_pickles_lambdas_by_value() -> None:
    k = 3
    parts = bundle.pack(lambda x: x + k)
    fn = bundle.unpack(b"".join(bytes(p) for p in parts))
    assert fn(1) == 4


def test_truncated_bundle_is_a_value_error() -> None:
    parts = bundle.pack(list(range(100)))
    flat = b"".join(bytes(p) for p in parts)
    with pytest.raises(ValueError, match="truncated"):
        bundle.unpack(flat[:-5])


@pytest.mark.parametrize("n", [0, 1, 4096, 3 << 20])
def test_uninitialized_buffers_have_the_asked_size_and_keep_what_is_written(n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for api in (rawbuf._from_string_and_size, None):  # the C API, and the plain-bytearray fallback
        monkeypatch.setattr(rawbuf, "_from_string_and_size", api)
        a, b = rawbuf.uninitialized(n), rawbuf.uninitialized(n)
        assert type(a) is bytearray and len(a) == n and a is not b
        pattern = bytes(range(256)) * (n // 256 + 1)
        memoryview(a)[:] = pattern[:n]
        b[:] = bytes(n)
        assert a == pattern[:n] and b == bytes(n)  # separate memory: writing one leaves the other alone


def test_kinds_and_statuses_are_plain_ints_with_names() -> None:
    assert type(Kind.CALL) is int and type(Status.NOT_RUN) is int
    assert Kind.name(Kind.RELOAD) == "RELOAD" and Status.name(2) == "QUEUE_FULL"
    assert Kind.name(200) == "200", "a kind this side does not know is printed as its number"
    assert list(Status) == list(range(22)) and len(set(Kind)) == 19
    # read from the instance's own __dict__ (specialised attribute reads), not through its class
    assert vars(Kind)["CALL"] == 1 and vars(Status)["OK"] == 0


def test_constants_refuse_two_names_for_one_value() -> None:
    class Twice(frames.Constants):
        A = 1
        B = 1

    with pytest.raises(ValueError, match="B and A are both 1"):
        Twice()


def test_the_protocol_docstring_has_a_row_for_every_kind_and_status() -> None:
    """pool/wire/frames.py is where the protocol is documented: each constant once, with its value."""
    doc = frames.__doc__ or ""
    rows = [line.split("  ")[0] for line in doc.splitlines() if line[:1].isupper()]
    for consts in (Kind, Status):
        for value in consts:
            row = f"{consts.name(value)} ({value})"
            assert rows.count(row) == 1, f"{row}: {rows.count(row)} rows in the frames docstring"
    endpoint_table = doc[doc.index("Endpoint calls") :]
    assert endpoint_table.rstrip().endswith("=" * 51), "the endpoint replies table is cut off"
