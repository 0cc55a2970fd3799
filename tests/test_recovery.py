"""Recovery of many pools at start: in bulk, with every recovery rule kept per pool."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import tokenpool
from tokenpool import Clock, PoolSettings, Reason

T0 = datetime(2030, 1, 1, tzinfo=UTC)
POOLS = 300


def _settings(i: int) -> PoolSettings:
    """Pools of every kind: short and long TTLs, each when_full rule, a hold."""
    return PoolSettings.make(
        size=2 + i % 3,
        ttl=60.0 if i % 2 else 86_400.0,
        when_full=("evict", "reject", "wait")[i % 3],
        min_hold=float(i % 4),
    )


async def _fill(url: str) -> dict[str, tokenpool.Lease]:
    declared = {f"p{i}": _settings(i) for i in range(POOLS)}
    async with tokenpool.open_pools(url, declared=declared, clock=Clock(T0)) as pools:
        return {name: await pools.get(name).activate(f"u{name}") for name in declared}


async def test_many_pools_are_recovered_with_their_leases_and_settings(store_url: str) -> None:
    leases = await _fill(store_url)
    later = Clock(T0 + timedelta(hours=2))  # the 60 s leases expired meanwhile
    async with tokenpool.open_pools(store_url, clock=later) as pools:
        assert sorted(leases) == sorted(pools.names())
        for i in range(POOLS):
            name, lease = f"p{i}", leases[f"p{i}"]
            pool = pools.get(name)
            assert _settings(i) == pool.settings
            assert 2 + i % 3 == (await pool.stats()).size
            if i % 2:  # expired while down: ended at its deadline
                assert await pool.lease_of(f"u{name}") is None
                (usage,) = await pool.history(lease.token_id)
                assert (lease.id, Reason.EXPIRED, lease.expires_at) == (
                    usage.id,
                    usage.reason,
                    usage.ended_at,
                )
            else:
                assert lease == await pool.lease_of(f"u{name}")
                assert await pool.validate(lease.token_id, lease.id)


async def test_recovery_asks_the_store_process_a_bounded_number_of_times(store_url: str) -> None:
    """Listing and opening 300 pools is a couple of requests, not one (or more) per pool."""
    await _fill(store_url)
    async with tokenpool.open_pools(store_url, clock=Clock(T0)) as pools:
        assert POOLS == len(pools.names())
        assert pools.link is not None
        assert pools.link.requests <= 4  # list, one open for all, perhaps an ownership proof
