"""A pool process for crash tests: activates from 8 tasks and prints each acknowledged lease.

    python -m tests.crash_worker STORE_URL DURABILITY

Each line is ``ACK <monotonic time> <lease id> <token id> <fence>``, flushed at once,
so the test knows exactly what was acknowledged before it sent SIGKILL.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time

import trio

import tokenpool


async def main(url: str, durability: str) -> None:
    async with tokenpool.open_pool(size=20, ttl=600, store=url, durability=durability) as pool:
        print("READY", flush=True)
        counter = itertools.count()

        async def client() -> None:
            while True:
                try:
                    lease = await pool.activate(f"user-{next(counter)}")
                except tokenpool.UnavailableError:  # backlog full: the writer is behind
                    await trio.sleep(0.01)
                    continue
                sys.stdout.write(
                    f"ACK {time.monotonic()} {lease.id} {lease.token_id} {lease.fence}\n"
                )
                sys.stdout.flush()
                await trio.sleep(0.001)  # a busy service (some thousands a second), not a flood

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(client)


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    trio.run(main, sys.argv[1], sys.argv[2])
