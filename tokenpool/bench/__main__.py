"""``python -m tokenpool.bench [--quick] [--out DIR]``: run the benchmarks, print and save them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import embedded, persistence, server
from ._measure import machine, table

SECTIONS = {"embedded": embedded.run, "persistence": persistence.run, "server": server.run}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokenpool.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, for development")
    parser.add_argument("--out", default="bench-results", help="where results.json goes")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run (default: all of {', '.join(SECTIONS)})",
    )
    args = parser.parse_args(argv)
    started = time.time()
    figures = []
    for section in args.only.split(","):
        if section not in SECTIONS:
            parser.error(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
        print(f"running {section} ...", flush=True)
        figures += SECTIONS[section](args.quick)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    about = machine()
    result = {
        "machine": about,
        "command": " ".join(["python -m tokenpool.bench", *(argv or sys.argv[1:])]),
        "seconds": round(time.time() - started, 1),
        "figures": [f.as_json() for f in figures],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"# tokenpool benchmarks ({about['cpu']}, {about['cores']} cores)")
    print(table(figures))
    print(f"\nwritten to {out / 'results.json'} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
