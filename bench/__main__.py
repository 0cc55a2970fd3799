"""``python -m bench [--quick] [--only SECTIONS] [--out DIR]``.

Runs the sections, then writes ``results.json`` (every run of every figure, the
machine, the versions, the command), ``report.md`` and its PNG plots into
``--out`` and prints the goals and a short table. ``--quick`` finishes in under
2 minutes, for development; the full run takes 20 to 35 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from . import (
    compare,
    embedded,
    http,
    httpworkers,
    instructions,
    memory,
    openloop,
    persistence,
    profile,
    report,
    revisions,
    scaling,
    stores,
    sustained,
)
from ._drivers import missing
from ._measure import Figure, machine, table
from ._services import versions

SECTIONS: dict[str, Callable[[bool], list[Figure]]] = {
    "compare": compare.run,
    "sustained": sustained.run,
    "scaling": scaling.run,
    "openloop": openloop.run,
    "embedded": embedded.run,
    "persistence": persistence.run,
    "memory": memory.run,
    "http": http.run,
    "httpworkers": httpworkers.run,
    "stores": stores.run,
    "revisions": revisions.run,
    "instructions": instructions.run,
}
NEEDS = {
    "compare": ("redis-benchmark", "redis-server", "pgbench"),
    "sustained": ("redis-benchmark",),
    "scaling": ("redis-benchmark", "redis-server", "pgbench"),
    "openloop": ("redis-server", "pgbench"),
    "memory": ("redis-server",),
    "profile": ("redis-benchmark",),
    "http": ("wrk",),
    "httpworkers": ("wrk",),
    "revisions": ("redis-benchmark", "wrk", "git"),
    "instructions": ("redis-benchmark", "valgrind", "callgrind_control", "git"),
}
HEADLINE = {"compare", "scaling"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, for development")
    parser.add_argument("--out", default="bench-results", help="where the results go")
    every = [*SECTIONS, "profile"]
    parser.add_argument(
        "--only",
        default=",".join(every),
        help=f"comma-separated sections (default: all of {', '.join(every)})",
    )
    args = parser.parse_args(argv)
    chosen = args.only.split(",")
    for section in chosen:
        if section not in every:
            parser.error(f"unknown section {section!r}; known: {', '.join(every)}")
    # The pools the bench opens log at info; only their warnings belong on this screen.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    started = time.time()
    figures: list[Figure] = []
    skipped: dict[str, str] = {}
    prof = None
    for section in chosen:
        lacking = missing(*NEEDS.get(section, ()))
        if lacking:
            skipped[section] = f"{', '.join(lacking)} not found"
            print(f"{section}: skipped, {skipped[section]} (make bench-tools installs them)")
            continue
        print(f"running {section} ...", flush=True)
        begun = time.time()
        if section == "profile":
            prof = profile.profile(2.0 if args.quick else 8.0)
        else:
            for f in SECTIONS[section](args.quick):
                f.params.setdefault("section", section)
                figures.append(f)
        print(f"  {section}: {time.time() - begun:.0f} s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    about = machine()
    results: dict[str, Any] = {
        "machine": about,
        "versions": versions(),
        "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
        "seconds": round(time.time() - started, 1),
        "skipped": skipped,
        "profile": prof,
        "figures": [f.as_json() for f in figures],
    }
    path = report.write(results, out)  # adds the goals to results
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n# tokenpool benchmarks ({about['cpu']}, {about['cores']} cores)\n")
    print(report.goals_table(results["goals"]))
    print()
    print(
        table(
            [
                f
                for f in figures
                if f.params.get("section") in HEADLINE and f.params.get("metric") == "rps"
            ]
        )
    )
    print(f"\n{out / 'results.json'} and {path} written in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
