"""Issue 19's HTTP attacks against a real server: the bound on listings nobody reads, and
a short run of every attack (``tests/chaos/http_hostile.py``; ``make chaos`` runs them at
the sizes issue 19 measured). The real-browser half of the cross-site and rebinding
attacks is ``tests/test_browser_safety.py``."""

from __future__ import annotations

import time

import attrs
import httpx
import trio

from tests.chaos import http_hostile
from tests.test_http import serving


def test_listings_nobody_reads_take_a_bounded_memory() -> None:
    """200 clients ask ``GET /api/tokens`` of a pool of 10,000 held tokens (1.5 MB each)
    and never read: the server fetches, builds and holds at most ``LARGE_REPLIES`` of them
    at once (before that bound, the same attack grew it by 340 MB), and lists again once
    they go."""
    args = ("--dsn", "memory", "--size", "10000", "--ttl", "3600", "--idle-timeout", "2")
    args += ("--http-workers", "0")  # in-process; through workers: the chaos run's rows
    with serving(*args) as server:
        trio.run(http_hostile.fill, server.port, 10_000)
        memory = http_hostile.TreeMemory(server.pid)
        time.sleep(1)
        before = memory.samples[-1][1]
        sizes = attrs.evolve(http_hostile.Sizes.short(), listings=200)
        trio.run(http_hostile.unread_listings, server.http_port or 0, sizes, 4.0)
        time.sleep(3)  # the listings still queued are answered, to closed connections
        memory.stop()
        grew = (memory.peak(0, time.time()) - before) / 2**20
        assert grew < 100, f"the server grew {grew:.0f} MB"  # issue 19's goal
        with httpx.Client(base_url=f"http://127.0.0.1:{server.http_port}", timeout=30) as c:
            listing = c.get("/api/tokens")
        assert 200 == listing.status_code
        assert 10_000 == len(listing.json()["data"])
