"""/metrics: what one scrape may cost."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

import tokenpool
from tokenpool._metrics import Latencies, TokenpoolCollector, render


async def test_a_metrics_scrape_lists_at_most_100_pools_and_is_shared() -> None:
    """Per-pool series for the 100 largest pools only (plus how many pools there are),
    and scrapes within a second share one render."""
    declared = {f"p{n:03}": tokenpool.PoolSettings(size=1 + n, ttl=60) for n in range(150)}
    async with tokenpool.open_pools(declared=declared) as pools:
        registry = CollectorRegistry()
        registry.register(TokenpoolCollector(lambda: pools, dict, Latencies()))
        text = render(registry).decode()
        sizes = [line for line in text.splitlines() if line.startswith("tokenpool_pool_size{")]
        assert 100 == len(sizes)
        assert 'tokenpool_pool_size{pool="p149"} 150.0' in sizes
        assert not any('pool="p049"' in line for line in sizes)  # among the 50 smallest
        assert "tokenpool_pools 150.0" in text
        await pools.get("p149").activate("a")
        assert text == render(registry).decode()  # within a second: the same render
