"""Write-behind persistence and recovery, against a real PostgreSQL and a real SQLite file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

import tokenpool
from tokenpool import Clock, PoolLockedError, Reason
from tokenpool._ops import GetHistory

from .dbutil import execute, query

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

ACTIVE = "SELECT lease_id, token_id FROM lease_assignments WHERE lease_id IS NOT NULL"


async def settle(pool: tokenpool.Pool) -> None:
    """Wait (real time, briefly) until the writer has committed everything queued."""
    with trio.fail_after(10):
        await pool.flush()


async def test_restart_keeps_tokens_leases_history_and_counters(store_url: str) -> None:
    async with tokenpool.open_pool(size=3, ttl=600, store=store_url) as pool:
        tokens = [t.id for t in await pool.tokens()]
        a = await pool.activate("alice")
        b = await pool.activate("bob")
        await pool.renew(b.token_id, b.id)
        await pool.release(a.token_id, "alice")
        history = await pool.history(a.token_id)
        stats = await pool.stats()
    async with tokenpool.open_pool(size=3, ttl=600, store=store_url) as pool:
        assert tokens == [t.id for t in await pool.tokens()]
        assert (b.id, b.token_id) == ((await pool.lease_of("bob")).id, b.token_id)  # type: ignore[union-attr]
        assert await pool.lease_of("alice") is None
        assert list(history) == list(await pool.history(a.token_id))
        again = await pool.stats()
        assert (stats.activations, stats.releases, stats.renewals, stats.active) == (
            again.activations,
            again.releases,
            again.renewals,
            again.active,
        )
        assert again.revision > stats.revision  # a new owner epoch: fences keep growing
        c = await pool.activate("carol")
        assert c.fence > b.fence


async def test_refusals_made_last_before_a_restart_are_kept(store_url: str) -> None:
    """A refusal changes no lease, so no batch carried it: closing writes the counters."""
    async with tokenpool.open_pool(size=1, when_full="reject", store=store_url) as pool:
        await pool.activate("a")
        for user in ("b", "c"):
            with pytest.raises(tokenpool.FullError):
                await pool.activate(user)
        assert 2 == (await pool.stats()).refusals
    async with tokenpool.open_pool(size=1, when_full="reject", store=store_url) as pool:
        assert 2 == (await pool.stats()).refusals


async def test_leases_that_expired_while_closed_end_expired_at_their_deadline(
    store_url: str,
) -> None:
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=Clock(T0)) as pool:
        lease = await pool.activate("alice")
    later = Clock(T0 + timedelta(hours=2))
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=later) as pool:
        assert await pool.lease_of("alice") is None
        (usage,) = await pool.history(lease.token_id)
        assert (lease.id, Reason.EXPIRED, lease.expires_at) == (
            usage.id,
            usage.reason,
            usage.ended_at,
        )
        assert 1 == (await pool.stats()).expirations
    assert [] == query(store_url, ACTIVE)
    rows = query(store_url, "SELECT lease_id, expiration_reason FROM usage_history")
    assert [(lease.id, "expired")] == rows


async def test_a_live_lease_keeps_its_deadline_across_a_restart(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=Clock(T0)) as pool:
        lease = await pool.activate("alice")
    later = Clock(T0 + timedelta(seconds=30))
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=later) as pool:
        assert lease == await pool.lease_of("alice")
        assert await pool.validate(lease.token_id, lease.id)


async def test_a_wall_clock_set_back_across_a_restart_never_runs_time_backwards(
    store_url: str,
) -> None:
    """The hardening issue's defect 4: an hour back, then an eviction. Time starts at the
    store's newest instead, every batch is written, and the acknowledged lease survives."""
    async with tokenpool.open_pool(size=1, ttl=7200, store=store_url, clock=Clock(T0)) as pool:
        a = await pool.activate("alice")
    behind = Clock(T0 - timedelta(hours=1))
    async with tokenpool.open_pool(size=1, ttl=7200, store=store_url, clock=behind) as pool:
        b = await pool.activate("bob")  # evicts alice
        assert b.activated_at >= a.activated_at
        (usage,) = await pool.history(a.token_id)
        assert usage.ended_at >= usage.started_at
        await settle(pool)
        assert "up" == (await pool.stats()).link
    async with tokenpool.open_pool(size=1, ttl=7200, store=store_url, clock=behind) as pool:
        assert b.id == (await pool.lease_of("bob")).id  # type: ignore[union-attr]
        c = await pool.activate("carol")
        assert c.activated_at >= b.activated_at
    rows = query(store_url, "SELECT expiration_reason FROM usage_history ORDER BY revision")
    assert [("evicted",), ("evicted",)] == rows


