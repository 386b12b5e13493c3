"""pool/nesting.py: the nesting depth of JSON text and kdb+ IPC messages, measured without recursing.

The JSON measure is checked against the depth of the decoded value, the q walk
against pykx's own serializer (every object it writes is read to its exact end)
and against hand-built messages nested far deeper than pykx could survive.
"""

from __future__ import annotations

import json
import struct
import time
import uuid
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cruised.pool import nesting
from support.qraw import kx

# -- JSON ---------------------------------------------------------------------------------


def depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    return 0


# strings full of what could fool a bracket count: brackets, quotes, backslashes
tricky_text = st.text(alphabet='[]{}"\\ab\u00e9\u2028', max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=40,
)


@given(json_values, st.integers(min_value=0, max_value=6), st.booleans())
@settings(max_examples=400, deadline=None)
def test_json_depth_is_exact_whatever_the_strings_hold(value: Any, limit: int, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    assert nesting.json_depth_exceeds(text, limit) == (depth(value) > limit), text


def test_json_at_the_limit_passes_one_deeper_does_not() -> None:
    limit = nesting.MAX_DEPTH
    at = '{"a": ' + "[" * (limit - 1) + "]" * (limit - 1) + "}"
    assert depth(json.loads(at)) == limit
    assert not nesting.json_depth_exceeds(at)
    assert nesting.json_depth_exceeds('{"a": ' + "[" * limit + "]" * limit + "}")


def test_json_a_hundred_thousand_levels_is_measured_quickly_and_brackets_in_strings_never_count() -> None:
    deep = '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    started = time.monotonic()
    assert nesting.json_depth_exceeds(deep)
    assert time.monotonic() - started < 5, "linear, in C-level string operations"
    assert not nesting.json_depth_exceeds(json.dumps({"a": "[" * 100_000, "b": ['\\"[[[' * 1000]}))
    # many containers side by side, none deep: past the opener count, then measured
    wide = json.dumps({"rows": [{"x": [i, {"y": [i]}]} for i in range(1000)]})
    assert not nesting.json_depth_exceeds(wide)


# -- kdb+ IPC -----------------------------------------------------------------------------


def message(k: Any) -> bytes:
    return bytes(kx.serialize(k, mode=6, wait=1).copy())


def general(*items: Any) -> Any:
    """A q general list of these items, whatever their types (toq alone may make a vector)."""
    return kx.toq([kx.toq(x) if not isinstance(x, kx.K) else x for x in items])


SAMPLES = [
    1,
    2.5,
    True,
    "text",
    b"bytes",
    kx.SymbolAtom("sym"),
    kx.toq(np.array(["a", "bb", "ccc"] * 40, dtype=object)),  # a symbol vector: NULs counted a block at a time
    np.arange(1000, dtype=np.int64),
    np.arange(5, dtype=np.int16),
    np.arange(5, dtype=np.int32),
    np.linspace(0, 1, 7),
    np.linspace(0, 1, 7).astype(np.float32),
    np.array([True, False]),
    np.array([1, 2], dtype=np.uint8),
    np.array(["2024-01-02T03:04:05.123456789"], dtype="datetime64[ns]"),
    np.array(["2024-01-02"], dtype="datetime64[D]"),
    np.array([1, 2], dtype="timedelta64[ns]"),
    uuid.UUID(int=12345),
    kx.toq([uuid.UUID(int=1), uuid.UUID(int=2)]),
    {"a": 1, "b": [1.5, "x"]},
    pd.DataFrame({"sym": ["a", "b"], "px": [1.0, 2.0], "n": [1, 2]}),
    pd.DataFrame({"k": ["a", "b"], "v": [1, 2]}).set_index("k"),  # a keyed table
    [[1, "a"], [2.0, [b"x", None]]],
    None,
]


@pytest.mark.parametrize("obj", SAMPLES, ids=lambda o: type(o).__name__)
def test_q_walk_reads_what_pykx_writes_to_its_exact_end(obj: Any) -> None:
    msg = message(general(obj, kx.toq("after", strings_as_char=True), obj))
    offsets = nesting.q_item_offsets(msg)
    assert offsets is not None and len(offsets) == 4
    assert offsets[-1] == len(msg), "every object skipped by its true size"
    # the middle item starts where the walk says: a char vector "after"
    assert msg[offsets[1]] == 10 and msg[offsets[1] + 6 : offsets[2]] == b"after"


def nested_list(levels: int, little: bool = True) -> bytes:
    """An IPC message holding a general list nested ``levels`` deep around one long atom, built
    by hand (pykx's own toq would recurse, and its deserializer overflows its stack near 10^5)."""
    i32 = "<i" if little else ">i"
    body = (b"\x00\x00" + struct.pack(i32, 1)) * levels + b"\xf9" + struct.pack("<q" if little else ">q", 7)
    return bytes([1 if little else 0, 1, 0, 0]) + struct.pack("<I" if little else ">I", 8 + len(body)) + body


@pytest.mark.parametrize("little", [True, False])
def test_q_depth_is_exact_at_the_limit(little: bool) -> None:
    assert not nesting.q_depth_exceeds(nested_list(nesting.MAX_DEPTH, little))
    assert nesting.q_depth_exceeds(nested_list(nesting.MAX_DEPTH + 1, little))
    assert kx.deserialize(nested_list(300)) is not None, "such messages are valid q: the limit is ours"


def q_tree() -> st.SearchStrategy[tuple[bytes, int]]:
    """(the bytes of a q object, its depth): atoms, vectors, general lists and dictionaries."""
    leaves = st.one_of(
        st.integers(-(2**63) + 1, 2**63 - 1).map(lambda i: (b"\xf9" + struct.pack("<q", i), 0)),
        st.floats(allow_nan=False).map(lambda f: (b"\xf7" + struct.pack("<d", f), 0)),
        st.text("ab[]\x01", max_size=4).map(lambda t: (b"\xf5" + t.encode() + b"\x00", 0)),  # a symbol atom
        st.lists(st.text("xy", max_size=3), max_size=40).map(
            lambda syms: (b"\x0b\x00" + struct.pack("<i", len(syms)) + b"".join(x.encode() + b"\x00" for x in syms), 0)
        ),
        st.binary(max_size=8).map(lambda b: (b"\x04\x00" + struct.pack("<i", len(b)) + b, 0)),  # a byte vector
    )

    def containers(inner: st.SearchStrategy[tuple[bytes, int]]) -> st.SearchStrategy[tuple[bytes, int]]:
        general_list = st.lists(inner, max_size=5).map(
            lambda items: (b"\x00\x00" + struct.pack("<i", len(items)) + b"".join(b for b, _ in items), 1 + max((d for _, d in items), default=0))
        )
        dictionary = st.lists(inner, min_size=1, max_size=4).map(
            lambda items: (
                b"\x63\x0b\x00"
                + struct.pack("<i", len(items))
                + b"".join(b"k%d\x00" % i for i in range(len(items)))
                # keys a symbol vector, values a general list: two levels for the values
                + b"\x00\x00"
                + struct.pack("<i", len(items))
                + b"".join(b for b, _ in items),
                2 + max(d for _, d in items),
            )
        )
        return general_list | dictionary

    return st.recursive(leaves, containers, max_leaves=30)


@given(q_tree(), st.integers(min_value=0, max_value=6))
@settings(max_examples=300, deadline=None)
def test_q_depth_is_exact_for_any_mix_of_objects(tree: tuple[bytes, int], limit: int) -> None:
    body, levels = tree
    msg = bytes([1, 1, 0, 0]) + struct.pack("<I", 8 + len(body)) + body
    kx.deserialize(msg)  # valid q: the walk and q's deserializer read the same objects
    assert nesting.q_depth_exceeds(msg, 0, limit) == (levels > limit)


def test_q_every_container_kind_opens_a_level() -> None:
    table = kx.toq(pd.DataFrame({"a": [1, 2]}))
    cases = {
        "table in a list": (general(table), 1 + 3),  # list, table, its dictionary, its column list
        "dictionary of lists": (kx.toq({"a": general(1, "x")}), 3),  # dict, its values list, the list
        "flat list": (general(1, "x"), 1),
        "vector": (kx.toq(np.arange(3)), 0),
    }
    for name, (k, levels) in cases.items():
        msg = message(k)
        assert not nesting.q_depth_exceeds(msg, 0, levels), name
        assert nesting.q_depth_exceeds(msg, 0, levels - 1) or levels == 0, name


def test_q_a_hundred_thousand_levels_is_measured_without_recursing_and_its_tail_found() -> None:
    deep = nested_list(100_000)
    assert nesting.q_depth_exceeds(deep)
    # the last items of a message too deep to deserialize, e.g. a callback and its id
    inner = deep[8:]
    tail = message(general(kx.SymbolAtom("cb"), 42))[8 + 6 :]
    body = b"\x00\x00" + struct.pack("<i", 4) + b"\xf5ep\x00" + inner + tail  # (`ep; deep; `cb; 42)
    msg = bytes([1, 1, 0, 0]) + struct.pack("<I", 8 + len(body)) + body
    offsets = nesting.q_item_offsets(msg)
    assert offsets is not None and len(offsets) == 5 and offsets[-1] == len(msg)
    assert msg[offsets[2] : offsets[3]] == b"\xf5cb\x00"
    assert msg[offsets[3] : offsets[4]] == b"\xf9" + struct.pack("<q", 42)


def test_q_messages_the_walk_cannot_follow_are_left_to_pykx() -> None:
    # a type q's IPC does not carry, a truncated vector, a negative count: not measured further,
    # and pykx refuses each at the same place (so nothing deeper behind it is ever read)
    for body in (b"\x14\x00" + struct.pack("<i", 1), b"\x07\x00" + struct.pack("<i", 9) + b"\x00" * 8, b"\x00\x00" + struct.pack("<i", -1)):
        msg = bytes([1, 1, 0, 0]) + struct.pack("<I", 8 + len(body)) + body
        assert not nesting.q_depth_exceeds(msg, 0, 0)
        assert nesting.q_item_offsets(msg) is None
        with pytest.raises(kx.QError):
            kx.deserialize(msg)
