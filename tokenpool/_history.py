"""The ended leases a pool keeps in memory: in columns, oldest first, found by revision.

A pool keeps its newest ``history_memory`` (100,000 by default) ended leases so that
history pages and event replays need no store. Kept as tuples in a dict keyed by
revision they cost about 400 bytes each and every full collection of the cyclic
collector walked all of them. Here they are columns of numbers (``array``), one value
per entry, the entry's position found by bisection on the revisions (sorted: revisions
only grow):

- revision, fence, start, stop: 8 bytes each; slot: 4; reason: 1;
- the lease id as its 16 raw UUID bytes (anything but canonical UUID text, which the
  pool itself never makes, is kept aside as text, exactly as it was);
- the user id's UTF-8 in one blob, with its 8-byte offset (``ENTRY_BYTES`` + the user id).

Nothing here is tracked by the cyclic collector except a short list of the newest
records (``_BATCH``), which are moved into the columns a batch at a time: transposed by
``zip`` and the lease ids converted by one ``bytes.fromhex`` over the batch, so the
cost per ended lease on the hot path is one ``list.append``. Dropping the oldest is
amortised O(1): a start offset moves, and the columns are compacted when half is dropped.
"""

from __future__ import annotations

import functools
from array import array
from bisect import bisect_left
from collections.abc import Callable
from itertools import accumulate
from operator import itemgetter
from struct import Struct
from typing import Final

from ._ids import uuid_text
from ._model import END, REV, EndRecord, Reason

_REASONS = tuple(reason.value for reason in Reason)
_REASON_CODE = {reason: code for code, reason in enumerate(_REASONS)}
_BATCH: Final = 256  # newest records kept as tuples before they go into the columns
_REV_OF = itemgetter(REV)

ENTRY_BYTES: Final = 8 * 4 + 4 + 1 + 16 + 8
"""What one entry costs beyond its user id's UTF-8 (for the README and INFO): revision,
fence, start and stop, the slot, the reason, the raw lease id, the user's offset."""


@functools.cache
def _packer(code: str, n: int) -> Callable[..., bytes]:
    """Packs ``n`` ints in the machine's layout of ``array(code)``."""
    return Struct(f"{n}{code}").pack


def _raw_ids(ids: tuple[str, ...]) -> bytes:
    """The 16 raw bytes of each id, if every one is canonical UUID text (lowercase
    8-4-4-4-12 hex, what the pool makes), else ``b""``. One check and one conversion
    for a whole batch: the common case; a single id is a batch of one."""
    joined = "".join(ids)
    n = len(ids)
    if (
        len(joined) != 36 * n
        or joined.count("-") != 4 * n
        or not all(joined[i::36].count("-") == n for i in (8, 13, 18, 23))
        or joined != joined.lower()
    ):
        return b""
    try:
        raw = bytes.fromhex(joined.replace("-", ""))
    except ValueError:
        return b""
    return raw if len(raw) == 16 * n else b""


