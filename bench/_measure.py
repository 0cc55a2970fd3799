"""Repeated measurements and their summary (median, min, max)."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class Figure:
    """One benchmarked quantity: the median of ``runs`` with their spread."""

    name: str
    unit: str
    runs: tuple[float, ...]
    params: dict[str, Any] = attrs.field(factory=dict)

    @property
    def median(self) -> float:
        """The median of the runs that gave a value (a refused run gives NaN)."""
        valid = [r for r in self.runs if r == r]
        return statistics.median(valid) if valid else float("nan")

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "median": self.median,
            "min": min((r for r in self.runs if r == r), default=float("nan")),
            "max": max((r for r in self.runs if r == r), default=float("nan")),
            "runs": list(self.runs),
            "params": self.params,
        }


def repeat(name: str, unit: str, runs: int, once: Callable[[], float], **params: Any) -> Figure:
    """Call ``once`` ``runs`` times; each call returns one measurement."""
    return Figure(name, unit, tuple(once() for _ in range(runs)), params)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def fmt(value: float) -> str:
    """A rate or a time in a short human form."""
    if value != value:
        return "refused"
    if value >= 100_000:
        return f"{value / 1000:,.0f}k"
    if value >= 10_000:
        return f"{value / 1000:,.1f}k"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(figures: list[Figure]) -> str:
    """A Markdown table of figures."""
    lines = ["| figure | median | min | max | unit |", "|---|---:|---:|---:|---|"]
    for f in figures:
        row = f.as_json()
        lines.append(
            f"| {f.name} | {fmt(row['median'])} | {fmt(row['min'])} | {fmt(row['max'])}"
            f" | {f.unit} |"
        )
    return "\n".join(lines)


def run_figures(label: str, runs: list[Any], **params: Any) -> list[Figure]:
    """Throughput and latency figures from repeated driver runs (anything with rps, p50, ...)."""
    return [
        Figure(
            f"{label}: {title}",
            unit,
            tuple(getattr(r, attr) for r in runs),
            {**params, "metric": attr},
        )
        for attr, title, unit in (
            ("rps", "requests/s", "requests/s"),
            ("p50", "p50", "ms"),
            ("p99", "p99", "ms"),
            ("p999", "p99.9", "ms"),
            ("refused", "refused", "requests"),
        )
    ]
