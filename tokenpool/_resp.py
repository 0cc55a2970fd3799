"""A sans-IO codec for the Redis protocol: RESP2/RESP3 requests and replies.

Bytes go in (``RespParser.feed``), complete commands come out
(``RespParser.next_command``: a list of str, or ``NEED_DATA``); reply values go
in (``encode``), bytes come out. No sockets, no trio: the server drives it.

Requests come in both forms Redis accepts: RESP arrays of bulk strings (what
redis-cli, redis-benchmark and every client library send) and inline
commands (one command a line, words separated by spaces, for nc and telnet).

The parser keeps these rules, so a hostile client costs bounded memory:
- an inline line is at most ``max_inline`` bytes, a bulk string at most
  ``max_bulk`` bytes, a command at most ``max_args`` arguments;
- the parser never rescans bytes it already scanned (it remembers where the
  search for the next newline stopped);
- anything malformed, or an argument that is not UTF-8, raises
  ``ProtocolError``, and nothing else: the connection should then be closed,
  as Redis does, since the stream can no longer be framed.
"""

from __future__ import annotations

import re
from typing import Any, Final

import attrs

MAX_INLINE = 64 * 1024
MAX_BULK = 64 * 1024
MAX_ARGS = 32


class ProtocolError(Exception):
    """The byte stream is not valid RESP (the message says what was wrong)."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class RespParser:
    """Incremental request parser for one connection."""

    def __init__(
        self, *, max_inline: int = MAX_INLINE, max_bulk: int = MAX_BULK, max_args: int = MAX_ARGS
    ) -> None:
        self.max_inline = max_inline
        self.max_bulk = max_bulk
        self.max_args = max_args
        self._buf = bytearray()
        self._pos = 0  # start of the unconsumed bytes
        self._scan = 0  # where the search for the next b"\n" resumes
        self._args: list[str] | None = None  # a multibulk command in progress
        self._count = 0  # arguments it announced
        self._bulk = -1  # length of the bulk string expected next, -1 for its header

    @property
    def buffered(self) -> int:
        """Bytes received but not yet consumed (a partial command, or commands not taken)."""
        return len(self._buf) - self._pos

    @property
    def in_command(self) -> bool:
        """Whether part of a command has been received (for the per-command deadline)."""
        return self._args is not None or len(self._buf) > self._pos

    def take_rest(self) -> bytes:
        """At a command boundary: the bytes not parsed yet, handed over (the buffer empties)."""
        assert self._args is None
        rest = bytes(self._buf[self._pos :])
        self._buf = bytearray()
        self._pos = self._scan = 0
        return rest

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        if self._pos and self._pos > len(self._buf) // 2:
            # Drop the consumed prefix (amortised O(1) per byte).
            del self._buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        self._buf += data

    def _line(self, limit: int, what: str) -> bytes | None:
        """The next line without its CRLF, or None if it is not complete yet."""
        buf = self._buf
        end = buf.find(b"\n", max(self._scan, self._pos))
        if end < 0:
            if len(buf) - self._pos > limit:
                raise ProtocolError(f"too big {what} (more than {limit} bytes)")
            self._scan = len(buf)
            return None
        if end - self._pos > limit:
            raise ProtocolError(f"too big {what} (more than {limit} bytes)")
        line = bytes(buf[self._pos : end])
        self._pos = self._scan = end + 1
        return line[:-1] if line.endswith(b"\r") else line

    def _complete_array(self) -> list[str] | None:
        """The hot path: a whole, well-formed RESP array already in the buffer.

        Returns None for anything else (incomplete, unusual or malformed) and
        leaves it to the careful path below, which owns every error message.
        """
        buf = self._buf
        pos = self._pos
        end = buf.find(b"\r\n", pos + 1, pos + 8)
        if end < 0:
            return None
        digits = buf[pos + 1 : end]
        if not digits.isdigit():
            return None
        count = int(digits)
        if not 0 < count <= self.max_args:
            return None
        size = len(buf)
        p = end + 2
        args = []
        for _ in range(count):
            if buf[p : p + 1] != b"$":
                return None
            end = buf.find(b"\r\n", p + 1, p + 10)
            if end < 0:
                return None
            digits = buf[p + 1 : end]
            if not digits.isdigit():
                return None
            start = end + 2
            stop = start + int(digits)
            if stop + 2 > size or stop - start > self.max_bulk or buf[stop : stop + 2] != b"\r\n":
                return None
            try:
                args.append(buf[start:stop].decode())
            except UnicodeDecodeError:
                return None
            p = stop + 2
        self._pos = self._scan = p
        return args

    def next_command(self) -> list[str] | _NeedData:
        """The next complete command, or ``NEED_DATA``. Raises ``ProtocolError``."""
        if self._args is None and self._pos < len(self._buf) and self._buf[self._pos] == 0x2A:
            fast = self._complete_array()
            if fast is not None:
                return fast
        while True:
            if self._args is None:
                if self._pos >= len(self._buf):
                    return NEED_DATA
                if self._buf[self._pos] != 0x2A:  # not '*': an inline command
                    line = self._line(self.max_inline, "inline request")
                    if line is None:
                        return NEED_DATA
                    words = split_args(line)
                    if not words:
                        continue  # an empty line, as Redis ignores it
                    if len(words) > self.max_args:
                        raise ProtocolError(f"too many arguments (more than {self.max_args})")
                    return [_text(w) for w in words]
                header = self._line(32, "multibulk length")
                if header is None:
                    return NEED_DATA
                count = _int(header[1:], "invalid multibulk length")
                if count > self.max_args:
                    raise ProtocolError(f"too many arguments (more than {self.max_args})")
                if count <= 0:
                    continue  # *0 and *-1: an empty command, ignored as Redis does
                self._args = []
                self._count = count
                self._bulk = -1
            args = self._args
            while len(args) < self._count:
                if self._bulk < 0:
                    header = self._line(32, "bulk length")
                    if header is None:
                        return NEED_DATA
                    if not header.startswith(b"$"):
                        got = header[:1].decode("latin-1") or "end of line"
                        raise ProtocolError(f"expected '$', got '{got}'")
                    length = _int(header[1:], "invalid bulk length")
                    if length < 0:
                        raise ProtocolError("invalid bulk length")
                    if length > self.max_bulk:
                        raise ProtocolError(
                            f"too big bulk string (more than {self.max_bulk} bytes)"
                        )
                    self._bulk = length
                end = self._pos + self._bulk
                if len(self._buf) < end + 2:
                    return NEED_DATA
                if self._buf[end : end + 2] != b"\r\n":
                    raise ProtocolError("bulk string not terminated by CRLF")
                args.append(_text(bytes(self._buf[self._pos : end])))
                self._pos = self._scan = end + 2
                self._bulk = -1
            self._args = None
            return args


_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = b"0123456789abcdefABCDEF"


def split_args(line: bytes) -> list[bytes]:
    """An inline command's words, quoted as Redis's ``sdssplitargs`` quotes them.

    ``"..."`` takes the escapes ``\\n \\r \\t \\b \\a \\xHH`` and any escaped
    character; ``'...'`` only ``\\'``. A quote may start anywhere in a word;
    a closing quote must end the word; an unbalanced quote is a protocol error.
    """
    words: list[bytes] = []
    i, n = 0, len(line)
    space = b" \t\r\n\v\f"
    while True:
        while i < n and line[i] in space:
            i += 1
        if i >= n:
            return words
        word = bytearray()
        while i < n and line[i] not in space:
            c = line[i]
            if c != 0x22 and c != 0x27:  # neither " nor '
                word.append(c)
                i += 1
                continue
            quote = c
            i += 1
            while True:
                if i >= n:
                    raise ProtocolError("unbalanced quotes in request")
                c = line[i]
                if quote == 0x22 and c == 0x5C and i + 1 < n:  # backslash in "..."
                    nxt = line[i + 1]
                    if nxt in b"xX" and i + 3 < n and line[i + 2] in _HEX and line[i + 3] in _HEX:
                        word.append(int(line[i + 2 : i + 4], 16))
                        i += 4
                        continue
                    word.append(_ESCAPES.get(nxt, nxt))
                    i += 2
                    continue
                if quote == 0x27 and c == 0x5C and i + 1 < n and line[i + 1] == 0x27:
                    word.append(0x27)
                    i += 2
                    continue
                i += 1
                if c == quote:
                    if i < n and line[i] not in space:
                        raise ProtocolError("closing quote must be followed by a space")
                    break
                word.append(c)
        words.append(bytes(word))


def _int(digits: bytes, message: str) -> int:
    body = digits[1:] if digits[:1] == b"-" else digits
    # ASCII digits only, no leading zero (as Redis's string2ll): no "+5", "5_0", " 5", "04".
    if not 0 < len(body) <= 19 or not body.isdigit() or (body[:1] == b"0" and len(body) > 1):
        raise ProtocolError(message)
    return int(digits)


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("an argument is not valid UTF-8") from None


hiredis: Any
try:  # the C request parser; the pure one below is the authority and the fallback
    import hiredis
except ImportError:  # pragma: no cover - hiredis is a dependency, but the parser works without
    hiredis = None

_DIGITS = [len(str(i)) for i in range(1000)]
# An array header hiredis must never see: it allocates room for the announced count at
# once (lazily, but freeing 3e9 slots takes seconds of CPU), so a "*" followed by a count
# of three or more digits, or 33 to 99, sends the bytes to the careful parser. Not
# anchored at line starts: the anchored pattern costs a millisecond per 64 KiB read, this
# one 60 us; a match inside an argument's data only costs that read the careful parser.
_BIG_ARRAY = re.compile(rb"\*(?:[0-9]{3}|3[3-9]|[4-9][0-9])")


class RequestParser:
    """The request parser servers use: hiredis's C reader for whole RESP arrays,
    ``RespParser`` for everything else.

    hiredis parses a pipelined ``ACTIVATE`` about twenty times faster than
    Python can, but it accepts what a request must not be (nested arrays,
    integers, huge bulk strings it would buffer) and knows no inline commands.
    So hiredis only ever sees whole commands' worth of bytes from a command
    boundary: every command it returns is checked against the same limits, and
    anything else (an incomplete command at the end of what was received, an
    inline command, anything malformed or oversized) goes to ``RespParser``
    from that boundary, which owns every error message; once it has finished
    that command, hiredis takes over again. The boundary is tracked from each
    command's size in canonical RESP framing (what every client sends; both
    parsers refuse leading zeros, as Redis does), so for any bytes the two give
    the same commands and the same errors (a property test holds them to it).
    """

    def __init__(
        self, *, max_inline: int = MAX_INLINE, max_bulk: int = MAX_BULK, max_args: int = MAX_ARGS
    ) -> None:
        self.max_bulk = max_bulk
        self.max_args = max_args
        self._slow = RespParser(max_inline=max_inline, max_bulk=max_bulk, max_args=max_args)
        self._fast: Any = None
        self._careful = hiredis is None  # the pure parser has the bytes now
        self._buf = bytearray()  # bytes given to hiredis
        self._pos = 0  # the last command boundary in _buf
        if not self._careful:
            self._fast = hiredis.Reader(encoding="utf-8", errors="strict")

    @property
    def in_command(self) -> bool:
        if self._careful:
            return self._slow.in_command
        return len(self._buf) > self._pos

    def feed(self, data: bytes) -> None:
        if self._careful:
            self._slow.feed(data)
            return
        if _BIG_ARRAY.search(data) or (
            self._buf and _BIG_ARRAY.search(self._buf[-4:] + data[:8])  # across the seam
        ):
            self._buf += data
            self._to_careful()
            return
        self._fast.feed(data)
        self._buf += data

    def _to_careful(self) -> None:
        """Hand the bytes from the last boundary to the pure parser."""
        self._slow.feed(bytes(self._buf[self._pos :]))
        self._buf = bytearray()
        self._pos = 0
        self._fast = None
        self._careful = True

    def _to_fast(self) -> None:
        """The pure parser finished a command: hiredis takes what follows."""
        rest = self._slow.take_rest()
        if _BIG_ARRAY.search(rest):
            self._slow.feed(rest)
            return
        self._careful = False
        self._fast = hiredis.Reader(encoding="utf-8", errors="strict")
        if rest:
            self._fast.feed(rest)
            self._buf += rest

    def next_command(self) -> list[str] | _NeedData:
        """The next complete command, or ``NEED_DATA``. Raises ``ProtocolError``."""
        while True:
            if self._careful:
                command = self._slow.next_command()
                slow = self._slow
                if (
                    command is not NEED_DATA
                    and hiredis is not None
                    and slow._args is None
                    and (slow.buffered == 0 or slow._buf[slow._pos] == 0x2A)
                ):
                    self._to_fast()
                return command
            buf = self._buf
            if self._pos < len(buf) and buf[self._pos] != 0x2A:
                self._to_careful()  # an inline command: the careful parser
                continue
            try:
                command = self._fast.gets()
            except Exception:  # hiredis.ProtocolError, UnicodeDecodeError: the careful path says
                self._to_careful()
                continue
            if command is False:
                if self._pos < len(buf):
                    self._to_careful()  # an incomplete command: checked as it comes
                    continue
                buf.clear()
                self._pos = 0
                return NEED_DATA
            if type(command) is not list or not 0 < len(command) <= self.max_args:
                self._to_careful()
                continue
            # *<n>\r\n, then $<len>\r\n<data>\r\n per argument: the bytes this command took.
            # hiredis checks the header lines but not the CRLF after each argument's data.
            limit = self.max_bulk
            end = self._pos + 3 + _DIGITS[len(command)]
            starts = buf.startswith
            try:
                for arg in command:
                    n = len(arg) if arg.isascii() else len(arg.encode())
                    if n > limit:
                        raise ValueError(n)
                    end += 3 + (_DIGITS[n] if n < 1000 else len(str(n))) + n
                    if not starts(b"\r\n", end):
                        raise ValueError(n)
                    end += 2
            except (TypeError, AttributeError, ValueError):  # not a string, too long, misframed
                self._to_careful()
                continue
            size = end - self._pos
            self._pos += size
            return command


# -- replies ---------------------------------------------------------------------


@attrs.frozen
class Simple:
    """A simple string reply (``+OK``)."""

    text: str


@attrs.frozen
class Error:
    """An error reply: ``-CODE message``; ``code`` is the first word clients branch on."""

    code: str
    message: str


OK: Final = Simple("OK")

Reply = (
    None | bool | int | float | str | bytes | Simple | Error | list["Reply"] | dict[str, "Reply"]
)


def encode(value: Reply, proto: int = 2) -> bytes:
    """The RESP bytes of ``value``: RESP2 by default, RESP3 when ``proto`` is 3.

    ``dict`` becomes a RESP3 map, or in RESP2 a flat array of field/value
    pairs (like HGETALL); ``None`` is RESP3 null, or a RESP2 nil bulk string.
    """
    if type(value) is Simple:  # +OK, +PONG: the commonest replies of all
        return b"+%b\r\n" % _line(value.text)
    out: list[bytes] = []
    _encode(value, proto, out)
    return b"".join(out)


def _encode(value: Reply, proto: int, out: list[bytes]) -> None:
    if isinstance(value, str):
        data = value.encode()
        out.append(b"$%d\r\n%b\r\n" % (len(data), data))
    elif isinstance(value, dict):
        out.append(b"%%%d\r\n" % len(value) if proto == 3 else b"*%d\r\n" % (2 * len(value)))
        for k, v in value.items():
            _encode(k, proto, out)
            _encode(v, proto, out)
    elif isinstance(value, bool):
        if proto == 3:
            out.append(b"#t\r\n" if value else b"#f\r\n")
        else:
            out.append(b":1\r\n" if value else b":0\r\n")
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif value is None:
        out.append(b"_\r\n" if proto == 3 else b"$-1\r\n")
    elif isinstance(value, list | tuple):
        out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode(item, proto, out)
    elif isinstance(value, Simple):
        out.append(b"+%b\r\n" % _line(value.text))
    elif isinstance(value, Error):
        out.append(b"-%b %b\r\n" % (_line(value.code), _line(value.message)))
    elif isinstance(value, bytes):
        out.append(b"$%d\r\n%b\r\n" % (len(value), value))
    elif isinstance(value, float):
        text = repr(value).encode()
        out.append(b",%b\r\n" % text if proto == 3 else b"$%d\r\n%b\r\n" % (len(text), text))
    else:
        raise TypeError(f"cannot encode {type(value).__name__} as RESP")


def _line(text: str) -> bytes:
    """A simple string or error line: no CR or LF may break the framing."""
    return text.replace("\r", " ").replace("\n", " ").encode()


def encode_command(*args: str) -> bytes:
    """A command as a client sends it: a RESP array of bulk strings (the load generators)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)
