"""Two real servers over one store: the first, once it cannot show it still owns the
store, never vouches for a lease (VALIDATE, TOKEN, LEASE) after the second grants.

Ownership is a lease renewed by proofs (``OWNERSHIP_INTERVAL``), valid for
``OWNERSHIP_VALIDITY`` from when each proof was sent; a new owner whose predecessor
did not release the store waits that long before it vouches.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.chaos.server import Process, running
from tokenpool._store import OWNERSHIP_INTERVAL, OWNERSHIP_VALIDITY

ARGS = ("--size", "1", "--ttl", "3600", "--when-full", "evict")


def store_child(server: Process) -> int:
    """The pid of the server's store process (``python -m tokenpool._store.child``)."""
    for task in os.listdir(f"/proc/{server.pid}/task"):
        for pid in Path(f"/proc/{server.pid}/task/{task}/children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"tokenpool._store.child" in cmdline:
                return int(pid)
    raise AssertionError("no store process found")


@contextmanager
def client(server: Process) -> Iterator[redis.Redis]:
    r = redis.Redis(port=server.port, socket_timeout=10)
    try:
        yield r
    finally:
        r.close()


def fields(reply: Any) -> dict[str, str]:
    def text(x: object) -> str:
        return x.decode() if isinstance(x, bytes) else str(x)

    return {text(k): text(v) for k, v in reply.items()}


def activate(r: redis.Redis, user: str) -> dict[str, str]:
    return fields(r.execute_command("ACTIVATE", user))


def granted_eventually(r: redis.Redis, user: str, seconds: float = 10) -> dict[str, str]:
    """Activate ``user``, retrying while the pool cannot vouch yet (a new owner)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return activate(r, user)
        except redis.ResponseError as error:
            if "UNAVAILABLE" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def vouching_answers(r: redis.Redis, lease: dict[str, str]) -> list[str]:
    """What VALIDATE, TOKEN and LEASE answer for alice's lease: each reply, or its error."""
    asks: list[tuple[str, ...]] = [
        ("VALIDATE", lease["token_id"], lease["id"]),
        ("TOKEN", lease["token_id"]),
        ("LEASE", "alice"),
    ]
    out = []
    for ask in asks:
        try:
            out.append(f"{ask[0]}: {r.execute_command(*ask)!r}")
        except redis.ResponseError as error:
            out.append(f"{ask[0]}: {str(error).split()[0]}")
    return out


REFUSED = ["VALIDATE: UNAVAILABLE", "TOKEN: UNAVAILABLE", "LEASE: UNAVAILABLE"]


def two_holders_check(url: str, lose: Callable[[Process, dict[str, str]], None]) -> None:
    """The first server grants alice; ``lose`` takes its ownership away; a second server
    grants alice's token to bob; the first must then refuse everything that vouches."""
    with running("--dsn", url, *ARGS) as first, client(first) as r1:
        alice = activate(r1, "alice")
        assert 1 == r1.execute_command("VALIDATE", alice["token_id"], alice["id"])
        lose(first, alice)
        with running("--dsn", url, *ARGS) as second, client(second) as r2:
            bob = granted_eventually(r2, "bob")
            assert alice["token_id"] == bob["token_id"]  # alice's token, evicted to bob
            assert REFUSED == vouching_answers(r1, alice)


def kill_store_process(server: Process, _lease: dict[str, str]) -> None:
    os.kill(store_child(server), signal.SIGKILL)


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_killed_store_process_never_leaves_two_holders(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'pool.db'}"
        if kind == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    two_holders_check(url, kill_store_process)


def test_a_replaced_sqlite_file_never_leaves_two_holders(tmp_path: Path) -> None:
    """Another file (a copy holding alice's lease) renamed over the first server's: the
    second server owns the new file at once; the first stops vouching within the
    validity, before the second (which finds the pool not released) vouches."""
    path = tmp_path / "pool.db"

    def replace(_server: Process, _lease: dict[str, str]) -> None:
        copy = tmp_path / "copy.db"
        source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        target = sqlite3.connect(copy)
        source.backup(target)
        source.close()
        target.close()
        os.replace(copy, path)

    two_holders_check(f"sqlite:///{path}", replace)


def test_a_paused_store_process_stops_vouching_and_resumes(tmp_path: Path) -> None:
    """SIGSTOP on the store process: no proof comes back, so past the validity the server
    answers UNAVAILABLE to what vouches; after SIGCONT the proofs renew it."""
    with (
        running("--dsn", f"sqlite:///{tmp_path / 'pool.db'}", *ARGS) as server,
        client(server) as r,
    ):
        alice = activate(r, "alice")
        child = store_child(server)
        os.kill(child, signal.SIGSTOP)
        try:
            time.sleep(OWNERSHIP_VALIDITY + 0.3)
            assert REFUSED == vouching_answers(r, alice)
        finally:
            os.kill(child, signal.SIGCONT)
        time.sleep(OWNERSHIP_INTERVAL + 0.5)
        assert 1 == r.execute_command("VALIDATE", alice["token_id"], alice["id"])


def test_a_sqlite_file_with_a_second_hard_link_is_refused(tmp_path: Path) -> None:
    """SQLite keeps its write-ahead log beside the name a file is opened by: after a
    crash, a server started on a hard link missed the leases still in the log (fences
    went back) and a later start on the first name replayed them over newer ones (an
    outside probe). A file with two names is refused, by either name, and served again
    once the other name is gone."""
    import trio

    import tokenpool

    first = tmp_path / "a" / "pool.db"
    link = tmp_path / "b" / "hard.db"

    async def lease_of_ann(path: Path) -> object:
        async with tokenpool.open_pool(size=2, store=f"sqlite:///{path}") as pool:
            if await pool.lease_of("ann") is None:
                await pool.activate("ann")
            return await pool.lease_of("ann")

    lease = trio.run(lease_of_ann, first)
    link.parent.mkdir()
    os.link(first, link)
    for name in (link, first):
        with pytest.raises(tokenpool.PoolLockedError, match="2 names"):
            trio.run(lease_of_ann, name)
    os.unlink(link)
    assert lease == trio.run(lease_of_ann, first)


def test_a_database_in_a_directory_it_cannot_write_names_the_directory(tmp_path: Path) -> None:
    """An existing file whose directory cannot be written opens, but SQLite cannot make
    its -wal file: the refusal says so (it said only "unable to open database file")."""
    import subprocess

    import trio

    import tokenpool
    from tokenpool._store import StoreError

    folder = tmp_path / "fixed"
    folder.mkdir()
    path = folder / "pool.db"

    async def activate() -> None:
        async with tokenpool.open_pool(size=2, store=f"sqlite:///{path}") as pool:
            await pool.activate("ann")

    trio.run(activate)
    for leftover in folder.glob("pool.db-*"):
        leftover.unlink()
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here (a root user ignores a read-only mode)")
    try:
        with pytest.raises(StoreError, match="is its directory writable"):
            trio.run(activate)
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
