"""The SQL schemas held to the lists the code keeps once: the reasons, the policies and
the counters (``_model.Reason``, ``_settings.WhenFull``, ``_model.COUNTERS``), checked on
real databases, not by reading the SQL text."""

from __future__ import annotations

import pytest

import tokenpool
from tests.dbutil import execute, query
from tokenpool._model import COUNTERS, Reason
from tokenpool._settings import WHEN_FULL


async def _created(url: str) -> None:
    async with tokenpool.open_pool(size=1, store=url):
        pass  # the schema is applied when a pool opens


async def test_the_pools_table_has_a_column_for_every_counter(store_url: str) -> None:
    await _created(store_url)
    if store_url.startswith("sqlite"):
        columns = {r[1] for r in query(store_url, "PRAGMA table_info(pools)")}
    else:
        columns = {
            r[0]
            for r in query(
                store_url,
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'pools' AND table_schema = current_schema()",
            )
        }
    assert set(COUNTERS) <= columns


async def test_the_schema_takes_every_policy_and_reason_and_nothing_else(store_url: str) -> None:
    await _created(store_url)
    for policy in WHEN_FULL:
        execute(store_url, "UPDATE pools SET when_full = ?", policy)
    with pytest.raises(Exception, match=r"(?i)check|constraint"):
        execute(store_url, "UPDATE pools SET when_full = ?", "queue")
    if store_url.startswith("sqlite"):
        sql = query(store_url, "SELECT sql FROM sqlite_master WHERE name = 'token_usage_history'")
        declared = sql[0][0]
        listed = declared[declared.index("expiration_reason IN") :].split(")")[0]
        assert {r.value for r in Reason} == {
            w.strip(" '(") for w in listed.split("IN")[1].split(",")
        }
    else:
        (row,) = query(store_url, "SELECT enum_range(NULL::expiration_reason)::text")
        assert {r.value for r in Reason} == set(row[0].strip("{}").split(","))


async def test_the_history_is_indexed_by_pool_and_end_time_for_the_analytics(
    store_url: str,
) -> None:
    await _created(store_url)
    if store_url.startswith("sqlite"):
        columns = [r[2] for r in query(store_url, "PRAGMA index_info(history_by_end)")]
        assert ["pool_id", "ended_us"] == columns
    else:
        (row,) = query(
            store_url,
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'history_by_end'"
            " AND schemaname = current_schema()",
        )
        assert row[0].endswith("(pool_id, ended_at)")
