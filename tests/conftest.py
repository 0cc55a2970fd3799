"""Fixtures: real databases. PostgreSQL from TOKENPOOL_TEST_DSN (default: the local server),
or a throwaway cluster this session starts itself when none answers."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def _answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        for version in sorted(root.iterdir(), reverse=True):
            candidate = version / "bin" / name
            if candidate.exists():
                return str(candidate)
    return None


class Cluster:
    """A throwaway PostgreSQL cluster in a temp dir, that tests may stop, kill and restart."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tokenpool-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as the postgres user.
            subprocess.run(["chown", "-R", "postgres", str(self.dir)], check=True)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        initdb = _pg_bin("initdb")
        assert initdb, "initdb not found"
        self._run(
            initdb,
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
            )
        self.start()

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as_user, *args], check=True, capture_output=True)

    def start(self) -> None:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start")
        deadline = time.monotonic() + 20
        while not _answers(self.dsn):
            assert time.monotonic() < deadline, "throwaway cluster did not start"
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = _pg_bin("pg_ctl")
        assert pg_ctl
        self._run(pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop")

    def _pids(self) -> list[int]:
        """The postmaster and every backend of this cluster."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(
            ["pgrep", "-P", str(postmaster)], capture_output=True, text=True, check=False
        ).stdout.split()
        return [postmaster, *map(int, children)]

    def pause(self) -> None:
        """SIGSTOP every process of the cluster: a hung database, connections left open."""
        for pid in self._pids():
            os.kill(pid, signal.SIGSTOP)

    def resume(self) -> None:
        for pid in self._pids():
            os.kill(pid, signal.SIGCONT)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _can_make_cluster() -> bool:
    return _pg_bin("initdb") is not None and _pg_bin("pg_ctl") is not None


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A DSN of a PostgreSQL server to create schemas in."""
    dsn = os.environ.get("TOKENPOOL_TEST_DSN", DEFAULT_DSN)
    if _answers(dsn):
        yield dsn
        return
    if _can_make_cluster():
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
    if not _can_make_cluster():
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
    if not _answers(pg_cluster.dsn):
        pg_cluster.start()
    yield from _schema_url(pg_cluster.dsn)
    if not _answers(pg_cluster.dsn):
        pg_cluster.start()


@pytest.fixture(params=["postgresql", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each persistent store in turn: the same tests run against both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/pool.db"
    return str(request.getfixturevalue("pg_url"))