async def test_a_wall_clock_set_forward_then_back_expires_on_time_and_keeps_order(
    store_url: str,
) -> None:
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=Clock(T0)) as pool:
        a = await pool.activate("alice")
    ahead = Clock(T0 + timedelta(hours=1))
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=ahead) as pool:
        (usage,) = await pool.history(a.token_id)
        assert (Reason.EXPIRED, a.expires_at) == (usage.reason, usage.ended_at)
        b = await pool.activate("bob")
    back = Clock(T0 + timedelta(minutes=5))
    async with tokenpool.open_pool(size=2, ttl=60, store=store_url, clock=back) as pool:
        c = await pool.activate("carol")
        assert c.activated_at >= b.activated_at  # the store's newest time, not the wall's
        assert (await pool.lease_of("bob")) is not None


async def test_sync_durability_answers_after_commit(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, durability="sync") as pool:
        lease = await pool.activate("alice")
        # No waiting: the reply came after the commit.
        assert [(lease.id, lease.token_id)] == query(store_url, ACTIVE)
        usage = await pool.release(lease.token_id)
        assert [(usage.id, "released")] == query(
            store_url, "SELECT lease_id, expiration_reason FROM usage_history"
        )
        assert [] == query(store_url, ACTIVE)


async def test_async_durability_commits_and_write_lag_reads_zero_when_idle(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, flush_interval=0.002) as pool:
        lease = await pool.activate("alice")
        await settle(pool)
        stats = await pool.stats()
        assert stats.last_commit_at is not None
        assert (0.0, 0, "up") == (stats.write_lag, stats.backlog, stats.link)
        assert [(lease.id, lease.token_id)] == query(store_url, ACTIVE)
        assert [("alice",)] == query(store_url, "SELECT id FROM users")
        figures = pool.statistics()
        assert figures.writer is not None and figures.writer.changes_written >= 1


async def test_flush_waits_for_the_commit(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, flush_interval=0.05) as pool:
        lease = await pool.activate("alice")
        await pool.flush()
        assert [(lease.id, lease.token_id)] == query(store_url, ACTIVE)
        assert 0 == (await pool.stats()).backlog


async def test_async_changes_gather_for_the_flush_interval(store_url: str) -> None:
    # Changes made in separate turns within one flush interval go to the store process
    # together and are committed in one transaction, not one per turn.
    async with tokenpool.open_pool(size=50, store=store_url, flush_interval=0.5) as pool:
        await pool.activate("first")  # the link was idle: sent at once
        await pool.flush()
        before = pool.statistics().writer
        assert before is not None
        for n in range(20):
            await pool.activate(f"user-{n}")
            await trio.sleep(0.005)  # each in a turn (and a frame, ungathered) of its own
        await pool.flush()
        after = pool.statistics().writer
        assert after is not None
        assert after.changes_written - before.changes_written >= 20
        assert after.batches - before.batches <= 2
        assert 21 == len(query(store_url, ACTIVE))


async def test_a_flush_is_not_held_back_by_the_gathering(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, flush_interval=1.0) as pool:
        await pool.activate("alice")  # sent at once; the next changes would gather for 1 s
        lease = await pool.activate("bob")
        with trio.fail_after(0.6):
            await pool.flush()
        assert lease.id in [row[0] for row in query(store_url, ACTIVE)]


