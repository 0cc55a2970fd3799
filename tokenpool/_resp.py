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

from typing import Final

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
                    words = line.split()
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


def _int(digits: bytes, message: str) -> int:
    body = digits[1:] if digits[:1] == b"-" else digits
    if not 0 < len(body) <= 19 or not body.isdigit():  # ASCII digits only: no "+5", "5_0", " 5"
        raise ProtocolError(message)
    return int(digits)


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ProtocolError("an argument is not valid UTF-8") from None


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
