"""Hash slots, as Redis Cluster has them: which slot a pool is in, and how slots spread.

Pure: no I/O, no clock. A pool's slot is the CRC16 (XMODEM: polynomial 0x1021, initial
value 0) of its name modulo 16,384, as Redis hashes a key, with Redis's hash tag rule:
when the name holds a ``{`` followed later by a ``}`` with at least one character
between them, only what is between the first ``{`` and the first ``}`` after it is
hashed (``{gpu}.a`` and ``{gpu}.b`` share a slot; ``{}x`` and ``x{`` hash whole).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

SLOTS = 16_384
"""Hash slots in a cluster (Redis Cluster's number)."""


def _table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _table()


def crc16(data: bytes) -> int:
    """CRC16/XMODEM of ``data`` (Redis Cluster's ``crc16``)."""
    crc = 0
    table = _TABLE
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ table[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hashed_part(key: bytes) -> bytes:
    """The part of ``key`` that is hashed: its hash tag if it has a non-empty one."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(name: str | bytes) -> int:
    """The hash slot of a pool name (its UTF-8 bytes, as a Redis client sends it)."""
    data = name.encode() if isinstance(name, str) else name
    return crc16(hashed_part(data)) & (SLOTS - 1)


def ranges(slots: Iterable[int]) -> list[tuple[int, int]]:
    """Slots as sorted inclusive ranges: ``[0, 1, 2, 7]`` -> ``[(0, 2), (7, 7)]``."""
    out: list[tuple[int, int]] = []
    for slot in sorted(set(slots)):
        if out and out[-1][1] == slot - 1:
            out[-1] = (out[-1][0], slot)
        else:
            out.append((slot, slot))
    return out


def shares(nodes: Sequence[str]) -> dict[str, int]:
    """How many slots each live node should own for an even spread: ``SLOTS // n``
    each, one more for the first ``SLOTS % n`` of them in id order (so every node
    computes the same answer from the same list)."""
    ordered = sorted(set(nodes))
    if not ordered:
        return {}
    base, extra = divmod(SLOTS, len(ordered))
    return {node: base + (1 if i < extra else 0) for i, node in enumerate(ordered)}


def claims(free: Sequence[int], deficits: dict[str, int], me: str) -> list[int]:
    """Which of the ``free`` slots (sorted) ``me`` should take, when each node in
    ``deficits`` lacks that many of its share: the free slots are cut in consecutive
    runs, one per node in id order, so nodes that take at the same moment from the
    same map mostly take different slots (the database settles any overlap)."""
    start = 0
    for node in sorted(deficits):
        want = max(0, deficits[node])
        if node == me:
            return list(free[start : start + want])
        start += want
    return []


def balance(
    me: str,
    owners: Sequence[str | None],
    live: set[str],
    serving: Sequence[str],
    give_step: int,
) -> tuple[list[int], list[int]]:
    """What ``me`` should do in one round, from the slot map: (slots to take, slots to
    give up). ``owners``: each slot's owner (``None``: nobody); ``live``: the nodes whose
    lease holds; ``serving``: the live nodes that take slots (not draining). A node
    under its share claims free slots (nobody's, or a node's that is not live); a node
    over its share gives up to ``give_step`` slots (its highest) while another serving
    node is under its share."""
    share = shares(serving)
    counts = Counter(owners)
    mine, target = counts.get(me, 0), share.get(me, 0)
    if mine < target:
        free = [slot for slot, owner in enumerate(owners) if owner is None or owner not in live]
        deficits = {node: share[node] - counts.get(node, 0) for node in share}
        return claims(free, deficits, me), []
    if mine > target and any(counts.get(n, 0) < share[n] for n in share if n != me):
        held = [slot for slot, owner in enumerate(owners) if owner == me]
        return [], sorted(held, reverse=True)[: min(mine - target, give_step)]
    return [], []
