"""Plain-text tables for the CLI: results beside ground truth, phase timings."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from dispers.core.spec import GroupResult, QueryResult
from dispers.simulation.ground_truth import GroupTruth
from dispers.state.queries import QueryRecord


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, left: Collection[int] = (0,)) -> str:
    """Columns numbered in `left` left-aligned (the first by default), the others right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i in left else str(c).rjust(w)
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


def _with_interval(group: GroupResult, stat: str, value: float | None) -> str:
    shown = _fmt(value)
    interval = group.intervals.get(stat)
    if interval is None or value is None:
        return shown
    return f"{shown} ±{_fmt((interval[1] - interval[0]) / 2)}"


ORDER = ("count", "mean", "std", "min", "max", "sum", "var", "median")


def result_table(result: QueryResult, truth: Mapping[str, GroupTruth] | None = None) -> str:
    """Per group: every released statistic (whatever the release carries), and the ground truth
    when known; suppressed groups say so, with no number."""
    from dispers.results import group_statistics

    scalars = [group_statistics(g.to_obj()) for g in result.groups]
    seen: list[str] = []
    for sc in scalars:
        seen += [k for k in sc if k not in seen]
    stats = [s for s in ORDER if s in seen] + [s for s in seen if s not in ORDER]
    headers = ["group", *(stats or ["released"])]
    if truth is not None:
        headers += ["true count", "true mean", "true std", "|Δ mean|"]
    rows = []
    for g, sc in zip(result.groups, scalars, strict=True):
        if g.suppressed:
            row = [
                g.label,
                "suppressed (< k)",
                *([""] * (len(headers) - 2 - (4 if truth is not None else 0))),
            ]
        else:
            row = [g.label, *(_with_interval(g, s, sc.get(s)) for s in stats)] if stats else [g.label, "-"]
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
