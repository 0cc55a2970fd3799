"""The pool as a pure state machine: the lease rules, with no I/O and no clock.

Every operation takes ``now`` (integer microseconds since the Unix epoch) and
appends the change records it makes to ``state.changes`` (see ``_model``);
the actor hands them to the writer and to the event log after each batch.

The rules:

1. ``activate(user)``: a user who holds a lease gets that same lease back,
   unchanged. Otherwise the token that has been available the longest is
   leased (FIFO). With no token available the pool's ``when_full`` policy
   decides: ``evict`` ends the lease with the oldest ``activated_at``
   (``evicted``) and gives its token to the newcomer, unless that lease is
   younger than ``min_hold``; ``reject`` raises ``FullError``; ``wait`` queues
   the caller (first come, first served) when it asked to wait, else raises
   ``FullError``. A queued caller is granted the first token that frees up,
   or gets ``FullError`` when its wait runs out.
2. A lease covers ``[activated_at, expires_at)``: at ``expires_at`` it ends
   ``expired`` and its usage's ``ended_at`` is exactly ``expires_at``,
   whenever the pool notices. ``expires_at`` is ``now + ttl``, never past
   ``activated_at + max_lifetime``.
3. ``release`` ends a lease ``released``; ``clear`` ends every lease
   ``cleared``; ``renew`` moves a current lease's ``expires_at`` to
   ``now + ttl`` (capped as above). Nothing extends a lease by itself.
4. ``revision`` grows by one for every grant, renewal, token change and
   ended lease, except that an activation that evicts uses one revision for
   both the eviction and the grant. So every ended lease has a revision of
   its own (the total order of the history and its paging cursor), and a
   lease's ``fence`` (the revision that granted it) is unique and only grows.
5. Time never runs backwards: a ``now`` older than the last one seen is
   taken as the last one.
6. Lease operations cost O(1) or O(log n) in the pool size. Available tokens
   are a ring buffer of slots (oldest first), leases an insertion-ordered
   map in activation order, deadlines a heap with lazy deletion, token ids a
   16-byte-per-token blob with a sorted index (about 40 bytes per token).
7. Memory keeps the newest ``history_memory`` ended leases of the pool, per
   token and per user. Older ones are only in the store; ``history`` says
   from which revision down the store must be read.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import compress
from struct import Struct
from typing import Any, overload

from ._errors import (
    FullError,
    InvalidArgumentError,
    NotActiveError,
    NotHolderError,
    UnknownTokenError,
)
from ._history import EndedLog
from ._ids import check_user_id, new_id, ordered_ids, uuid_bytes, uuid_text
from ._model import (
    ADD,
    COUNTERS,
    END,
    FENCE,
    GRANT,
    ID,
    RENEW,
    RETIRE,
    REV,
    SLOT,
    START,
    STOP,
    USER,
    EndRecord,
    LeaseRecord,
    Reason,
    Record,
)
from ._settings import BEFORE, HISTORY_LIMIT, TOKENS_MAX, PoolSettings, check_int

EXPIRED = Reason.EXPIRED.value
EVICTED = Reason.EVICTED.value
RELEASED = Reason.RELEASED.value
CLEARED = Reason.CLEARED.value

WAITING = object()
"""``activate_or_wait`` queued the caller: its result comes later through ``woken``."""

_PACK = Struct("=q").pack  # one revision in a per-slot or per-user index
_REV_BYTES = 8
_LIVE = bytes([1, 0]) + bytes(254)  # retired flag -> "is live", for itertools.compress
_US = 1_000_000


class Pairs(Sequence[tuple[int, "LeaseRecord | None"]]):
    """(slot, lease) pairs kept as two lists: made without a tuple per token (which
    costs the actor a millisecond per 10,000), zipped only as a reader asks."""

    __slots__ = ("leases", "slots")

    def __init__(self, slots: Sequence[int], leases: list[LeaseRecord | None]) -> None:
        self.slots = slots
        self.leases = leases

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[tuple[int, LeaseRecord | None]]:
        return zip(self.slots, self.leases, strict=True)

    @overload
    def __getitem__(self, index: int) -> tuple[int, LeaseRecord | None]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, LeaseRecord | None]]: ...

    def __getitem__(
        self, index: int | slice
    ) -> tuple[int, LeaseRecord | None] | list[tuple[int, LeaseRecord | None]]:
        if isinstance(index, slice):
            return list(zip(self.slots[index], self.leases[index], strict=True))
        return self.slots[index], self.leases[index]


class Waiter:
    """A caller queued on a full ``wait`` pool. ``ticket`` is the actor's handle on it."""

    __slots__ = ("active", "since", "ticket", "until", "user_id")

    def __init__(self, ticket: object, user_id: str, until: int, since: int = 0) -> None:
        self.ticket = ticket
        self.user_id = user_id
        self.until = until
        self.since = since  # when it was queued: the wait time of the grant it gets
        self.active = True


