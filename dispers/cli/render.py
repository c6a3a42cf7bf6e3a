"""Plain-text tables for the CLI: results beside ground truth, phase timings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dispers.core.spec import GroupResult, QueryResult
from dispers.simulation.ground_truth import GroupTruth
from dispers.state.queries import QueryRecord


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    if abs(value) < 10 ** -(digits - 1):  # a slope of -0.0004 must not print as -0.000
        return f"{value:.{digits}g}"
    return f"{value:.{digits}f}"


def _with_interval(group: GroupResult, stat: str) -> str:
    value = _fmt(group.values.get(stat))
    interval = group.intervals.get(stat)
    if interval is None:
        return value
    return f"{value} ±{_fmt((interval[1] - interval[0]) / 2)}"


def result_table(result: QueryResult, truth: Mapping[str, GroupTruth] | None = None) -> str:
    """Per group: the released statistics, and the ground truth when known."""
    order = ("count", "mean", "std", "min", "max", "sum", "var", "median")
    quantiles = sorted({k for g in result.groups for k in g.values if k.startswith("q")})
    stats = [s for s in (*order, *quantiles) if any(s in g.values for g in result.groups)]
    # Several fields (hr.mean, cov(hr,weight), ols.weight ...): every other key, in release order.
    stats += list(dict.fromkeys(k for g in result.groups for k in g.values if k not in stats))
    headers = ["group", *stats]
    if truth is not None:
        headers += ["true count", "true mean", "true std", "|Δ mean|"]
    rows = []
    for g in result.groups:
        if g.suppressed:
            row = [g.label, *(["suppressed (< k)"] + [""] * (len(stats) - 1))]
        else:
            row = [g.label, *(_with_interval(g, s) for s in stats)]
        if truth is not None:
            t = truth.get(g.label)
            if t is None:
                row += ["-"] * 4
            else:
                mean = g.values.get("mean")
                delta = "-" if mean is None or g.suppressed else f"{abs(mean - t.mean):.2e}"
                row += [str(t.count), _fmt(t.mean), _fmt(t.std), delta]
        rows.append(row)
    out = table(headers, rows)
    histograms = [g for g in result.groups if g.histogram]
    if histograms:
        out += "\n\nhistogram (count per bin, in the order of the declared bins)"
        for g in histograms:
            out += f"\n{g.label}: " + " ".join(_fmt(x) for x in g.histogram)
    extras = [f"{result.contributions} contributions in the released groups, k = {result.k}"]
    p = result.privacy
    if p.noised:
        left = (
            ""
            if p.epsilon_left is None
            else f"; budget left: epsilon {p.epsilon_left:g}, delta {p.delta_left:g}"
        )
        extras.append(
            f"differentially private: {p.mechanism} noise, epsilon {p.epsilon:g}, delta {p.delta:g}{left}; "
            "± is the half-width of a 95% interval"
        )
    else:
        extras.append("exact: this cluster's policy turns differential privacy off")

    def count(n: int | None) -> str:
        return f"< {result.k}" if n is None else str(n)

    extras.append(f"declined: {count(result.declined)}")
    if result.clipped is not None:
        extras.append(f"clipped to their bounds: {count(result.clipped)}")
    if result.dropped:
        extras.append(
            "dropped by the aggregators: "
            + ", ".join(
                f"{reason.replace('_', ' ')} {count(n)}" for reason, n in sorted(result.dropped.items())
            )
        )
    return out + "\n" + "\n".join(extras)


PHASE_ORDER = ("tokens", "targets", "prepare", "collect", "aggregate")


def phase_table(record: QueryRecord, extra: Mapping[str, float] | None = None) -> str:
    """Seconds per phase, as the Conductor measured them (plus any extra phases given)."""
    rows = [[name, f"{seconds:.3f}"] for name, seconds in (extra or {}).items()]
    names = [p for p in PHASE_ORDER if p in record.phases] + sorted(
        p for p in record.phases if p not in PHASE_ORDER
    )
    rows += [[f"query: {p}", f"{record.phases[p]:.3f}"] for p in names]
    return table(["phase", "seconds"], rows)


def counts_line(record: QueryRecord) -> str:
    """The query's state, and whatever sizes of the Conductor's the viewer may see (a querier
    sees none: the number of targets would give a suppressed group's size away)."""
    parts = [f"{k}={v}" for k, v in sorted(record.counts.items())]
    return f"query {record.query_id}: {record.state}" + (f" ({', '.join(parts)})" if parts else "")
