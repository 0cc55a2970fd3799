"""The report: a Markdown page with the goals, the tables and PNG plots, from results.json.

``python -m bench.report bench-results`` rebuilds it from a saved run.
Ratios are taken run by run inside one run of the suite (the repetitions are
interleaved), then summarised like any figure: median, min, max.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._measure import fmt

Fig = dict[str, Any]


def _find(figures: list[Fig], **params: Any) -> Fig | None:
    for f in figures:
        if all(f["params"].get(k) == v for k, v in params.items()):
            return f
    return None


def _ratio(a: Fig | None, b: Fig | None) -> list[float] | None:
    if a is None or b is None:
        return None
    runs = list(zip(a["runs"], b["runs"], strict=False))
    # A refused run (NaN) has no ratio.
    return [x / y for x, y in runs if y and x == x and y == y] or None


Goal = tuple[str, Callable[[list[Fig]], list[float] | None], float, str]


def _compare(system: str, pipeline: int, clients: int = 50, users: int = 100_000) -> dict[str, Any]:
    return {
        "section": "compare",
        "system": system,
        "command": "ACTIVATE",
        "pipeline": pipeline,
        "clients": clients,
        "users": users,
        "metric": "rps",
    }


def _ping(system: str, pipeline: int) -> dict[str, Any]:
    return {
        "section": "compare",
        "system": system,
        "command": "PING",
        "pipeline": pipeline,
        "metric": "rps",
    }


def _value(f: Fig | None) -> list[float] | None:
    return list(f["runs"]) if f else None


AT_MOST_ZERO = -1e-9  # an upper bound of zero (a negative target is an upper bound)


def _sustained(store: str, metric: str) -> dict[str, Any]:
    return {"section": "sustained", "store": store, "metric": metric}


def _embedded(path: str, **more: Any) -> Callable[[list[Fig]], list[float] | None]:
    return lambda fs: _value(_find(fs, section="embedded", path=path, size=100, **more))


_WORKERS2 = "tokenpool --http-workers 2 (postgresql)"  # as bench/httpworkers.py names it

GOALS: list[Goal] = [
    (
        "sustained 60 s, default SQLite store: refusals (at most)",
        lambda fs: _value(_find(fs, **_sustained("sqlite", "refused"))),
        AT_MOST_ZERO,
        "",
    ),
    (
        "sustained 60 s, PostgreSQL store: refusals (at most)",
        lambda fs: _value(_find(fs, **_sustained("postgresql", "refused"))),
        AT_MOST_ZERO,
        "",
    ),
    (
        "sustained 60 s, default SQLite store: write lag p99 (ms, at most)",
        lambda fs: _value(_find(fs, **_sustained("sqlite", "lag_p99"))),
        -50.0,
        "ms",
    ),
    (
        "sustained 60 s, PostgreSQL store: write lag p99 (ms, at most)",
        lambda fs: _value(_find(fs, **_sustained("postgresql", "lag_p99"))),
        -50.0,
        "ms",
    ),
    (
        "async, pipeline 16, 50 clients, 100k users / Redis + Lua, AOF everysec",
        lambda fs: _ratio(
            _find(fs, **_compare("tokenpool async", 16)),
            _find(fs, **_compare("redis+lua aof everysec", 16)),
        ),
        1.5,
        "x",
    ),
    (
        "the same / Redis + Lua without persistence",
        lambda fs: _ratio(
            _find(fs, **_compare("tokenpool async", 16)), _find(fs, **_compare("redis+lua", 16))
        ),
        1.5,
        "x",
    ),
    (
        "sync, pipeline 16 / Redis + Lua, appendfsync always",
        lambda fs: _ratio(
            _find(fs, **_compare("tokenpool sync", 16)),
            _find(fs, **_compare("redis+lua aof always", 16)),
        ),
        1.0,
        "x",
    ),
    (
        "RESP, pipeline 16, 50 clients: ACTIVATE / tokenpool's own PING",
        lambda fs: _ratio(
            _find(fs, **_compare("tokenpool async", 16)), _find(fs, **_ping("tokenpool", 16))
        ),
        0.5,
        "x",
    ),
    (
        "RESP, pipeline 1, 50 clients: ACTIVATE / tokenpool's own PING",
        lambda fs: _ratio(
            _find(fs, **_compare("tokenpool async", 1)), _find(fs, **_ping("tokenpool", 1))
        ),
        0.8,
        "x",
    ),
    (
        "async (pipeline 16) / PostgreSQL only (sync commit off), 50 clients",
        lambda fs: _ratio(
            _find(fs, **_compare("tokenpool async", 16)),
            _find(fs, **_compare("postgresql-only (sync commit off)", 1)),
        ),
        20,
        "x",
    ),
    (
        "sync (pipeline 16) / PostgreSQL only (sync commit on), 50 clients",
        lambda fs: _ratio(
            _find(fs, **_compare("tokenpool sync", 16)),
            _find(fs, **_compare("postgresql-only (sync commit on)", 1)),
        ),
        5,
        "x",
    ),
    (
        "p99 latency at 5,000 activations/s offered (ms, at most)",
        lambda fs: _value(
            _find(fs, section="openloop", system="tokenpool async", rate=5000, metric="p99")
        ),
        -2.0,  # negative: an upper bound
        "ms",
    ),
    (
        "p99 latency at 20,000 activations/s offered (ms, at most)",
        lambda fs: _value(
            _find(fs, section="openloop", system="tokenpool async", rate=20000, metric="p99")
        ),
        -10.0,
        "ms",
    ),
    ("embedded batch (activate_many): activations/s", _embedded("batch"), 500_000, "/s"),
    (
        "embedded, 100 tasks: activations/s through the actor",
        _embedded("actor", mode="activate"),
        200_000,
        "/s",
    ),
    (
        "resident memory per token at 1,000,000 tokens (bytes, at most)",
        lambda fs: _value(_find(fs, section="memory", system="tokenpool (memory)", metric="token")),
        -120.0,
        "B",
    ),
    (
        "RESP, pool of 1,000,000 / pool of 100 (ACTIVATE, pipeline 16)",
        lambda fs: _ratio(
            _find(
                fs,
                section="scaling",
                axis="size",
                system="tokenpool (memory)",
                size=1_000_000,
                metric="rps",
            ),
            _find(
                fs,
                section="scaling",
                axis="size",
                system="tokenpool (memory)",
                size=100,
                metric="rps",
            ),
        ),
        0.8,
        "x",
    ),
    (
        "HTTP activate, --http-workers 2 / the seed on uvicorn (2 workers), PostgreSQL",
        lambda fs: _value(
            _find(fs, section="httpworkers", system=_WORKERS2, metric="ratio_to_seed")
        ),
        3.0,
        "x",
    ),
    (
        "HTTP activate, --http-workers 2: p99 (ms, at most)",
        lambda fs: _value(_find(fs, section="httpworkers", system=_WORKERS2, metric="p99")),
        -20.0,
        "ms",
    ),
    (
        "HTTP activate, --http-workers 2: non-2xx (at most)",
        lambda fs: _value(_find(fs, section="httpworkers", system=_WORKERS2, metric="non_2xx")),
        AT_MOST_ZERO,
        "",
    ),
]


def goals(figures: list[Fig]) -> list[dict[str, Any]]:
    """Each goal with its same-run measurements and whether the median meets it."""
    out = []
    for name, measure, target, unit in GOALS:
        values = measure(figures)
        if not values:
            out.append({"goal": name, "target": target, "unit": unit, "measured": None})
            continue
        median = statistics.median(values)
        met = median <= -target if target < 0 else median >= target
        # How far off: the factor the measurement would have to improve by.
        shortfall = (
            median / -target if target < 0 else (target / median if median else float("inf"))
        )
        out.append(
            {
                "goal": name,
                "target": 0.0 if target == AT_MOST_ZERO else abs(target),
                "unit": unit,
                "bound": "at most" if target < 0 else "at least",
                "measured": median,
                "min": min(values),
                "max": max(values),
                "met": met,
                "off_by": None if met else shortfall,
            }
        )
    return out


def _num(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "ms":
        return f"{value:.3g} ms"
    return fmt(value)


def _plots(figures: list[Fig], out: Path) -> list[tuple[str, str]]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib not installed (pip install '.[bench]')")
        return []
    made: list[tuple[str, str]] = []

    def series(section: str, x: str, metric: str = "rps", **where: Any) -> dict[str, Any]:
        lines: dict[str, list[tuple[float, float, float, float]]] = {}
        for f in figures:
            p = f["params"]
            if p.get("section") != section or p.get("metric") != metric:
                continue
            if any(p.get(k) != v for k, v in where.items()):
                continue
            lines.setdefault(p["system"], []).append((p[x], f["median"], f["min"], f["max"]))
        return {k: sorted(v) for k, v in lines.items()}

    def line_plot(name: str, title: str, xlabel: str, panels: list[tuple[str, Any]]) -> None:
        panels = [(t, s) for t, s in panels if s]
        if not panels:
            return
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, (subtitle, lines) in zip(axes[0], panels, strict=True):
            for system, points in lines.items():
                xs = [p[0] for p in points]
                ys = [p[1] for p in points]
                err = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=system)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("requests/s (median, min-max)")
            ax.set_title(subtitle)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, title))

    line_plot(
        "throughput-clients.png",
        "ACTIVATE throughput against clients (100,000 users, pool of 10,000)",
        "clients",
        [
            (
                f"pipeline {p}",
                series("compare", "clients", pipeline=p, users=100_000, command="ACTIVATE"),
            )
            for p in (1, 16)
        ],
    )
    line_plot(
        "throughput-size.png",
        "ACTIVATE throughput against pool size (50 clients, pipeline 16)",
        "tokens in the pool",
        [("", series("scaling", "size", axis="size"))],
    )
    line_plot(
        "throughput-connections.png",
        "ACTIVATE throughput against connections (pipeline 1, pool of 10,000)",
        "connections",
        [("", series("scaling", "clients", axis="clients"))],
    )

    def bar_plot(name: str, title: str, groups: dict[str, dict[str, float]]) -> None:
        if not groups:
            return
        metrics = ["p50", "p99", "p99.9"]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups)), 4.2))
        width = 0.8 / len(metrics)
        for i, metric in enumerate(metrics):
            xs = [j + i * width for j in range(len(groups))]
            ax.bar(xs, [g.get(metric, 0) for g in groups.values()], width, label=metric)
        ax.set_xticks([j + width for j in range(len(groups))])
        ax.set_xticklabels(list(groups), rotation=15, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms (median of runs)")
        ax.set_title(title)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append((name, title))

    def latency_groups(section: str, **where: Any) -> dict[str, dict[str, float]]:
        groups: dict[str, dict[str, float]] = {}
        names = {"p50": "p50", "p99": "p99", "p999": "p99.9"}
        for f in figures:
            p = f["params"]
            if p.get("section") != section or p.get("metric") not in names:
                continue
            if any(p.get(k) != v for k, v in where.items()):
                continue
            label = p["system"] + (f" @ {p['rate']:,}/s" if "rate" in p else "")
            groups.setdefault(label, {})[names[p["metric"]]] = f["median"]
        return groups

    bar_plot(
        "latency-systems.png",
        "ACTIVATE latency, closed loop (50 clients, pipeline 1, 100,000 users)",
        latency_groups("compare", clients=50, pipeline=1, users=100_000, command="ACTIVATE"),
    )
    bar_plot(
        "latency-openloop.png",
        "ACTIVATE latency at a fixed offered rate (open loop)",
        latency_groups("openloop"),
    )
    return made


def _table(figures: list[Fig], section: str) -> str:
    rows = [f for f in figures if f["params"].get("section") == section]
    if not rows:
        return ""
    lines = ["| figure | median | min | max | unit |", "|---|---:|---:|---:|---|"]
    for f in rows:
        if f["params"].get("metric") == "refused" and not any(f["runs"]):
            continue  # nothing refused: no row
        lines.append(
            f"| {f['name']} | {fmt(f['median'])} | {fmt(f['min'])} | {fmt(f['max'])}"
            f" | {f['unit']} |"
        )
    return "\n".join(lines)


SECTION_TITLES = {
    "compare": "tokenpool against its peers (closed loop, redis-benchmark and pgbench)",
    "scaling": "Scaling: pool size and connections",
    "openloop": "Latency under a fixed offered load (open loop)",
    "persistence": "Write-behind, sync group commit, recovery",
    "memory": "Memory",
    "embedded": "Embedded (library calls from trio tasks)",
    "revisions": "This code against an earlier revision: server CPU per request, requests/s",
    "instructions": "This code against an earlier revision: instructions per request",
}


def goals_table(results: list[dict[str, Any]]) -> str:
    lines = ["| goal | target | measured (median) | min to max | met |", "|---|---:|---:|---:|---|"]
    for g in results:
        if g["measured"] is None:
            lines.append(f"| {g['goal']} | | not measured in this run | | |")
            continue
        unit = g["unit"]
        if g["met"]:
            verdict = "yes"
        elif g["off_by"] == float("inf") or g["off_by"] > 1e6:
            verdict = "**no**"
        else:
            verdict = f"**no**: off by {g['off_by']:.2f}x"
        lines.append(
            f"| {g['goal']} | {g['bound']} {_num(g['target'], unit)}"
            f" | {_num(g['measured'], unit)} | {_num(g['min'], unit)} to {_num(g['max'], unit)}"
            f" | {verdict} |"
        )
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> Path:
    """Write ``report.md`` and its plots into ``out``; return the report's path."""
    figures: list[Fig] = results["figures"]
    met = goals(figures)
    results["goals"] = met
    plots = _plots(figures, out)
    about = results["machine"]
    parts = [
        "# tokenpool benchmark report",
        "",
        f"Command: `{results['command']}` ({results['seconds']} s).",
        f"Machine: {about['cpu']}, {about['cores']} cores, {about['platform']}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results.get("versions", {}).items()),
        "",
        "Each figure is the median of its runs (min and max beside it); every ratio is",
        "taken run by run within this one invocation, with the systems interleaved.",
        "",
        "## Goals",
        "",
        goals_table(met),
        "",
    ]
    prof = results.get("profile")
    if prof:
        parts += [
            "## Where the server's time goes",
            "",
            f"py-spy, {prof['samples']} samples over {prof['seconds']} s of {prof['load']}.",
            "",
            "| part | share of samples |",
            "|---|---:|",
            *[f"| {k} | {v:.0%} |" for k, v in prof["parts"].items()],
            "",
            "| function (own time) | share |",
            "|---|---:|",
            *[f"| `{k}` | {v:.1%} |" for k, v in prof["functions"][:12]],
            "",
        ]
    for name, title in plots:
        parts += [f"![{title}]({name})", ""]
    for section, title in SECTION_TITLES.items():
        table = _table(figures, section)
        if table:
            parts += [f"## {title}", "", table, ""]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "bench-results")
    results = json.loads((out / "results.json").read_text())
    print(write(results, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