class PoolState:
    """The authoritative data of one pool. Not thread- or task-safe: one owner."""

    def __init__(
        self,
        settings: PoolSettings | None = None,
        *,
        history_memory: int = 100_000,
        revision: int = 0,
        ids: Callable[[], str] = new_id,
    ) -> None:
        self.history_memory = check_int(history_memory, "history_memory", 1, 10_000_000)
        self._history_slack = min(256, self.history_memory >> 3)
        self.revision = revision
        self._ids = ids
        self._now = 0
        self.changes: list[Record] = []
        self.woken: list[tuple[object, object]] = []  # (ticket, lease record or error)
        # Tokens, by slot (creation order). A retired slot stays as a tombstone.
        self._blob = bytearray()  # 16 bytes of UUID per slot
        self._created = array("q")
        self._retired = bytearray()
        self._live = 0
        self._keys = array("Q")  # the first 8 bytes of each live token's UUID, sorted
        self._key_slots = array("I")  # the slot of each entry of _keys
        self._text: dict[int, str] = {}  # slot -> token id text, a bounded cache
        # Available slots: a ring buffer, the longest available at the head.
        self._ring = array("I")
        self._head = 0
        self._count = 0
        # Leases: slot -> record in activation order; user -> record.
        self._leases: OrderedDict[int, LeaseRecord] = OrderedDict()
        self._by_user: dict[str, LeaseRecord] = {}
        # (expires_us, fence, slot, lease_id): live only while that lease is current.
        # Nearly every deadline comes after all the others (the TTL is one for the
        # pool and time only grows): those go to a queue, in order, pushed and popped
        # in O(1); only one earlier than the queue's last (a shorter TTL set since, a
        # renewal capped by max-lifetime) goes to a heap. The next is the lesser head.
        self._due: deque[tuple[int, int, int, str]] = deque()
        self._deadlines: list[tuple[int, int, int, str]] = []
        # Ended leases (bounded, packed: see ``_history``), oldest first; and per slot
        # and per user the revisions of theirs, packed in a bytearray. Bytes,
        # bytearrays and dicts of them are invisible to the cyclic collector: kept as
        # tuples and lists, every full collection walked all 100,000 (9 ms of cache
        # misses, about once a second under load).
        self._ended = EndedLog()
        self._by_slot: dict[int, bytearray] = {}
        self._user_history: dict[str, bytearray] = {}
        self.history_floor = revision + 1  # memory holds every ended lease from here up
        # Callers waiting for a token (``wait`` pools), and their deadlines.
        # One ordered map, ticket -> waiter, first come first: a waiter that leaves
        # (cancelled, timed out) is removed at once, never left for a release to walk.
        self._waiters: OrderedDict[object, Waiter] = OrderedDict()
        self._wait_deadlines: list[tuple[int, int, Waiter]] = []  # compacted as _deadlines
        self._wait_seq = 0
        self._waiting_users: dict[str, int] = {}  # queued waiters per user id
        self.waiting = 0
        self.wait_grants = 0  # grants made to a queued caller, and their total wait
        self.waited_us = 0
        self.activations = 0
        self.evictions = 0
        self.expirations = 0
        self.releases = 0
        self.clears = 0
        self.renewals = 0
        self.refusals = 0
        self.settings = settings or PoolSettings()
        self._apply_settings(self.settings)

    # -- settings -------------------------------------------------------------

    def _apply_settings(self, settings: PoolSettings) -> None:
        self.settings = settings
        self.ttl_us = round(settings.ttl * _US)
        self.min_hold_us = round(settings.min_hold * _US)
        self.max_life_us = (
            None if settings.max_lifetime is None else round(settings.max_lifetime * _US)
        )
        self.policy = settings.when_full
        self._expires = self._now + self.ttl_us

    def configure(self, settings: PoolSettings, now: int) -> None:
        """Apply new settings: resize to ``settings.size``; the rules apply from now on.

        Leases keep the ``expires_at`` they have. Leaving the ``wait`` policy
        answers every queued caller ``FullError``.
        """
        now = self._tick(now)
        waited = self.policy == "wait"
        self._apply_settings(settings)
        self._expires = now + self.ttl_us
        if waited and self.policy != "wait":
            for waiter in list(self._waiters.values()):
                self._refuse_waiter(waiter, "the pool no longer waits when full")
            self._wait_deadlines.clear()
        self.resize(settings.size, now)

    # -- time -----------------------------------------------------------------

    def _tick(self, now: int) -> int:
        """Move the pool's time to ``now`` (never back) and end what is due by then."""
        if now > self._now:
            self._now = now
            self._expires = now + self.ttl_us
        else:
            now = self._now
        due = self._due
        deadlines = self._deadlines
        while True:
            if due and due[0][0] <= now and not (deadlines and deadlines[0] < due[0]):
                expires_at, _fence, slot, lease_id = due.popleft()
            elif deadlines and deadlines[0][0] <= now:
                expires_at, _fence, slot, lease_id = heapq.heappop(deadlines)
            else:
                break
            lease = self._leases.get(slot)
            if lease is not None and lease[ID] == lease_id and lease[STOP] == expires_at:
                self.expirations += 1
                self._end(lease, expires_at, EXPIRED)
                self._free(slot)
        waits = self._wait_deadlines
        while waits and waits[0][0] <= now:
            waiter = heapq.heappop(waits)[2]
            if waiter.active:
                self._refuse_waiter(waiter, "no token became free in time")
        if len(waits) > 2 * len(self._waiters) + 64:
            self._compact_waits()
        return now

    def advance(self, now: int) -> None:
        """End every lease whose ``expires_at`` is at or before ``now``; time out waiters."""
        self._tick(now)

    def next_deadline(self) -> int | None:
        """When the next lease expires or wait runs out (``None`` if neither): the actor's timer."""
        due = self._due
        deadlines = self._deadlines
        leases = self._leases
        while due:
            expires_at, _fence, slot, lease_id = due[0]
            lease = leases.get(slot)
            if lease is not None and lease[ID] == lease_id and lease[STOP] == expires_at:
                break
            due.popleft()
        while deadlines:
            expires_at, _fence, slot, lease_id = deadlines[0]
            lease = leases.get(slot)
            if lease is not None and lease[ID] == lease_id and lease[STOP] == expires_at:
                break
            heapq.heappop(deadlines)
        waits = self._wait_deadlines
        while waits and not waits[0][2].active:
            heapq.heappop(waits)
        first = due[0][0] if due else None
        if deadlines and (first is None or deadlines[0][0] < first):
            first = deadlines[0][0]
        if waits and (first is None or waits[0][0] < first):
            return waits[0][0]
        return first

    @property
    def now(self) -> int:
        """The newest time the pool has seen."""
        return self._now

    # -- tokens ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._live

    def slot_of(self, token_id: object, *, retired: bool = False) -> int:
        """The slot of a live token (or, with ``retired``, of one the pool had: its
        history stays readable). Raises ``InvalidArgumentError``, ``UnknownTokenError``."""
        raw = uuid_bytes(token_id, "token_id")
        key = int.from_bytes(raw[:8])
        keys = self._keys
        i = bisect_left(keys, key)
        blob = self._blob
        while i < len(keys) and keys[i] == key:
            slot = self._key_slots[i]
            if blob[16 * slot : 16 * slot + 16] == raw and (retired or not self._retired[slot]):
                return slot
            i += 1
        raise UnknownTokenError(f"no token {uuid_text(raw)} in this pool")

    def token_text(self, slot: int) -> str:
        """The token id of a slot (cached: every ACTIVATE reply names its token)."""
        text = self._text.get(slot)
        if text is None:
            if len(self._text) >= 100_000:
                self._text.clear()
            text = self._text[slot] = uuid_text(bytes(self._blob[16 * slot : 16 * slot + 16]))
        return text

    def _index(self, slots: list[int]) -> None:
        """Add new slots to the sorted key index (retired slots stay in it, skipped on lookup)."""
        blob = self._blob
        keys = self._keys
        if slots:
            pairs = sorted((int.from_bytes(blob[16 * s : 16 * s + 8]), s) for s in slots)
            if not keys or pairs[0][0] > keys[-1]:  # all after the last: append (the usual)
                keys.extend([k for k, _ in pairs])
                self._key_slots.extend([s for _, s in pairs])
                return
        if len(slots) < 64:
            for slot in slots:
                key = int.from_bytes(blob[16 * slot : 16 * slot + 8])
                i = bisect_left(self._keys, key)
                self._keys.insert(i, key)
                self._key_slots.insert(i, slot)
            return
        pairs = sorted(
            [(int.from_bytes(blob[16 * s : 16 * s + 8]), s) for s in slots]
            + list(zip(self._keys, self._key_slots, strict=True))
        )
        self._keys = array("Q", [k for k, _ in pairs])
        self._key_slots = array("I", [s for _, s in pairs])

    def _grow_ring(self, capacity: int) -> None:
        ring = self._ring
        if capacity <= len(ring):
            return
        capacity = max(capacity, 2 * len(ring))  # doubling: growing in steps stays linear
        head, count = self._head, self._count
        if head + count <= len(ring):
            ordered = ring[head : head + count]  # array slices: copied in C
        else:
            ordered = ring[head:] + ring[: head + count - len(ring)]
        ordered.frombytes(bytes(ordered.itemsize * (capacity - len(ordered))))
        self._ring = ordered
        self._head = 0

    def _push_free(self, slot: int) -> None:
        ring = self._ring
        ring[(self._head + self._count) % len(ring)] = slot
        self._count += 1

    def _new_slots(self, raws: list[bytes], created: int) -> list[int]:
        first = len(self._retired)
        for raw in raws:
            self._blob += raw
        self._created.extend([created] * len(raws))
        self._retired.extend(bytes(len(raws)))
        self._live += len(raws)
        self._grow_ring(len(self._retired))
        return list(range(first, first + len(raws)))

    def add_tokens(self, token_ids: Iterable[str], now: int) -> list[int]:
        """Add tokens, available behind those already available. Returns their slots."""
        now = self._tick(now)
        raws = [uuid_bytes(t, "token_id") for t in token_ids]
        if len(set(raws)) != len(raws):
            raise InvalidArgumentError("the same token id was given twice")
        for raw in raws:
            key = int.from_bytes(raw[:8])
            i = bisect_left(self._keys, key)
            while i < len(self._keys) and self._keys[i] == key:
                if self._blob[16 * self._key_slots[i] : 16 * self._key_slots[i] + 16] == raw:
                    raise InvalidArgumentError(f"token {uuid_text(raw)} was already in the pool")
                i += 1
        if not raws:
            return []
        slots = self._new_slots(raws, now)
        self._index(slots)
        self.revision += 1
        self.changes.append(
            (
                ADD,
                self.revision,
                now,
                (slots[0], b"".join(raws)),
            )
        )
        for slot in slots:
            self._free(slot)
        return slots

    def restore_tokens(self, tokens: Iterable[tuple[str, int]]) -> None:
        """Put back tokens loaded from the store (recovery): slots in exactly this order."""
        slots: list[int] = []
        run: list[bytes] = []
        created = None
        for token_id, at in tokens:
            if at != created and run:
                slots += self._new_slots(run, created)  # type: ignore[arg-type]
                run = []
            created = at
            run.append(uuid_bytes(token_id, "token_id"))
        if run:
            slots += self._new_slots(run, created)  # type: ignore[arg-type]
        self._index(slots)

    def _mint_tokens(self, count: int, now: int) -> list[str]:
        """New token ids that sort after every token of the pool (see ``ordered_ids``)."""
        if self._ids is not new_id:  # ids given by the caller (tests): as they come
            return sorted(self._ids() for _ in range(count))
        at_ms = now // 1000
        if self._keys:
            at_ms = max(at_ms, (self._keys[-1] >> 16) + 1)  # the newest id's time, +1 ms
        if at_ms >= 1 << 48:  # the pool holds ids past any time: mint at random
            return sorted(new_id() for _ in range(count))
        return ordered_ids(count, at_ms)

    def resize(self, size: int, now: int) -> None:
        """Grow or shrink the pool to ``size`` tokens.

        Growing mints new tokens (sorted by id, the order the stores load them
        in). Shrinking retires available tokens first (the most recently freed),
        then ends the oldest leases (``evicted``) and retires their tokens.
        """
        check_int(size, "size", 1, 10_000_000)
        now = self._tick(now)
        missing = size - self._live
        if missing > 0:
            self.add_tokens(self._mint_tokens(missing, now), now)
        elif missing < 0:
            removed: list[int] = []
            while self._live - len(removed) > size and self._count:
                self._count -= 1
                removed.append(self._ring[(self._head + self._count) % len(self._ring)])
            while self._live - len(removed) > size:
                slot, lease = next(iter(self._leases.items()))
                self.evictions += 1
                self._end(lease, now, EVICTED)
                removed.append(slot)
            for slot in removed:
                self._retired[slot] = 1
                self._text.pop(slot, None)
            self._live -= len(removed)
            self.revision += 1
            self.changes.append((RETIRE, self.revision, now, tuple(removed)))

    def restore_lease(self, lease: LeaseRecord) -> None:
        """Put back a lease loaded from the store (recovery). Load them oldest first.

        ``lease`` is a GRANT record; the caller ends the leases that expired
        meanwhile with ``advance(now)``.
        """
        slot = lease[SLOT]
        if slot in self._leases or lease[USER] in self._by_user:
            raise InvalidArgumentError(f"lease {lease[ID]} collides with a lease already restored")
        self._grant(lease)  # ``restored()`` then rebuilds the ring without its slot
        self.revision = max(self.revision, lease[REV], lease[FENCE])

    def restored(self) -> None:
        """Recovery is done: rebuild the ring from the slots no restored lease holds."""
        leased = self._leases
        free = [s for s in range(len(self._retired)) if not self._retired[s] and s not in leased]
        self._ring = array("I", free)
        self._ring.extend([0] * (len(self._retired) - len(free)))
        self._head = 0
        self._count = len(free)
        self.history_floor = self.revision + 1

    def restore_counters(self, counters: dict[str, int]) -> None:
        """Put back the lifetime counters kept in the store."""
        for name in COUNTERS:
            setattr(self, name, int(counters.get(name, 0)))

    # -- operations that change the pool ------------------------------------

    def activate(self, user_id: str, now: int) -> LeaseRecord:
        """Lease a token to ``user_id`` (rule 1). Raises ``InvalidArgumentError``, ``FullError``."""
        # The hot path of the whole service, hence inlined by hand.
        if now > self._now:
            self._now = now
            self._expires = now + self.ttl_us
            if (self._due and self._due[0][0] <= now) or (
                self._deadlines and self._deadlines[0][0] <= now
            ):
                self._tick(now)
        else:
            now = self._now
        if type(user_id) is str:
            held = self._by_user.get(user_id)
            if held is not None:
                return held  # a key of _by_user was checked when it was granted
        check_user_id(user_id)
        leases = self._leases
        if self._count:
            ring = self._ring
            slot = ring[self._head]
            self._head = (self._head + 1) % len(ring)
            self._count -= 1
            self.revision = fence = self.revision + 1
        elif self.policy == "evict" and leases:
            slot, oldest = next(iter(leases.items()))
            if self.min_hold_us and now - oldest[START] < self.min_hold_us:
                self.refusals += 1
                raise FullError(
                    f"every token is held, none for at least min-hold {self.settings.min_hold:g} s"
                )
            del leases[slot]
            del self._by_user[oldest[USER]]
            self.revision = fence = self.revision + 1
            self.evictions += 1
            self._remember(
                (
                    END,
                    oldest[ID],
                    slot,
                    oldest[USER],
                    oldest[FENCE],
                    oldest[START],
                    now,
                    fence,
                    EVICTED,
                )
            )
        else:
            self.refusals += 1
            if not leases:
                raise FullError("the pool has no tokens")
            raise FullError(f"every token of the pool is held (when-full {self.policy})")
        self.activations += 1
        expires = self._expires
        if self.max_life_us is not None and self.max_life_us < self.ttl_us:
            expires = now + self.max_life_us
        lease_id = self._ids()
        lease: LeaseRecord = (GRANT, lease_id, slot, user_id, fence, now, expires, fence)
        leases[slot] = lease
        self._by_user[user_id] = lease
        due = self._due
        entry = (expires, fence, slot, lease_id)
        if not due or entry > due[-1]:
            due.append(entry)
        else:
            heapq.heappush(self._deadlines, entry)
        if len(due) + len(self._deadlines) > 2 * len(leases) + 64:
            self._compact_deadlines()
        self.changes.append(lease)
        return lease

    def activate_or_wait(
        self, user_id: str, now: int, ticket: object, wait: float | None
    ) -> LeaseRecord | object:
        """``activate``, or queue the caller of a full ``wait`` pool for up to ``wait`` seconds.

        Returns the lease, or ``WAITING``: the lease (or a ``FullError``) then
        appears in ``woken`` with ``ticket``. Without ``wait`` (or with 0) a full
        ``wait`` pool raises ``FullError`` at once, first come first served.
        """
        now = self._tick(now)
        if self.policy != "wait" or not wait or self._count or type(user_id) is not str:
            return self.activate(user_id, now)
        held = self._by_user.get(user_id)
        if held is not None:
            return held
        check_user_id(user_id)
        until = now + max(1, round(wait * _US))
        waiter = Waiter(ticket, user_id, until, now)
        self._waiters[ticket] = waiter
        self._waiting_users[user_id] = self._waiting_users.get(user_id, 0) + 1
        self._wait_seq += 1
        waits = self._wait_deadlines
        heapq.heappush(waits, (until, self._wait_seq, waiter))
        if len(waits) > 2 * len(self._waiters) + 64:
            self._compact_waits()
        self.waiting += 1
        return WAITING

    def cancel_wait(self, ticket: object) -> bool:
        """Take a queued caller off the queue (its caller gave up), in O(1). Whether it
        was queued."""
        waiter = self._waiters.pop(ticket, None)
        if waiter is None:
            return False
        waiter.active = False
        self.waiting -= 1
        self._unqueued(waiter.user_id)
        if len(self._wait_deadlines) > 2 * len(self._waiters) + 64:
            self._compact_waits()
        return True

    def release(self, token_id: str, user_id: str | None, now: int) -> EndRecord:
        """End the token's lease ``released``; returns its END record.

        Raises ``UnknownTokenError``, ``NotActiveError`` (no lease), ``NotHolderError``
        (``user_id`` given and not the holder), ``InvalidArgumentError``.
        """
        slot = self.slot_of(token_id)
        if user_id is not None:
            check_user_id(user_id)
        now = self._tick(now)
        lease = self._leases.get(slot)
        if lease is None:
            raise NotActiveError(f"token {self.token_text(slot)} is not active")
        if user_id is not None and lease[USER] != user_id:
            raise NotHolderError(f"user {user_id!r} does not hold token {self.token_text(slot)}")
        self.releases += 1
        ended = self._end(lease, now, RELEASED)
        self._free(slot)
        return ended

    def release_lease(self, slot: int, lease_id: str, now: int) -> None:
        """End that exact lease ``released`` if it is still current; else do nothing.

        The undo for a grant whose caller was cancelled before it saw the reply.
        """
        now = self._tick(now)
        lease = self._leases.get(slot)
        if lease is not None and lease[ID] == lease_id:
            self.releases += 1
            self._end(lease, now, RELEASED)
            self._free(slot)

    def renew(self, token_id: str, lease_id: str, now: int) -> LeaseRecord:
        """Move the lease's ``expires_at`` to ``now + ttl`` (capped by ``max_lifetime``).

        Raises ``NotHolderError`` when that lease is not the token's current one
        (it ended, or another lease replaced it), ``UnknownTokenError``,
        ``InvalidArgumentError``.
        """
        lease_id = uuid_text(uuid_bytes(lease_id, "lease_id"))
        slot = self.slot_of(token_id)
        now = self._tick(now)
        lease = self._leases.get(slot)
        if lease is None or lease[ID] != lease_id:
            raise NotHolderError(
                f"lease {lease_id} is not the current lease of token {self.token_text(slot)}"
            )
        expires = self._expires
        if self.max_life_us is not None:
            expires = min(expires, lease[START] + self.max_life_us)
        expires = max(expires, lease[STOP]) if self.max_life_us is not None else expires
        self.revision += 1
        renewed: LeaseRecord = (
            RENEW,
            lease[ID],
            slot,
            lease[USER],
            lease[FENCE],
            lease[START],
            expires,
            self.revision,
        )
        # Replace in place: renewing keeps the lease's place in activation order.
        self._leases[slot] = renewed
        self._by_user[lease[USER]] = renewed
        self._push_deadline(renewed)
        self.renewals += 1
        self.changes.append(renewed)
        return renewed

    def clear(self, now: int, limit: int | None = None, before: int | None = None) -> int:
        """End active leases ``cleared``, oldest first; return how many.

        At most ``limit`` of them (all by default), and only those granted at or before
        revision ``before`` (by default the revision now): a caller ends many leases a
        step at a time, and leases granted between its steps are not ended.
        """
        now = self._tick(now)
        cutoff = self.revision if before is None else before
        ending: list[LeaseRecord] = []
        for lease in self._leases.values():  # activation order: fences only grow
            if lease[FENCE] > cutoff or len(ending) == limit:
                break
            ending.append(lease)
        self.clears += len(ending)
        for lease in ending:
            self._end(lease, now, CLEARED)
            self._free(lease[SLOT])
        return len(ending)

    def end_all(self, now: int) -> int:
        """``clear``, and refuse every queued caller: the pool is being dropped."""
        count = self.clear(now)
        for waiter in list(self._waiters.values()):
            self._refuse_waiter(waiter, "the pool was dropped")
        self._wait_deadlines.clear()
        return count

    def end_waits(self) -> list[object]:
        """Take every queued caller off the queue (the pool is closing); their tickets."""
        tickets = list(self._waiters)
        for waiter in self._waiters.values():
            waiter.active = False
        self._waiters.clear()
        self._wait_deadlines.clear()
        self._waiting_users.clear()
        self.waiting = 0
        return tickets

    # -- reads ------------------------------------------------------------------

    def validate(self, token_id: str, lease_id: str) -> bool:
        """Whether that lease is the token's current one. Raises ``UnknownTokenError``."""
        lease_id = uuid_text(uuid_bytes(lease_id, "lease_id"))
        lease = self._leases.get(self.slot_of(token_id))
        return lease is not None and lease[ID] == lease_id

    def token(self, token_id: str) -> tuple[int, LeaseRecord | None]:
        """One token: its slot and its lease (``None`` when available)."""
        slot = self.slot_of(token_id)
        return slot, self._leases.get(slot)

    def tokens_page(self, cursor: int, count: int) -> tuple[int, Pairs]:
        """The live tokens among the ``count`` slots from ``cursor`` on, in creation order.

        Returns the next cursor (0 once the last slot was passed, as Redis's SCAN)
        and (slot, lease or None) pairs. Built with C-level iteration (about 50 ns a
        token): a page of 10,000 costs the actor well under a millisecond.
        """
        check_int(count, "count", 1, TOKENS_MAX)
        end = len(self._retired)
        start = min(max(0, cursor), end)
        stop = min(end, start + count)
        live = self._retired[start:stop].translate(_LIVE)
        # Slots as an array, not a list of ints: a page waiting on a slow reader must not
        # leave ten thousand objects for every garbage collection to walk.
        slots = array("I", compress(range(start, stop), live))
        return (stop if stop < end else 0), Pairs(slots, list(map(self._leases.get, slots)))

    def lease_of(self, user_id: str) -> LeaseRecord | None:
        """The user's active lease record, or ``None``."""
        return self._by_user.get(check_user_id(user_id))

    def history(
        self, token_id: str, limit: int = 100, before: int | None = None
    ) -> tuple[list[EndRecord], int]:
        """The token's ended leases kept in memory, newest first, revision below ``before``.

        Returns the entries and ``store_before``: when the page is not full and
        older entries may exist only in the store, the revision below which the
        store must be read (0 when memory has answered for everything).
        """
        HISTORY_LIMIT.check(limit)
        slot = self.slot_of(token_id, retired=True)  # a token retired by a shrink too
        return self._page(self._by_slot.get(slot), limit, before)

    def user_history(
        self, user_id: str, limit: int = 100, before: int | None = None
    ) -> tuple[list[EndRecord], int]:
        """As ``history``, for the leases one user held (on any token)."""
        HISTORY_LIMIT.check(limit)
        return self._page(self._user_history.get(check_user_id(user_id)), limit, before)

    def _page(
        self, entries: bytearray | None, limit: int, before: int | None
    ) -> tuple[list[EndRecord], int]:
        if before is not None:
            BEFORE.check(before)
        cap = before if before is not None else 2**63
        page: list[EndRecord] = []
        if entries:
            with memoryview(entries) as raw, raw.cast("q") as revs:
                stop = bisect_left(revs, cap) if before is not None else len(revs)
                chosen = revs[max(0, stop - limit) : stop].tolist()
            ended = self._ended
            page = [ended.get(rev) for rev in reversed(chosen)]
        if len(page) >= limit:
            return page, 0
        lowest = page[-1][REV] if page else cap
        store_before = min(lowest, self.history_floor)
        return page, (store_before if store_before > 1 else 0)

    def leases(self) -> list[LeaseRecord]:
        """Every active lease record, oldest activation first."""
        return list(self._leases.values())

    def token_ids(self) -> list[str]:
        """Every live token id, in creation order."""
        return [self.token_text(s) for s in range(len(self._retired)) if not self._retired[s]]

    def slots(self) -> list[tuple[int, str, int]]:
        """(slot, token id, created) of every live token, for the store process."""
        return [
            (s, self.token_text(s), self._created[s])
            for s in range(len(self._retired))
            if not self._retired[s]
        ]

    def counters(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS}

    @property
    def active(self) -> int:
        return len(self._leases)

    @property
    def available(self) -> int:
        return self._count

    # -- internals --------------------------------------------------------------

    def _grant(self, lease: LeaseRecord) -> None:
        self._leases[lease[SLOT]] = lease
        self._by_user[lease[USER]] = lease
        self._push_deadline(lease)

    def _push_deadline(self, lease: LeaseRecord) -> None:
        entry = (lease[STOP], lease[FENCE], lease[SLOT], lease[ID])
        due = self._due
        if not due or entry > due[-1]:  # a renewal keeps its fence: order by both
            due.append(entry)
        else:
            heapq.heappush(self._deadlines, entry)
        if len(due) + len(self._deadlines) > 2 * len(self._leases) + 64:
            self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        # Stale entries (ended or renewed leases) outnumber live ones: rebuild
        # from the live leases, O(n log n) once per n pushes, all in the queue.
        self._due = deque(
            sorted([(x[STOP], x[FENCE], x[SLOT], x[ID]) for x in self._leases.values()])
        )
        self._deadlines = []

    def _end(self, lease: LeaseRecord, ended_at: int, reason: str) -> EndRecord:
        slot = lease[SLOT]
        del self._leases[slot]
        del self._by_user[lease[USER]]
        self.revision += 1
        ended = (
            END,
            lease[ID],
            slot,
            lease[USER],
            lease[FENCE],
            lease[START],
            ended_at,
            self.revision,
            reason,
        )
        self._remember(ended)
        return ended

    def _free(self, slot: int) -> None:
        """A token became available: the first queued caller gets it, else the ring."""
        waiters = self._waiters
        while waiters:  # only live waiters are queued: the first takes it (or holds one)
            _ticket, waiter = waiters.popitem(last=False)
            waiter.active = False
            self.waiting -= 1
            self._unqueued(waiter.user_id)
            held = self._by_user.get(waiter.user_id)
            if held is not None:  # granted to an earlier waiter of the same user
                self.woken.append((waiter.ticket, held))
                continue
            self.revision = fence = self.revision + 1
            self.activations += 1
            now = self._now
            expires = now + self.ttl_us
            if self.max_life_us is not None:
                expires = min(expires, now + self.max_life_us)
            lease: LeaseRecord = (
                GRANT,
                self._ids(),
                slot,
                waiter.user_id,
                fence,
                now,
                expires,
                fence,
            )
            self._grant(lease)
            self.changes.append(lease)
            self.woken.append((waiter.ticket, lease))
            self.wait_grants += 1
            self.waited_us += now - waiter.since
            if waiter.user_id in self._waiting_users:
                self._wake_same_user(lease)
            return
        self._push_free(slot)

    def _unqueued(self, user_id: str) -> None:
        left = self._waiting_users[user_id] - 1
        if left:
            self._waiting_users[user_id] = left
        else:
            del self._waiting_users[user_id]

    def _wake_same_user(self, lease: LeaseRecord) -> None:
        """The user of ``lease`` waits more than once (a client's retry, HTTP and RESP):
        every other wait of theirs is answered with it now, as an activation of a user
        who holds a lease is. They waited on until a token freed for each, or timed
        out ``FULL`` while the user held one (outside probe). A walk of the queue, only
        when a user waits twice."""
        user_id = lease[USER]
        for ticket, waiter in [(t, w) for t, w in self._waiters.items() if w.user_id == user_id]:
            del self._waiters[ticket]
            waiter.active = False
            self.waiting -= 1
            self.woken.append((ticket, lease))
        del self._waiting_users[user_id]

    def _compact_waits(self) -> None:
        # Entries of waiters gone (granted, cancelled) outnumber live ones: rebuild.
        waits = [entry for entry in self._wait_deadlines if entry[2].active]
        heapq.heapify(waits)
        self._wait_deadlines = waits

    def _refuse_waiter(self, waiter: Waiter, why: str) -> None:
        self._waiters.pop(waiter.ticket, None)
        waiter.active = False
        self.waiting -= 1
        self._unqueued(waiter.user_id)
        self.refusals += 1
        self.woken.append((waiter.ticket, FullError(f"every token of the pool is held: {why}")))

    def _remember(self, ended: EndRecord) -> None:
        self.changes.append(ended)
        history = self._ended
        history.append(ended)
        packed = _PACK(ended[REV])
        per_slot = self._by_slot.get(ended[SLOT])
        if per_slot is None:
            self._by_slot[ended[SLOT]] = bytearray(packed)
        else:
            per_slot += packed
        per_user = self._user_history.get(ended[USER])
        if per_user is None:
            self._user_history[ended[USER]] = bytearray(packed)
        else:
            per_user += packed
        if len(history) > self.history_memory + self._history_slack:
            self._trim_history()

    def _trim_history(self) -> None:
        """Forget the oldest ended leases past ``history_memory``.

        The oldest entry of the pool is also the oldest of its token and of its
        user, so trimming from the front keeps every per-token and per-user
        index a complete suffix: memory holds everything from ``history_floor`` up.
        Done every ``_history_slack`` (at most 256) ended leases, so one trim is a
        short step of the actor's batch, never a pause (12,500 at a time took 30 ms).
        """
        history = self._ended
        revs, slots, users = history.drop_oldest(len(history) - self.history_memory)
        if not revs:
            return
        by_slot = self._by_slot
        for slot, n in Counter(slots).items():
            entries = by_slot[slot]
            del entries[: n * _REV_BYTES]
            if not entries:
                del by_slot[slot]
        by_user = self._user_history
        for user, n in Counter(users).items():
            entries = by_user[user]
            del entries[: n * _REV_BYTES]
            if not entries:
                del by_user[user]
        self.history_floor = max(self.history_floor, revs[-1] + 1)

    def statistics(self) -> dict[str, Any]:
        """Sizes of the internal structures (for tests and ``INFO``)."""
        return {
            "deadlines": len(self._due) + len(self._deadlines),
            "history_in_memory": len(self._ended),
            "history_floor": self.history_floor,
            "waiters_queued": len(self._waiters),
            "wait_deadlines": len(self._wait_deadlines),
        }