async def test_resize_grows_and_shrinks_across_restarts(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, clock=Clock(T0)) as pool:
        first = [t.id for t in await pool.tokens()]
        a = await pool.activate("a")
    async with tokenpool.open_pool(
        size=4, store=store_url, clock=Clock(T0 + timedelta(seconds=1))
    ) as pool:
        grown = [t.id for t in await pool.tokens()]
        assert first == grown[:2] and 4 == len(grown)
        b = await pool.activate("b")
        await pool.activate("c")
    async with tokenpool.open_pool(
        size=1, store=store_url, clock=Clock(T0 + timedelta(seconds=2))
    ) as pool:
        assert 1 == len(await pool.tokens())
        # Available tokens went first, then the oldest leases (a's, then b's).
        assert await pool.lease_of("a") is None and await pool.lease_of("b") is None
        assert "c" == (await pool.tokens())[0].current_user_id
    ended = dict(query(store_url, "SELECT lease_id, expiration_reason FROM usage_history"))
    assert {a.id: "evicted", b.id: "evicted"} == ended
    retired = "retired_us" if store_url.startswith("sqlite") else "retired_at"
    assert 1 == len(query(store_url, f"SELECT id FROM tokens WHERE {retired} IS NULL"))
    assert 4 == len(query(store_url, "SELECT id FROM tokens"))  # rows are never deleted


async def test_a_second_owner_is_refused_with_the_pool_name(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, name="seats"):
        with pytest.raises(PoolLockedError, match="seats" if "postgres" in store_url else "in use"):
            async with tokenpool.open_pool(size=2, store=store_url, name="seats", lock_wait=0.2):
                pass


