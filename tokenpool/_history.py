"""The ended leases a pool keeps in memory: packed, oldest first, found by revision.

A pool keeps its newest ``history_memory`` (100,000 by default) ended leases so that
history pages and event replays need no store. Kept as tuples in a dict keyed by
revision they cost about 400 bytes each and every full collection of the cyclic
collector walked all of them; here each is one ``bytes`` object in a list, its revision
in a parallel ``array('q')`` (sorted: revisions only grow), found by bisection:

- a bytes object of 33 bytes of header plus the packed lease: 31 bytes of numbers, the
  lease id as its 16 raw UUID bytes, the user id's UTF-8 (``ENTRY_BYTES`` + the user id);
- 8 bytes of list pointer and 8 of revision.

The per-token and per-user indexes (``PoolState``) add 8 bytes each. Nothing here is
tracked by the collector: bytes, arrays and a list of bytes are not walked (the list is,
but it is one object whose items need no visit beyond a type check).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from struct import Struct
from typing import Final

from ._ids import uuid_text
from ._model import END, FENCE, ID, REASON, REV, SLOT, START, STOP, USER, EndRecord, Reason

_HEAD = Struct("=qqqiBH")  # fence, start, stop, slot, reason, id length (0: 16 raw bytes)
_REASONS = tuple(reason.value for reason in Reason)
_REASON_CODE = {reason: code for code, reason in enumerate(_REASONS)}
_RAW_ID = 0

ENTRY_BYTES: Final = 33 + _HEAD.size + 16 + 8 + 8
"""What one entry costs beyond its user id's bytes (for the README and INFO): the bytes
object's header, the packed numbers, the raw lease id, the list slot, the revision."""


def _pack(ended: EndRecord) -> bytes:
    lease_id: str = ended[ID]
    raw = b""
    # Canonical UUID text (what the pool makes and the stores give back) is kept as its
    # 16 bytes; anything else as its text, so it reads back exactly as it was.
    if (
        len(lease_id) == 36
        and lease_id[8] == lease_id[13] == lease_id[18] == lease_id[23] == "-"
        and lease_id.count("-") == 4
        and lease_id.islower()  # no A-F (an id of digits only is kept as text: harmless)
    ):
        try:
            raw = bytes.fromhex(lease_id.replace("-", ""))
        except ValueError:
            raw = b""
    body = raw if raw else lease_id.encode()
    return (
        _HEAD.pack(
            ended[FENCE],
            ended[START],
            ended[STOP],
            ended[SLOT],
            _REASON_CODE[ended[REASON]],
            _RAW_ID if raw else len(body),
        )
        + body
        + ended[USER].encode()
    )


def _unpack(rev: int, packed: bytes) -> EndRecord:
    fence, start, stop, slot, reason, id_length = _HEAD.unpack_from(packed)
    at = _HEAD.size
    if id_length == _RAW_ID:
        lease_id = uuid_text(packed[at : at + 16])
        at += 16
    else:
        lease_id = packed[at : at + id_length].decode()
        at += id_length
    user = packed[at:].decode()
    return (END, lease_id, slot, user, fence, start, stop, rev, _REASONS[reason])


def _slot_user(packed: bytes) -> tuple[int, str]:
    slot, id_length = _SLOT_AND_ID.unpack_from(packed, 24)
    at = _HEAD.size + (16 if id_length == _RAW_ID else id_length)
    return slot, packed[at:].decode()


_SLOT_AND_ID = Struct("=i1xH")  # the head's slot, (reason), id length: from byte 24


class EndedLog:
    """Ended leases in revision order, the oldest dropped first (amortised O(1))."""

    __slots__ = ("_entries", "_first", "_revs")

    def __init__(self) -> None:
        self._entries: list[bytes] = []
        self._revs = array("q")
        self._first = 0  # entries before this one are forgotten, not yet compacted

    def __len__(self) -> int:
        return len(self._revs) - self._first

    def append(self, ended: EndRecord) -> None:
        """Keep an ended lease; its revision must be above every one kept."""
        self._entries.append(_pack(ended))
        self._revs.append(ended[REV])

    def get(self, rev: int) -> EndRecord:
        """The ended lease of that revision (it must be kept)."""
        i = bisect_left(self._revs, rev, self._first)
        if i == len(self._revs) or self._revs[i] != rev:
            raise KeyError(rev)
        return _unpack(rev, self._entries[i])

    def drop_oldest(self, count: int) -> list[tuple[int, int, str]]:
        """Forget the ``count`` oldest entries; returns their (revision, slot, user),
        oldest first (what the indexes need; the rest is not decoded)."""
        start = self._first
        stop = min(start + count, len(self._revs))
        revs, entries = self._revs, self._entries
        dropped = [(revs[i], *_slot_user(entries[i])) for i in range(start, stop)]
        for i in range(start, stop):
            entries[i] = b""  # the bytes go now; the slots go at the next compaction
        self._first = stop
        if stop > len(revs) // 2:
            del entries[:stop]
            del revs[:stop]
            self._first = 0
        return dropped
