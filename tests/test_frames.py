"""The frame codec between the server and its store process: round trips, splits, limits."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenpool._store.frames import FrameDecoder, FrameError, encode

# What crosses the link: tuples of ints, strings, lists and dicts of them.
scalars = st.one_of(st.none(), st.integers(), st.text(max_size=20), st.booleans())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=8), inner, max_size=4),
    ),
    max_leaves=20,
)
messages = st.lists(st.tuples(st.text(max_size=8), values), max_size=6)

SAMPLE = [
    ("write", 1, 7, [[(1, 2, 3, "alice", 4, 5, 6, 7)]], {"activations": 1}, 123),
    ("ack", 1, 7, 1),
    ("reply", 3, None),
]


@given(messages)
def test_a_whole_stream_decodes_to_what_was_encoded(sent: list[tuple[str, object]]) -> None:
    assert sent == FrameDecoder().feed(encode(sent))


def test_every_split_of_a_stream_decodes_the_same() -> None:
    data = encode(SAMPLE)
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert (SAMPLE, 0) == (got, decoder.buffered)


def test_a_stream_fed_byte_by_byte_decodes_the_same() -> None:
    data = encode(SAMPLE)
    decoder = FrameDecoder()
    got = []
    for i in range(len(data)):
        got += decoder.feed(data[i : i + 1])
    assert SAMPLE == got


@given(messages, st.data())
def test_arbitrary_splits_decode_the_same(
    sent: list[tuple[str, object]], data: st.DataObject
) -> None:
    stream = encode(sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = FrameDecoder()
    got = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += decoder.feed(stream[start:end])
    assert sent == got


def test_an_incomplete_frame_is_kept_until_the_rest_arrives() -> None:
    data = encode([("ack", 1, 2, 3)])
    decoder = FrameDecoder()
    assert ([], len(data) - 1) == (decoder.feed(data[:-1]), decoder.buffered)
    assert [("ack", 1, 2, 3)] == decoder.feed(data[-1:])


def test_a_frame_larger_than_the_limit_is_refused_before_it_is_buffered() -> None:
    decoder = FrameDecoder(max_frame=1000)
    with pytest.raises(FrameError, match="1001 bytes is larger than the limit of 1000"):
        decoder.feed(struct.pack(">I", 1001))


def test_the_default_limit_refuses_a_corrupt_length() -> None:
    with pytest.raises(FrameError, match="larger than the limit"):
        FrameDecoder().feed(b"\xff\xff\xff\xff" + b"x" * 10)