@pytest.mark.parametrize("link", ["symlink", "hardlink", "relative"])
async def test_one_sqlite_file_has_one_owner_whatever_path_reaches_it(
    tmp_path: Path, link: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hardening issue's defect 3: ownership follows the file, not its name."""
    real = tmp_path / "real" / "pool.db"
    real.parent.mkdir()
    async with tokenpool.open_pool(size=1, store=f"sqlite:///{real}") as pool:
        await pool.activate("alice")
        await pool.flush()
        if link == "symlink":
            other = tmp_path / "alias.db"
            other.symlink_to(real)
        elif link == "hardlink":
            other = tmp_path / "hard.db"
            os.link(real, other)
        else:
            monkeypatch.chdir(tmp_path)
            other = Path("real/../real/pool.db")
        with pytest.raises(PoolLockedError, match="in use by another"):
            async with tokenpool.open_pool(size=1, store=f"sqlite:///{other}", lock_wait=0.2):
                pass
        assert "alice" == (await pool.lease_of("alice")).user_id  # type: ignore[union-attr]


async def test_a_sqlite_file_replaced_under_its_owner_stops_it_granting(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    async with tokenpool.open_pool(size=2, store=f"sqlite:///{path}", durability="sync") as pool:
        await pool.activate("alice")
        path.rename(tmp_path / "moved.db")
        with pytest.raises(tokenpool.UnavailableError):
            await pool.activate("bob")
        with trio.fail_after(5):
            while (await pool.stats()).link != "fenced":
                await trio.sleep(0.01)
        with pytest.raises(tokenpool.UnavailableError, match="fenced"):
            await pool.activate("carol")


async def test_pools_with_different_names_share_one_database(store_url: str) -> None:
    async with tokenpool.open_pools(store_url, durability="sync") as pools:
        a = await pools.create("a", tokenpool.PoolSettings(size=2))
        b = await pools.create("b", tokenpool.PoolSettings(size=3))
        await a.activate("same-user")
        await b.activate("same-user")  # one lease per user per pool
    assert [("a", 1), ("b", 1)] == query(
        store_url,
        "SELECT p.name, count(*) FROM lease_assignments t JOIN pools p ON p.id = t.pool_id"
        " WHERE t.lease_id IS NOT NULL GROUP BY p.name ORDER BY p.name",
    )


async def test_pools_created_at_run_time_come_back_after_a_restart(store_url: str) -> None:
    async with tokenpool.open_pools(store_url) as pools:
        gpu = await pools.create("gpu", tokenpool.PoolSettings(size=2, ttl=30, when_full="wait"))
        lease = await gpu.activate("alice")
    async with tokenpool.open_pools(store_url) as pools:
        assert ["gpu"] == pools.names()
        gpu = pools.get("gpu")
        assert (2, 30.0, "wait") == (gpu.settings.size, gpu.settings.ttl, gpu.settings.when_full)
        assert lease.id == (await gpu.lease_of("alice")).id  # type: ignore[union-attr]
        await pools.drop("gpu")
    async with tokenpool.open_pools(store_url) as pools:
        assert [] == pools.names()  # dropped: not served; its rows stay
    assert 1 == len(query(store_url, "SELECT lease_id FROM token_usage_history"))


async def test_a_dropped_pool_takes_no_activation_sent_after_the_drop(store_url: str) -> None:
    """POOL DROP ends every lease; an activation racing it is either before it (and ended
    ``cleared``) or refused, never left active in the store."""
    granted: list[str] = []

    async def activate(pool: tokenpool.Pool, user: str, turns: int) -> None:
        for _ in range(turns):  # spread the activations around the drop's own message
            await trio.lowlevel.checkpoint()
        with suppress(tokenpool.TokenPoolError):
            await pool.activate(user)
            granted.append(user)

    async with tokenpool.open_pools(store_url) as pools:
        pool = await pools.create("x", tokenpool.PoolSettings(size=50, ttl=30))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pools.drop, "x")
            for i in range(40):
                nursery.start_soon(activate, pool, f"u{i}", i % 8)
    active = query(store_url, "SELECT user_id FROM lease_assignments WHERE user_id IS NOT NULL")
    assert [] == active
    ended = query(store_url, "SELECT user_id, expiration_reason FROM usage_history")
    assert sorted((user, "cleared") for user in granted) == sorted(tuple(r) for r in ended)


@pytest.mark.parametrize("memory", [5, 1000])
async def test_long_histories_page_exactly_once_with_any_limit(store_url: str, memory: int) -> None:
    """The hardening issue's defect 2: every entry, once, whatever memory keeps."""
    ended = 2_800
    async with tokenpool.open_pool(
        size=1, store=store_url, history_memory=memory, max_backlog=1_000_000
    ) as pool:
        token = (await pool.tokens())[0].id
        for start in range(0, ended + 1, 500):
            await pool.activate_many([f"u{i}" for i in range(start, min(start + 500, ended + 1))])
        for limit in (1001, 1200):
            assert limit == len(await pool.history(token, limit=limit))
        seen: list[str] = []
        page = await pool.history(token, limit=700)
        seen += [u.user_id for u in page]
        while page.next_before is not None:
            page = await pool.history(token, limit=700, before=page.next_before)
            seen += [u.user_id for u in page]
        assert [f"u{i}" for i in range(ended - 1, -1, -1)] == seen
        user_page = await pool.user_history("u5")
        assert ["u5"] == [u.user_id for u in user_page]


async def test_stale_owner_is_fenced_and_stops_taking_activations(store_url: str) -> None:
    async with tokenpool.open_pool(size=2, store=store_url, durability="sync") as pool:
        await pool.activate("a")
        execute(store_url, "UPDATE pools SET owner_epoch = owner_epoch + 1")
        with pytest.raises(tokenpool.UnavailableError):
            await pool.activate("b")
        with trio.fail_after(5):
            while (await pool.stats()).link != "fenced":
                await trio.sleep(0.01)
        with pytest.raises(tokenpool.UnavailableError):
            await pool.activate("c")
        with pytest.raises(tokenpool.UnavailableError, match="fenced"):  # vouches no more
            await pool.lease_of("a")
    assert [] == query(store_url, ACTIVE + " AND user_id <> 'a'")


def refuse_evictions_of_fine(store_url: str) -> None:
    """A constraint the pool knows nothing of: recording the eviction of "fine" breaks it."""
    if store_url.startswith("sqlite"):
        execute(
            store_url,
            "CREATE TRIGGER refuse BEFORE INSERT ON token_usage_history"
            " WHEN NEW.user_id = 'fine' AND NEW.expiration_reason = 'evicted'"
            " BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END",
        )
    else:
        execute(
            store_url,
            "ALTER TABLE token_usage_history ADD CONSTRAINT refuse"
            " CHECK (NOT (user_id = 'fine' AND expiration_reason = 'evicted'))",
        )


async def test_a_batch_the_database_refuses_is_reported_and_never_wedges(store_url: str) -> None:
    """A write no retry can fix is dropped loudly; what comes after it is written."""
    async with tokenpool.open_pool(size=1, store=store_url, durability="sync") as pool:
        await pool.activate("fine")
        refuse_evictions_of_fine(store_url)
        with pytest.raises(tokenpool.UnavailableError, match="refused"):
            await pool.activate("evil")
        later = await pool.activate("later")  # the next batch is written as usual
        assert [(later.id, later.token_id)] == query(store_url, ACTIVE)
        figures = pool.statistics()
        assert figures.writer is not None and figures.writer.rejected > 0
        assert "up" == figures.stats.link


async def test_an_async_pool_stops_granting_while_the_store_refuses_for_good(
    store_url: str,
) -> None:
    """Async callers were answered before the store refused their batch: the pool then
    refuses activations (and says not ready, with the reason) until a write commits."""
    async with tokenpool.open_pool(size=1, store=store_url, durability="async") as pool:
        await pool.activate("fine")
        await pool.flush()
        refuse_evictions_of_fine(store_url)
        evil = await pool.activate("evil")  # acknowledged; its batch will be refused
        with suppress(tokenpool.UnavailableError):
            await pool.flush()
        ready, why = pool.ready
        assert not ready and "refused" in why
        with pytest.raises(tokenpool.UnavailableError, match="refused changes for good"):
            await pool.activate("next")
        await pool.release(evil.token_id, "evil")  # a write the store takes...
        await pool.flush()
        assert pool.ready == (True, "")  # ...so it grants again
        assert "again" == (await pool.activate("again")).user_id


async def test_unreachable_store_fails_open_clearly() -> None:
    with pytest.raises(tokenpool.UnavailableError, match="cannot connect"):
        async with tokenpool.open_pool(
            store="postgresql://postgres:secret@127.0.0.1:1/none", write_timeout=1
        ):
            pass


async def test_store_errors_never_show_the_password() -> None:
    with pytest.raises(tokenpool.UnavailableError) as raised:
        async with tokenpool.open_pool(
            store="postgresql://postgres:hunter2@127.0.0.1:1/none", write_timeout=1
        ):
            pass
    assert "hunter2" not in str(raised.value) and "127.0.0.1:1" in str(raised.value)


async def test_an_unusable_sqlite_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A directory that cannot be made or written (here: a file where it should be, which
    stops root too) is one clear error naming the file, not a bare OSError."""
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(tokenpool.UnavailableError, match=r"cannot open the SQLite file .*taken"):
        async with tokenpool.open_pool(store=f"sqlite:///{tmp_path}/taken/pool.db"):
            pass


async def test_bad_store_url_is_invalid_argument() -> None:
    with pytest.raises(tokenpool.InvalidArgumentError, match="store"):
        async with tokenpool.open_pool(store="mysql://x"):
            pass


async def test_user_ids_with_quotes_and_backslashes_are_stored_as_given(store_url: str) -> None:
    """User ids may hold any printable character; the binary COPY stores them as given."""
    users = ['a"b', "c\\d", "{x,y}", "é,ü", 'q"\\"']
    async with tokenpool.open_pool(size=3, store=store_url) as pool:
        for user in users:
            await pool.activate(user)
        await pool.flush()
    assert set(users) == {r[0] for r in query(store_url, "SELECT id FROM users")}
    held = {
        r[0]
        for r in query(
            store_url, "SELECT user_id FROM lease_assignments WHERE lease_id IS NOT NULL"
        )
    }
    ended = {r[0] for r in query(store_url, "SELECT user_id FROM usage_history")}
    assert (set(users[2:]), set(users[:2])) == (held, ended)
    async with tokenpool.open_pool(size=3, store=store_url) as pool:
        leases = [await pool.lease_of(u) for u in users[2:]]
        assert users[2:] == [lease.user_id for lease in leases if lease is not None]


async def test_history_is_one_snapshot_even_when_the_store_has_caught_up(store_url: str) -> None:
    """A page read from memory and the store must not mix two states: entries that end
    after the memory part was read never appear, and none is skipped."""
    async with tokenpool.open_pool(size=1, store=store_url, history_memory=2) as pool:
        for i in range(6):
            await pool.activate(f"u{i}")
        token = (await pool.tokens())[0].id
        core = pool._core  # the command layer's way in: memory's part at its place in a batch
        (memory_part,) = await core.call([GetHistory(token, 10)])
        for i in range(6, 9):
            await pool.activate(f"u{i}")  # end more leases, and let the store catch up
        await pool.flush()
        page = await core.complete_history(memory_part, token, None, 10)  # type: ignore[arg-type]
        assert [f"u{i}" for i in range(4, -1, -1)] == [u.user_id for u in page]


async def test_a_history_read_from_the_store_is_not_held_back_by_the_gathering(
    store_url: str,
) -> None:
    # The older entries are still gathering (for up to 1 s, longer than a write may
    # take): the read sends them at once rather than timing out on them.
    async with tokenpool.open_pool(
        size=1, store=store_url, history_memory=2, flush_interval=1.0, write_timeout=0.3
    ) as pool:
        await pool.activate("u0")  # sent at once; what follows gathers
        for i in range(1, 6):
            await pool.activate(f"u{i}")
        token = (await pool.tokens())[0].id
        core = pool._core
        (memory_part,) = await core.call([GetHistory(token, 10)])
        page = await core.complete_history(memory_part, token, None, 10)  # type: ignore[arg-type]
        assert [f"u{i}" for i in range(4, -1, -1)] == [u.user_id for u in page]


async def test_the_library_prints_nothing_unless_logging_is_configured(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    async with tokenpool.open_pool(size=1, store=f"sqlite:///{tmp_path}/quiet.db") as pool:
        await pool.activate("a")
        await pool.activate("b")  # evicts: nothing to say, and nothing said
    async with tokenpool.open_pool(size=1, store=f"sqlite:///{tmp_path}/quiet.db"):
        pass  # recovery logs pool_recovered, to the stdlib logger "tokenpool" only
    out, err = capfd.readouterr()
    assert ("", "") == (out, err)


# -- a store older than its own history (issue 18, item 6) ---------------------


async def test_a_pools_row_older_than_its_history_keeps_every_acknowledged_eviction(
    store_url: str,
) -> None:
    """A ``pools`` row rewound (restored from an earlier backup, or edited) must not make
    fences restart below stored ones: every acknowledged sync eviction is in the history."""
    evicted: list[str] = []
    async with tokenpool.open_pool(size=1, store=store_url, durability="sync") as pool:
        for i in range(6):
            lease = await pool.activate(f"before-{i}")
            evicted.append(lease.id)
        await pool.release(lease.token_id)  # no lease left whose fence would save the day
    execute(store_url, "UPDATE pools SET revision = 0, owner_epoch = 0, clock_us = 0")
    async with tokenpool.open_pool(size=1, store=store_url, durability="sync") as pool:
        for i in range(6):
            lease = await pool.activate(f"after-{i}")
            evicted.append(lease.id)
        assert lease.fence > max(
            r for (r,) in query(store_url, "SELECT max(fence) FROM token_usage_history")
        )
    stored = {
        lease_id for (lease_id,) in query(store_url, "SELECT lease_id FROM token_usage_history")
    }
    assert [] == [e for e in evicted[:-1] if e not in stored]


async def test_a_stored_time_past_year_9999_refuses_the_store_in_one_line(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'pool.db'}"
    async with tokenpool.open_pool(size=1, ttl=60, store=store) as pool:
        await pool.activate("alice")
    execute(store, "UPDATE token_assignments SET expires_us = 300000000000000000")
    with pytest.raises(tokenpool.InvalidArgumentError, match="outside years 1 to 9999") as caught:
        async with tokenpool.open_pool(size=1, ttl=60, store=store):
            pass
    assert 1 == len(str(caught.value).splitlines())


# -- a small disk (issue 18, item 13) -------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs (root only: skipped, saying why, where mount fails)."""
    import subprocess

    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount an 8 MB tmpfs here: {done.stderr.strip()[:120]}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_small_disk_filled_by_the_wal_takes_writes_again(small_disk: Path) -> None:
    """The WAL (checkpointed on its own only every 64 MiB) fills an 8 MB disk: the store
    checkpoints it on "database or disk is full" and the retry commits; nothing is lost
    and a restart finds every lease ended."""
    store = f"sqlite:///{small_disk / 'pool.db'}"
    ended = 0
    async with tokenpool.open_pool(size=1, store=store, durability="sync", write_timeout=5) as pool:
        for i in range(1500):  # about 16 MB of WAL at a few pages a commit
            await pool.activate(f"user-{i}")
        ended = (await pool.stats()).evictions
        assert (small_disk / "pool.db-wal").stat().st_size < 8 << 20
    async with tokenpool.open_pool(size=1, store=store) as pool:
        assert ended == (await pool.stats()).evictions
    assert [(ended,)] == query(store, "SELECT count(*) FROM token_usage_history")


async def test_a_pool_revived_much_smaller_shrinks_a_step_at_a_time(store_url: str) -> None:
    """A dropped pool created again under its name with far fewer tokens (it is revived:
    its tokens are kept forever) retires the rest a step at a time once it is served,
    as ``POOL ALTER`` does. Recovery retired all of them in one write: a million tokens
    were one statement past the write timeout, retried for good, the store stalled for
    every pool, and again after each restart."""
    import logging

    from tokenpool._ops import END_STEP

    class Recorded(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.tokens: list[int] = []

        def emit(self, record: logging.LogRecord) -> None:
            if record.msg == "pool_recovered":
                self.tokens.append(record.__dict__["tokens"])

    big = 2 * END_STEP + 7
    recorded = Recorded()
    logger = logging.getLogger("tokenpool")
    async with tokenpool.open_pools(store=store_url) as pools:
        await pools.create("d", tokenpool.PoolSettings(size=big, ttl=60))
        await pools.get("d").activate("a")
        await pools.drop("d")
        logger.addHandler(recorded)
        logger.setLevel(logging.INFO)
        try:
            pool = await pools.create("d", tokenpool.PoolSettings(size=1, ttl=60))
        finally:
            logger.removeHandler(recorded)
            logger.setLevel(logging.NOTSET)
        assert [big - END_STEP] == recorded.tokens  # one step at recovery (without the fix: 1)
        assert 1 == (await pool.stats()).size
    async with tokenpool.open_pools(store=store_url) as pools:  # the store says so too
        pool = pools.get("d")
        assert pool is await pools.restore("d")  # served already: not opened twice
        assert (1, 1) == ((await pool.stats()).size, len(await pool.tokens()))


async def test_a_token_retired_by_a_shrink_keeps_its_history(store_url: str) -> None:
    """Its history stays readable by token id while the pool is served, as it is by user
    (it answered ``UnknownToken``; outside probe). A restart loads the live tokens only:
    then the retired token's history is read by user (``user_history``)."""
    async with tokenpool.open_pools(store=store_url) as pools:
        pool = await pools.create("gpu", tokenpool.PoolSettings(size=3, ttl=60))
        lease = await pool.activate("dave")
        await pool.release(lease.token_id, "dave")  # freed last: retired first
        await pools.alter("gpu", size=1)
        assert lease.token_id not in {t.id for t in await pool.tokens()}
        assert [lease.id] == [u.id for u in await pool.history(lease.token_id)]
    async with tokenpool.open_pools(store=store_url) as pools:  # from the store
        pool = pools.get("gpu")
        assert [lease.id] == [u.id for u in await pool.user_history("dave")]
