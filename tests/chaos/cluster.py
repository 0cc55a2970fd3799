"""A throwaway PostgreSQL cluster in a temp dir, for runs and tests that stop, kill or
pause the database: never the shared server."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from .server import free_port


def answers(dsn: str) -> bool:
    """Whether a PostgreSQL server accepts a connection at ``dsn``."""
    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def pg_binary(name: str) -> str | None:
    """A PostgreSQL server binary (initdb, pg_ctl): on PATH, or Debian's versioned dir."""
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


def can_make_cluster() -> bool:
    return pg_binary("initdb") is not None and pg_binary("pg_ctl") is not None


class Cluster:
    """A throwaway PostgreSQL cluster in a temp dir, that tests may stop, kill and restart."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tokenpool-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run it as the postgres user.
            subprocess.run(["chown", "-R", "postgres", str(self.dir)], check=True)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        initdb = pg_binary("initdb")
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
        pg_ctl = pg_binary("pg_ctl")
        assert pg_ctl
        self._run(pg_ctl, "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "start")
        deadline = time.monotonic() + 20
        while not answers(self.dsn):
            assert time.monotonic() < deadline, "throwaway cluster did not start"
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        pg_ctl = pg_binary("pg_ctl")
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