class EndedLog:
    """Ended leases in revision order, the oldest dropped first (amortised O(1))."""

    __slots__ = (
        "_base",
        "_blob",
        "_blob_base",
        "_fences",
        "_first",
        "_odd",
        "_pending",
        "_raw",
        "_reasons",
        "_revs",
        "_slots",
        "_starts",
        "_stops",
        "_user_at",
    )

    def __init__(self) -> None:
        self._revs = array("q")
        self._fences = array("q")
        self._starts = array("q")
        self._stops = array("q")
        self._slots = array("i")
        self._reasons = bytearray()
        self._raw = bytearray()  # 16 bytes of lease id per entry
        self._odd: dict[int, str] = {}  # entry number -> a lease id kept as text
        self._blob = bytearray()  # the users' UTF-8, one after the other
        self._user_at = array("q")  # where each entry's user starts (offset since creation)
        self._blob_base = 0  # the offset of _blob[0] since creation
        self._first = 0  # entries before this one are forgotten, not yet compacted
        self._base = 0  # how many entries compactions removed (entry number of index 0)
        self._pending: list[EndRecord] = []  # the newest, not yet in the columns

    def __len__(self) -> int:
        return len(self._revs) - self._first + len(self._pending)

    def append(self, ended: EndRecord) -> None:
        """Keep an ended lease; its revision must be above every one kept."""
        pending = self._pending
        pending.append(ended)
        if len(pending) >= _BATCH:
            self._settle()

    def _settle(self) -> None:
        """Move the pending records into the columns, a column at a time."""
        pending = self._pending
        if not pending:
            return
        _, ids, slots, users, fences, starts, stops, revs, reasons = zip(*pending, strict=True)
        # array.extend converts each int through PyArg_Parse; struct packs them 2.5x faster
        q = _packer("q", len(revs))
        self._revs.frombytes(q(*revs))
        self._fences.frombytes(q(*fences))
        self._starts.frombytes(q(*starts))
        self._stops.frombytes(q(*stops))
        self._slots.frombytes(_packer("i", len(slots))(*slots))
        self._reasons.extend(map(_REASON_CODE.__getitem__, reasons))
        encoded = [user.encode() for user in users]
        at = self._blob_base + len(self._blob)
        self._user_at.extend(accumulate(map(len, encoded[:-1]), initial=at))
        self._blob += b"".join(encoded)
        raw = _raw_ids(ids)
        if raw:
            self._raw += raw
        else:  # some id is not canonical: it is kept aside as text, exactly as it was
            number = self._base + len(self._revs) - len(ids)
            for i, lease_id in enumerate(ids):
                one = _raw_ids((lease_id,))
                if not one:
                    one = bytes(16)
                    self._odd[number + i] = lease_id
                self._raw += one
        pending.clear()

    def get(self, rev: int) -> EndRecord:
        """The ended lease of that revision (it must be kept)."""
        pending = self._pending
        if pending and rev >= pending[0][REV]:
            i = bisect_left(pending, rev, key=_REV_OF)
            if i < len(pending) and pending[i][REV] == rev:
                return pending[i]
            raise KeyError(rev)
        revs = self._revs
        i = bisect_left(revs, rev, self._first)
        if i == len(revs) or revs[i] != rev:
            raise KeyError(rev)
        lease_id = self._odd.get(self._base + i) if self._odd else None
        if lease_id is None:
            lease_id = uuid_text(bytes(self._raw[16 * i : 16 * i + 16]))
        return (
            END,
            lease_id,
            self._slots[i],
            self._user(i),
            self._fences[i],
            self._starts[i],
            self._stops[i],
            rev,
            _REASONS[self._reasons[i]],
        )

    def _user(self, i: int) -> str:
        at, base = self._user_at, self._blob_base
        end = at[i + 1] - base if i + 1 < len(at) else len(self._blob)
        return self._blob[at[i] - base : end].decode()

    def drop_oldest(self, count: int) -> tuple[list[int], list[int], list[str]]:
        """Forget the ``count`` oldest entries; returns their revisions, slots and users,
        oldest first (what the indexes need; the rest is not decoded)."""
        self._settle()
        start = self._first
        stop = min(start + count, len(self._revs))
        if stop <= start:
            return [], [], []
        revs = self._revs[start:stop].tolist()
        slots = self._slots[start:stop].tolist()
        at = self._user_at
        base = self._blob_base
        ends = [*at[start + 1 : stop + 1].tolist(), base + len(self._blob)][: stop - start]
        blob = self._blob
        users = [
            blob[a - base : b - base].decode()
            for a, b in zip(at[start:stop].tolist(), ends, strict=True)
        ]
        if self._odd:
            for number in range(self._base + start, self._base + stop):
                self._odd.pop(number, None)
        self._first = stop
        if stop > len(self._revs) // 2:
            self._compact()
        return revs, slots, users

    def _compact(self) -> None:
        cut = self._first
        end_of_cut = (
            self._user_at[cut] if cut < len(self._user_at) else (self._blob_base + len(self._blob))
        )
        del self._blob[: end_of_cut - self._blob_base]
        self._blob_base = end_of_cut
        for column in (self._revs, self._fences, self._starts, self._stops, self._slots):
            del column[:cut]
        del self._user_at[:cut]
        del self._reasons[:cut]
        del self._raw[: 16 * cut]
        self._base += cut
        self._first = 0
