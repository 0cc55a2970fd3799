"""Fixtures: real databases. PostgreSQL from TOKENPOOL_TEST_DSN (default: the local server),
or a throwaway cluster this session starts itself when none answers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.chaos.cluster import Cluster, answers, can_make_cluster

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN of a PostgreSQL server to create schemas in."""
    dsn = os.environ.get("TOKENPOOL_TEST_DSN", DEFAULT_DSN)
    if answers(dsn):
        yield dsn
        return
    if can_make_cluster():
        cluster = Cluster()
        try:
            yield cluster.dsn
        finally:
            cluster.destroy()
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"no PostgreSQL answers at {dsn} and none can be started (CI=true)")
    pytest.skip(f"no PostgreSQL at {dsn} and no initdb to start one")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway cluster of this session's own, for tests that stop or pause PostgreSQL."""
    if not can_make_cluster():
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL binaries (initdb, pg_ctl) are needed for outage tests")
        pytest.skip("no initdb/pg_ctl to make a throwaway cluster")
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.destroy()


def _schema_url(dsn: str) -> Iterator[str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    sep = "&" if "?" in dsn else "?"
    yield f"{dsn}{sep}schema={schema}"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    except psycopg.Error:
        pass


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A store URL for a fresh schema of its own on the shared server."""
    yield from _schema_url(pg_server)


@pytest.fixture
def cluster_url(pg_cluster: Cluster) -> Iterator[str]:
    """A store URL on the throwaway cluster (which the test may stop)."""
    if not answers(pg_cluster.dsn):
        pg_cluster.start()
    yield from _schema_url(pg_cluster.dsn)
    if not answers(pg_cluster.dsn):
        pg_cluster.start()


@pytest.fixture(params=["postgresql", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each persistent store in turn: the same tests run against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/pool.db"
    return str(request.getfixturevalue("pg_url"))
