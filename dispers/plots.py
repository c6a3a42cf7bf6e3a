"""A PNG per statistic of a released result (matplotlib's Agg canvas: no display, no pyplot state).

Groups lie on the horizontal axis; each value is a point with its 95% interval as error bars;
a suppressed group is marked as such, with no number; histograms are bars per bin, one colour
per released group.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispers.results import Result, png_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH_IN, HEIGHT_IN, DPI = 8.0, 4.5, 100
"""Every plot is 800 x 450 pixels."""


def _figure() -> tuple[Figure, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    return path


def _title(result: Result, statistic: str) -> str:
    p = result.result.privacy
    how = f"DP {p.mechanism}, epsilon {p.epsilon:g}" if p.noised else "exact"
    return f"{statistic} by group ({how}; bars: 95% interval; k = {result.result.k})"


def plot_statistic(result: Result, statistic: str, path: Path) -> Path:
    """One statistic by group: value with its 95% interval; suppressed groups marked."""
    figure, ax = _figure()
    rows = [r for r in result.rows() if r["statistic"] == statistic and r["bin"] is None]
    labels = [r["group"] for r in rows]
    xs = list(range(len(rows)))
    shown = [
        (x, r) for x, r in zip(xs, rows, strict=True)
        if not r["suppressed"] and r["value"] is not None and math.isfinite(r["value"])
    ]  # fmt: skip
    if shown:
        values = [r["value"] for _, r in shown]
        lower = [
            max(0.0, v - r["ci_low"]) if r["ci_low"] is not None else 0.0
            for v, (_, r) in zip(values, shown, strict=True)
        ]
        upper = [
            max(0.0, r["ci_high"] - v) if r["ci_high"] is not None else 0.0
            for v, (_, r) in zip(values, shown, strict=True)
        ]
        ax.errorbar([x for x, _ in shown], values, yerr=[lower, upper], fmt="o", capsize=5, color="tab:blue",
                    label="released value, 95% interval")  # fmt: skip
    suppressed = [x for x, r in zip(xs, rows, strict=True) if r["suppressed"]]
    if suppressed:
        bottom = ax.get_ylim()[0] if shown else 0.0
        ax.scatter(suppressed, [bottom] * len(suppressed), marker="x", color="tab:red", s=60, zorder=3,
                   label="suppressed (< k): no number released")  # fmt: skip
        for x in suppressed:
            ax.annotate("suppressed", (x, bottom), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8, color="tab:red")  # fmt: skip
    ax.set_xticks(xs)
    ax.set_xticklabels(
        labels, rotation=30 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center"
    )
    ax.set_xlim(-0.6, max(len(xs) - 0.4, 0.6))
    ax.set_xlabel("group")
    ax.set_ylabel(statistic)
    ax.set_title(_title(result, statistic), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if shown or suppressed:
        ax.legend(fontsize=8, loc="best")
    return _save(figure, path)


def plot_histogram(result: Result, path: Path) -> Path:
    """Counts per bin as bars, side by side for each released group; suppressed groups named."""
    figure, ax = _figure()
    by_group: OrderedDict[str, list[tuple[str, float | None, bool]]] = OrderedDict()
    for r in result.rows():
        if r["statistic"] == "histogram":
            by_group.setdefault(r["group"], []).append((r["bin"], r["value"], r["suppressed"]))
    released = [(g, bins) for g, bins in by_group.items() if not any(s for _, _, s in bins)]
    hidden = [g for g, bins in by_group.items() if any(s for _, _, s in bins)]
    bins = next(iter(by_group.values()), [])
    xs = list(range(len(bins)))
    width = 0.8 / max(1, len(released))
    for i, (group, cells) in enumerate(released):
        heights = [v if v is not None and math.isfinite(v) else 0.0 for _, v, _ in cells]
        ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], heights, width=width, label=group)
    ax.set_xticks(xs)
    ax.set_xticklabels([b for b, _, _ in bins], rotation=30 if len(bins) > 6 else 0, fontsize=8)
    ax.set_xlabel("bin")
    ax.set_ylabel("count")
    title = _title(result, "histogram").replace("; bars: 95% interval", "")
    if hidden:
        title += "\nsuppressed (< k): " + ", ".join(hidden)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    if released:
        ax.legend(fontsize=8, loc="best")
    return _save(figure, path)


def plot_result(result: Result, directory: Path) -> list[Path]:
    """A PNG per statistic (and one for the histograms) in `directory`; the paths written."""
    statistics: list[str] = []
    histogram = False
    for r in result.rows():
        if r["statistic"] == "histogram" and r["bin"] is not None:
            histogram = True
        elif r["statistic"] not in statistics:
            statistics.append(r["statistic"])
    written = [plot_statistic(result, s, directory / png_name(s)) for s in statistics]
    if histogram:
        written.append(plot_histogram(result, directory / png_name("histogram")))
    return written
