"""The systems a user would pick instead of tokenpool, set up with the same rules.

- Redis + a Lua script (``redis_pool.lua``): one ``EVALSHA`` per activation.
- PostgreSQL only (``pg_pool.sql``): one transaction per activation, tokens taken
  with ``FOR UPDATE SKIP LOCKED``.

Both keep one lease per user, evict the oldest lease when the pool is full and
write a history entry for every ended lease, as tokenpool does.
"""

from __future__ import annotations

import uuid
from importlib import resources

import psycopg
import redis

from ._services import DSN

HISTORY_KEPT = 1000


def redis_pool(port: int, size: int) -> str:
    """Empty the Redis on ``port``, mint ``size`` tokens, load the script; return its SHA."""
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        client.flushall()
        tokens = [str(uuid.uuid4()) for _ in range(size)]
        for i in range(0, size, 10_000):
            client.rpush("tp:free", *tokens[i : i + 10_000])
        source = resources.files(__package__).joinpath("redis_pool.lua").read_text()
        return str(client.script_load(source))
    finally:
        client.close()


def redis_activate(sha: str, ttl: float) -> list[str]:
    """The redis-benchmark command of one activation of a random user."""
    return ["EVALSHA", sha, "0", "__rand_int__", str(ttl), str(HISTORY_KEPT)]


def pg_pool(schema: str, size: int) -> None:
    """Create the PostgreSQL-only pool in ``schema`` with ``size`` tokens."""
    source = resources.files(__package__).joinpath("pg_pool.sql").read_text()
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'SET search_path TO "{schema}"')
        conn.execute(source.encode())  # our own file, not user input
        with conn.cursor().copy("COPY tokens (id, freed) FROM STDIN") as copy:
            for i in range(size):
                copy.write_row((uuid.uuid4(), i))
        conn.execute("SELECT setval('freed_seq', %s)", (size,))
        conn.execute("VACUUM ANALYZE tokens")


def pg_script(ttl: float) -> str:
    """The pgbench script of one activation of a random user among ``:users``."""
    return f"\\set uid random(1, :users)\nSELECT * FROM activate(:uid::text, '{ttl} s');\n"


def pg_options(schema: str, synchronous_commit: bool) -> str:
    """``PGOPTIONS`` for pgbench's sessions: the pool's schema and the commit mode."""
    commit = "on" if synchronous_commit else "off"
    return f"-c search_path={schema} -c synchronous_commit={commit}"


def pg_counts(schema: str) -> dict[str, int]:
    """Leases and history rows of the PostgreSQL-only pool (the bench checks its work)."""
    with psycopg.connect(DSN) as conn:
        leases = conn.execute(f'SELECT count(*) FROM "{schema}".leases').fetchone()
        history = conn.execute(f'SELECT count(*) FROM "{schema}".history').fetchone()
    return {"leases": leases[0] if leases else 0, "history": history[0] if history else 0}
