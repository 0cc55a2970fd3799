"""Length-prefixed pickle frames: the one codec between the server and its store process.

Sans-IO, as h11 is: ``encode`` turns messages into bytes and a ``FrameDecoder``
takes bytes as they arrive and hands back whole messages; the link (trio) and
the store process (a blocking socket) only move the bytes.

A frame is a 4-byte big-endian length, then one pickle. Both ends are this
program (a socketpair to its own child), so pickle is safe here; the bound
only stops a corrupt length from making the receiver buffer without end. The
sender does not check it: a frame too large fails at the receiver, which ends
the link (the server marks the store ``failed``) instead of crashing the server.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterable
from typing import Any

MAX_FRAME = 256 << 20
"""The largest frame a decoder accepts (bytes of pickle after the length)."""

_LEN = struct.Struct(">I")


class FrameError(Exception):
    """The byte stream is not a valid frame stream (the message says what was wrong)."""


def encode(messages: Iterable[object]) -> bytes:
    """The frames of ``messages``, in order: one pickle each, joined once."""
    parts: list[bytes] = []
    pack = _LEN.pack
    dumps = pickle.dumps
    for message in messages:
        data = dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        parts.append(pack(len(data)))
        parts.append(data)
    return b"".join(parts)


class FrameDecoder:
    """Bytes in, whole messages out. Keeps an incomplete frame until the rest arrives.

    ``feed`` raises ``FrameError`` when a frame announces more than ``max_frame``
    bytes; the stream cannot be resynchronised after that.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> list[Any]:
        """Take ``data``; return every message it completes, oldest first."""
        buf = self._buf
        buf += data
        out: list[Any] = []
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > self.max_frame:
                raise FrameError(
                    f"a frame of {size} bytes is larger than the limit of {self.max_frame}"
                )
            if end - pos - 4 < size:
                break
            out.append(pickle.loads(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not complete yet."""
        return len(self._buf)
