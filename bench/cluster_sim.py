"""Cluster mode on paper: ownership balance and failover time for many nodes and pools.

``python -m bench.cluster_sim [NODES] [POOLS] [TRIALS]`` (default 100 nodes, 10,000
pools, 200 failovers) drives the nodes' real balancing rule (``slots.balance``, the
function each node's task calls every round) against a simulated ``cluster_slots``
table that keeps the database's rules (a slot is taken only when free; one owner).

- **Joining**: the nodes join one after another, each round every node in a random
  order applies the rule, until the slots are spread; it prints the rounds, the slots
  and pools moved, and the pools per node at the end.
- **Failover**: one node, chosen at random, dies; the survivors' rounds come at random
  phases of the renewal interval once its lease has expired (it expires between
  ``validity - renew`` and ``validity`` after the kill, depending on when it last
  renewed); each survivor that takes slots recovers their pools, at the rate measured
  by ``python -m bench.recovery`` on PostgreSQL (3,000 pools in 3.7 s: 1.23 ms a pool)
  plus a fixed cost per take (the transaction, listing the pools, opening them: 30 ms).
  It prints the time until the last of the dead node's pools is served again.
"""

from __future__ import annotations

import random
import statistics
import sys

from tokenpool._cluster.node import GIVE_STEP
from tokenpool._cluster.slots import SLOTS, balance, key_slot

VALIDITY = 3.0  # the defaults of --cluster-validity and --cluster-renew
RENEW = 1.0
PER_POOL = 3.7 / 3000  # seconds to recover one pool (bench.recovery, PostgreSQL)
PER_TAKE = 0.030  # seconds per take: the transaction, listing and opening the pools


def round_of(owners: list[str | None], nodes: list[str], live: set[str], rng: random.Random) -> int:
    """One round of every node (random order), each seeing the table as it is then;
    the slots that changed owner."""
    moved = 0
    for node in rng.sample(nodes, len(nodes)):
        take, give = balance(node, owners, live, sorted(live), GIVE_STEP)
        for slot in take:
            if owners[slot] is None or owners[slot] not in live:  # the database's check
                owners[slot] = node
                moved += 1
        for slot in give:
            owners[slot] = None
    return moved


def join(count: int, pools: list[int], rng: random.Random) -> list[str | None]:
    owners: list[str | None] = [None] * SLOTS
    nodes: list[str] = []
    rounds = moved = 0
    for i in range(count):
        nodes.append(f"node{i:03d}")
        live = set(nodes)
        while True:
            changed = round_of(owners, nodes, live, rng)
            rounds += 1
            moved += changed
            if not changed:
                break
    per_node = {n: 0 for n in nodes}
    slots_per = {n: 0 for n in nodes}
    for owner in owners:
        assert owner is not None
        slots_per[owner] += 1
    for slot in pools:
        owner = owners[slot]
        assert owner is not None
        per_node[owner] += 1
    counts = sorted(per_node.values())
    print(
        f"joining {count} nodes one by one: {rounds} rounds, {moved:,} slot moves"
        f" (each a release, then an acquire); slots per node {min(slots_per.values())}"
        f" to {max(slots_per.values())}; pools per node min {counts[0]}, median"
        f" {statistics.median(counts):g}, max {counts[-1]} (mean {len(pools) / count:g})"
    )
    return owners


def failover(owners: list[str | None], pools: list[int], rng: random.Random) -> float:
    owners = list(owners)
    nodes = sorted({o for o in owners if o is not None})
    dead = rng.choice(nodes)
    survivors = [n for n in nodes if n != dead]
    live = set(survivors)
    expired = VALIDITY - rng.uniform(0.0, RENEW)  # it last renewed up to RENEW before
    phase = {n: rng.uniform(0.0, RENEW) for n in survivors}
    lost = [slot for slot, owner in enumerate(owners) if owner == dead]
    served_at: dict[int, float] = {}
    start = expired
    while len(served_at) < len(lost):
        for node in sorted(survivors, key=phase.__getitem__):
            now = start + phase[node]
            take, _give = balance(node, owners, live, survivors, GIVE_STEP)
            taken = [s for s in take if owners[s] == dead or owners[s] is None]
            for slot in taken:
                owners[slot] = node
            if taken:
                moved_pools = sum(1 for p in pools if p in set(taken))
                done = now + PER_TAKE + moved_pools * PER_POOL
                for slot in taken:
                    served_at[slot] = done
        start += RENEW
    pool_slots = [p for p in pools if p in set(lost)]
    return max((served_at[s] for s in pool_slots), default=0.0)


def main(argv: list[str]) -> int:
    count = int(argv[1]) if len(argv) > 1 else 100
    pool_count = int(argv[2]) if len(argv) > 2 else 10_000
    trials = int(argv[3]) if len(argv) > 3 else 200
    rng = random.Random(20)
    pools = [key_slot(f"pool{i}") for i in range(pool_count)]
    owners = join(count, pools, rng)
    times = sorted(failover(owners, pools, rng) for _ in range(trials))
    p50 = statistics.median(times)
    p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
    print(
        f"failover of one node of {count} ({pool_count:,} pools; validity {VALIDITY:g} s,"
        f" renew {RENEW:g} s), {trials} trials: every pool of the dead node served again"
        f" after {p50:.2f} s (median), {p99:.2f} s (p99), {times[-1]:.2f} s (worst)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
