"""Where the server's time goes: py-spy samples ``tokenpool serve`` under the load of
the headline goal (ACTIVATE, 50 clients, pipeline 16, ``async`` with PostgreSQL),
and the report lists the functions that hold the most samples (their own time,
and grouped by the part of the server they belong to).
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from typing import Any

from ._systems import tokenpool_resp

# The parts of the server, by the file a sampled frame is in (first match wins).
PARTS = (
    ("pool state", r"tokenpool/_state\.py|tokenpool/_ids\.py|attr"),
    ("RESP parsing", r"tokenpool/_resp\.py"),
    ("server: planning and replies", r"tokenpool/_server\.py"),
    ("actor and ops", r"tokenpool/_actor\.py|tokenpool/_ops\.py|tokenpool/_pool\.py"),
    ("write-behind (writer, store, psycopg)", r"_writer\.py|_store/|psycopg"),
    ("trio and sockets", r"trio/|socket|selectors"),
)


def _part(frame: str) -> str:
    for name, pattern in PARTS:
        if re.search(pattern, frame):
            return name
    return "other"


def profile(seconds: float) -> dict[str, Any] | None:
    """Sample the server for ``seconds``; ``None`` (and a note) when py-spy cannot run."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        print("profile skipped: py-spy not found (pip install py-spy)")
        return None
    with (
        tokenpool_resp("tokenpool async", 10_000) as system,
        tempfile.TemporaryDirectory() as tmp,
    ):
        out = os.path.join(tmp, "stacks.txt")
        failed: list[BaseException] = []

        def drive() -> None:
            try:
                system.run(clients=50, pipeline=16, users=100_000, seconds=seconds + 2)
            except Exception as error:  # reported below, with the profile discarded
                failed.append(error)

        load = threading.Thread(target=drive, daemon=True)
        load.start()
        done = subprocess.run(
            [
                *(spy, "record", "--pid", str(system.pid), "--format", "raw", "--output", out),
                *("--duration", str(max(1, round(seconds))), "--rate", "250", "--nonblocking"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        load.join()
        if failed:
            print(f"profile skipped: the load failed: {failed[0]}")
            return None
        if done.returncode != 0 or not os.path.exists(out):
            print(f"profile skipped: py-spy failed: {done.stderr.strip()[-300:]}")
            return None
        with open(out) as f:
            lines = f.read().splitlines()
    own: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads["writer thread" if "_writer" in stack or "to_thread" in stack else "main"] += count
        leaf = re.sub(r"\s*\(/.*?/(site-packages|lib/python3\.\d+)/", " (", frames[-1])
        own[leaf] += count
        parts[_part(frames[-1])] += count
    if not total:
        return None
    return {
        "samples": total,
        "seconds": seconds,
        "load": "ACTIVATE, 50 clients, pipeline 16, 100,000 users, async, PostgreSQL store",
        "parts": {k: v / total for k, v in parts.most_common()},
        "functions": [(k, v / total) for k, v in own.most_common(15)],
        "threads": {k: v / total for k, v in threads.most_common()},
    }
