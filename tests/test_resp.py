"""The sans-IO RESP codec on its own: round trips, arbitrary splits, hostile bytes, limits."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenpool._resp import (
    NEED_DATA,
    Error,
    ProtocolError,
    RequestParser,
    RespParser,
    Simple,
    encode,
    split_args,
)

args_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40)
commands = st.lists(st.lists(args_text, min_size=1, max_size=8), min_size=1, max_size=10)
words = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc")),
    min_size=1,
    max_size=20,
).filter(
    # '*' starts a RESP array; quotes are Redis quoting (tested on their own below)
    lambda w: w.split() == [w] and not w.startswith("*") and not set(w) & set("\"'")
)
PARSERS = [RespParser, RequestParser]


def as_resp(command: list[str]) -> bytes:
    return encode(command)  # an array of bulk strings is exactly what clients send


def parse_all(parser: RespParser | RequestParser) -> list[list[str]]:
    out = []
    while (command := parser.next_command()) is not NEED_DATA:
        out.append(command)
    return out


def parse_chunks(
    chunks: list[bytes], make: type[RespParser | RequestParser] = RespParser
) -> list[list[str]]:
    parser = make()
    out: list[list[str]] = []
    for chunk in chunks:
        parser.feed(chunk)
        out += parse_all(parser)
    return out


@pytest.mark.parametrize("make", PARSERS)
@given(cmds=commands)
def test_resp_arrays_round_trip(make: type[RespParser], cmds: list[list[str]]) -> None:
    data = b"".join(as_resp(c) for c in cmds)
    assert cmds == parse_chunks([data], make)


@pytest.mark.parametrize("make", PARSERS)
@given(cmds=commands, data=st.data())
def test_any_split_of_the_bytes_gives_the_same_commands(
    make: type[RespParser], cmds: list[list[str]], data: st.DataObject
) -> None:
    raw = b"".join(as_resp(c) for c in cmds)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=20)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert cmds == parse_chunks(chunks, make)


@pytest.mark.parametrize("make", PARSERS)
def test_fed_byte_by_byte(make: type[RespParser]) -> None:
    raw = b"*2\r\n$8\r\nACTIVATE\r\n$3\r\nbob\r\nPING\r\n"
    assert [["ACTIVATE", "bob"], ["PING"]] == parse_chunks(
        [raw[i : i + 1] for i in range(len(raw))], make
    )


@pytest.mark.parametrize("make", PARSERS)
@given(cmds=st.lists(st.lists(words, min_size=1, max_size=5), min_size=1, max_size=5))
def test_inline_commands(make: type[RespParser], cmds: list[list[str]]) -> None:
    raw = b"".join((" ".join(c) + "\r\n").encode() for c in cmds)
    assert cmds == parse_chunks([raw], make)
    assert cmds == parse_chunks([raw.replace(b"\r\n", b"\n")], make)  # nc sends bare LF


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b'ACTIVATE "a b"', [b"ACTIVATE", b"a b"]),
        (b"SET 'it\\'s' x", [b"SET", b"it's", b"x"]),
        (b'ECHO "\\x41\\n\\t\\""', [b"ECHO", b'A\n\t"']),
        (b'a"b c"d e', None),  # a closing quote must end the word
        (b'a"b c" e', [b"ab c", b"e"]),
        (b'""', [b""]),
        (b"   ", []),
    ],
)
def test_inline_quotes_as_redis_parses_them(line: bytes, words: list[bytes] | None) -> None:
    if words is None:
        with pytest.raises(ProtocolError, match="closing quote"):
            split_args(line)
    else:
        assert words == split_args(line)


@pytest.mark.parametrize("line", [b'ACTIVATE "a b', b"ECHO 'x", b'"'])
def test_an_unbalanced_quote_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError, match="unbalanced quotes"):
        parse_chunks([line + b"\r\n"])


def outcome(
    make: type[RespParser | RequestParser], chunks: list[bytes]
) -> tuple[list[list[str]], str | None]:
    parser = make()
    got: list[list[str]] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            got += parse_all(parser)
    except ProtocolError as error:
        return got, str(error)
    return got, None


_pieces = st.one_of(
    commands.map(lambda cmds: b"".join(as_resp(c) for c in cmds)),
    st.lists(words, min_size=1, max_size=3).map(lambda w: (" ".join(w) + "\r\n").encode()),
    st.sampled_from(
        [
            b"*0\r\n",
            b"*-1\r\n",
            b"*1\r\n:5\r\n",
            b"*1\r\n*1\r\n$1\r\na\r\n",
            b"$3\r\nabc\r\n",
            b"*1\r\n$2\r\n\xff\xfe\r\n",
            b"*1\r\n$04\r\nPING\r\n",
            b"*40\r\n",
            b"\r\n",
            b'"x\r\n',
        ]
    ),
    st.binary(max_size=20),
)


@settings(max_examples=500, deadline=None)
@given(pieces=st.lists(_pieces, max_size=6), data=st.data())
def test_the_fast_parser_answers_exactly_as_the_careful_one(
    pieces: list[bytes], data: st.DataObject
) -> None:
    """hiredis is an optimisation: for any bytes, split anyhow, the commands and the
    protocol error are those of the pure parser."""
    raw = b"".join(pieces)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=8)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    assert outcome(RespParser, chunks) == outcome(RequestParser, chunks)


@pytest.mark.parametrize("make", PARSERS)
@settings(max_examples=500)
@given(raw=st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(make: type[RespParser], raw: bytes) -> None:
    parser = make()
    parser.feed(raw)
    with contextlib.suppress(ProtocolError):
        parse_all(parser)


@pytest.mark.parametrize("make", PARSERS)
@settings(max_examples=300)
@given(cmds=commands, garbage=st.binary(min_size=1, max_size=50))
def test_garbage_after_valid_commands_keeps_the_valid_ones(
    make: type[RespParser], cmds: list[list[str]], garbage: bytes
) -> None:
    parser = make()
    parser.feed(b"".join(as_resp(c) for c in cmds) + garbage)
    got: list[list[str]] = []
    try:
        while (command := parser.next_command()) is not NEED_DATA:
            got.append(command)
    except ProtocolError:
        pass
    assert cmds == got[: len(cmds)]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"*3\r\n$3\r\nSET\r\n:1\r\n", "expected '$', got ':'"),
        (b"*1\r\n$abc\r\n", "invalid bulk length"),
        (b"*1\r\n$-3\r\n", "invalid bulk length"),
        (b"*abc\r\n", "invalid multibulk length"),
        (b"*99999999999999999999\r\n", "invalid multibulk length"),
        (b"*1048576\r\n", "too many arguments"),
        (b"*33\r\n", "too many arguments"),
        (b"*1\r\n$70000\r\n", "too big bulk string"),
        (b"*1\r\n$3\r\nabcXY", "not terminated by CRLF"),
        (b"*1\r\n$2\r\n\xff\xfe\r\n", "UTF-8"),
        (b"x" * (64 * 1024 + 1), "too big inline request"),
        (b"*1\r\n$" + b"9" * 40, "too big bulk length"),
        (b"*1\r\n$+5\r\n", "invalid bulk length"),
        (b" ".join([b"a"] * 33) + b"\r\n", "too many arguments"),
    ],
)
@pytest.mark.parametrize("make", PARSERS)
def test_negative_protocol_cases(make: type[RespParser], raw: bytes, message: str) -> None:
    parser = make()
    parser.feed(raw)
    with pytest.raises(ProtocolError, match=re.escape(message)):
        parse_all(parser)


@pytest.mark.parametrize("make", PARSERS)
def test_empty_multibulk_and_empty_lines_are_ignored(make: type[RespParser]) -> None:
    assert [["PING"]] == parse_chunks([b"*0\r\n*-1\r\n\r\n\r\nPING\r\n"], make)


def test_the_fast_parser_keeps_bounded_memory_for_a_huge_announced_bulk() -> None:
    parser = RequestParser()
    parser.feed(b"*1\r\n$1000000000\r\n")
    for _ in range(100):
        parser.feed(b"x" * 1000)
        try:
            assert parser.next_command() is NEED_DATA
        except ProtocolError as error:
            assert "too big bulk string" in str(error)
            return
    raise AssertionError("a bulk string past the limit was buffered")


def test_partial_command_is_remembered_and_buffer_stays_small() -> None:
    parser = RespParser()
    parser.feed(b"*2\r\n$4\r\nPING\r\n")
    assert parser.next_command() is NEED_DATA
    assert parser.in_command
    parser.feed(b"$2\r\nhi\r\n")
    assert ["PING", "hi"] == parser.next_command()
    assert not parser.in_command
    for _ in range(10_000):
        parser.feed(b"*1\r\n$4\r\nPING\r\n")
        parse_all(parser)
    assert parser.buffered < 100


@pytest.mark.parametrize(
    ("value", "proto", "wire"),
    [
        (Simple("OK"), 2, b"+OK\r\n"),
        (Error("NOTHOLDER", "not yours\r\nx"), 2, b"-NOTHOLDER not yours  x\r\n"),
        (42, 2, b":42\r\n"),
        (None, 2, b"$-1\r\n"),
        (None, 3, b"_\r\n"),
        ("héllo", 2, b"$6\r\nh\xc3\xa9llo\r\n"),
        ({"a": 1}, 2, b"*2\r\n$1\r\na\r\n:1\r\n"),
        ({"a": 1}, 3, b"%1\r\n$1\r\na\r\n:1\r\n"),
        ([1, [None]], 3, b"*2\r\n:1\r\n*1\r\n_\r\n"),
        (True, 3, b"#t\r\n"),
        (True, 2, b":1\r\n"),
        (1.5, 3, b",1.5\r\n"),
        (1.5, 2, b"$3\r\n1.5\r\n"),
    ],
)
def test_encode(value: object, proto: int, wire: bytes) -> None:
    assert wire == encode(value, proto)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "payload",
    [b"*3000000000\r\n", b"*1\r\n*999\r\n", b"*2\r\n$1\r\na\r\n*33\r\n", b"PING\r\n*400\r\n"],
)
def test_hiredis_never_sees_a_big_array_header(payload: bytes) -> None:
    """hiredis allocates an announced array at once, and freeing 3e9 empty slots takes
    seconds of the event loop: such headers must go to the careful parser unseen."""
    parser = RequestParser()
    parser.feed(payload)
    with contextlib.suppress(ProtocolError):
        parse_all(parser)
    assert parser._fast is None
