"""A released query result as a researcher uses it: rows, a pandas DataFrame, files and plots.

Rendering is generic: every statistic a group carries (its ``values``, and any other numbers a
newer release adds) becomes rows, columns and a plot, so new statistics show up unchanged.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dispers.core.spec import QueryResult, QuerySpec

if TYPE_CHECKING:
    import pandas

ROW_COLUMNS = ("group", "statistic", "bin", "value", "ci_low", "ci_high", "noise_sd", "suppressed")
"""The columns of result.csv, `--format csv` and `Result.to_dataframe()`, one row per number."""

_GROUP_META = ("label", "suppressed", "intervals", "noise", "histogram")


def _flatten(prefix: str, obj: Any) -> Iterator[tuple[str, float | None]]:
    """(name, number) of every number in `obj`: dict keys joined with '.', list items as [i]."""
    if obj is None or isinstance(obj, bool):
        if prefix:
            yield prefix, None if obj is None else float(obj)
    elif isinstance(obj, int | float):
        yield prefix, float(obj)
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), value)
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from _flatten(f"{prefix}[{i}]", value)


def group_statistics(group_obj: Mapping[str, Any]) -> dict[str, float | None]:
    """A group's statistics by name: its values, then anything else a release carries."""
    out = dict(_flatten("", group_obj.get("values", {})))
    for key, value in group_obj.items():
        if key not in _GROUP_META and key != "values":
            out.update(_flatten(key, value))
    return out


def bin_labels(bins: Sequence[float] | None, n: int) -> list[str]:
    """'[lo, hi)' per histogram bin when the edges are known (the last bin is closed), else its index."""
    if bins is None or len(bins) != n + 1:
        return [str(i) for i in range(n)]

    def num(x: float) -> str:
        return f"{x:g}"

    return [
        f"[{num(lo)}, {num(hi)}{']' if i == n - 1 else ')'}"
        for i, (lo, hi) in enumerate(zip(bins, bins[1:], strict=False))
    ]


def result_rows(result: QueryResult, *, spec: QuerySpec | None = None) -> list[dict[str, Any]]:
    """One row per released number (ROW_COLUMNS): group, statistic, histogram bin, value, its 95%
    interval and noise standard deviation; a suppressed group has one row per statistic, with no
    number at all."""
    groups = [g.to_obj() for g in result.groups]
    scalars = [group_statistics(g) for g in groups]
    names: list[str] = []
    for s in scalars:
        names += [n for n in s if n not in names]
    has_histogram = any(g.get("histogram") for g in groups)
    if not names and spec is not None:  # every group suppressed: list what was asked
        names = [s for s in spec.stats if s not in ("histogram", "quantiles")]
        has_histogram = has_histogram or "histogram" in spec.stats
    n_bins = max((len(g.get("histogram") or ()) for g in groups), default=0)
    if not n_bins and spec is not None and spec.bins:
        n_bins = len(spec.bins) - 1
    labels = bin_labels(spec.bins if spec is not None else None, n_bins)
    rows: list[dict[str, Any]] = []
    for g, s in zip(groups, scalars, strict=True):
        suppressed = bool(g.get("suppressed"))
        intervals = g.get("intervals") or {}
        noise = g.get("noise") or {}
        for name in names:
            interval = intervals.get(name)
            value = None if suppressed else s.get(name)
            rows.append({
                "group": g["label"], "statistic": name, "bin": None,
                "value": value,
                "ci_low": None if suppressed or not interval else float(interval[0]),
                "ci_high": None if suppressed or not interval else float(interval[1]),
                "noise_sd": None if suppressed else noise.get(name),
                "suppressed": suppressed,
            })  # fmt: skip
        if has_histogram:
            histogram = [] if suppressed else list(g.get("histogram") or ())
            sd = None if suppressed else noise.get("histogram")
            for i, label in enumerate(labels):
                rows.append({
                    "group": g["label"], "statistic": "histogram", "bin": label,
                    "value": histogram[i] if i < len(histogram) else None,
                    "ci_low": None, "ci_high": None, "noise_sd": sd, "suppressed": suppressed,
                })  # fmt: skip
    return rows


def _cell(value: Any) -> Any:
    """A CSV cell: empty for no number, floats in full (repr), as JSON writes them."""
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as CSV text with a header (empty cells for missing numbers; floats in full)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=ROW_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in ROW_COLUMNS})
    return out.getvalue()


def all_suppressed(result: QueryResult) -> bool:
    """Whether no group was released (each under k, or no group at all)."""
    return all(g.suppressed for g in result.groups)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "statistic"


@dataclass(frozen=True)
class Result:
    """A released result with what it answered: the spec (when known) and the query id."""

    result: QueryResult
    spec: QuerySpec | None = None

    @property
    def query_id(self) -> str:
        """The id of the query that released it."""
        return self.result.query_id

    @property
    def groups(self) -> tuple[str, ...]:
        """Group labels, in the order of the spec."""
        return tuple(g.label for g in self.result.groups)

    def value(self, group: str, statistic: str) -> float | None:
        """One released number (None if the group is suppressed or does not carry it)."""
        g = self.result.group(group)
        return None if g.suppressed else group_statistics(g.to_obj()).get(statistic)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per released number (see ROW_COLUMNS)."""
        return result_rows(self.result, spec=self.spec)

    def to_dataframe(self) -> pandas.DataFrame:
        """The rows as a pandas DataFrame (pandas is optional: install it to use this)."""
        try:
            import pandas as pd
        except ImportError:
            from dispers.core.errors import DispersError, ErrorCode

            raise DispersError(
                ErrorCode.FAILED_PRECONDITION, "to_dataframe needs pandas: pip install pandas"
            ) from None
        return pd.DataFrame(self.rows(), columns=list(ROW_COLUMNS))

    def to_obj(self) -> dict[str, Any]:
        """What result.json holds: the spec, the result as released, and its rows."""
        return {
            "query_id": self.query_id,
            "spec": self.spec.to_obj() if self.spec is not None else None,
            "result": self.result.to_obj(),
            "rows": self.rows(),
        }

    def to_json(self) -> str:
        """result.json's text."""
        return json.dumps(self.to_obj(), indent=2, default=str) + "\n"

    def to_csv(self) -> str:
        """result.csv's text."""
        return rows_to_csv(self.rows())

    def write(self, directory: str | Path, *, plots: bool = True) -> list[Path]:
        """Write result.json, result.csv and a PNG per statistic into `directory`; the paths."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name, text in (("result.json", self.to_json()), ("result.csv", self.to_csv())):
            path = out / name
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(path)
            written.append(path)
        if plots:
            from dispers.plots import plot_result

            written += plot_result(self, out)
        return written

    def _summary(self) -> str:
        p = self.result.privacy
        noise = (
            f"DP {p.mechanism}, epsilon {p.epsilon:g}, delta {p.delta:g}" if p.noised else "exact (DP off)"
        )
        return f"query {self.query_id}: {len(self.result.groups)} groups, k = {self.result.k}, {noise}"

    def __repr__(self) -> str:
        from dispers.cli.render import result_table

        return f"<dispers.Result {self._summary()}>\n{result_table(self.result)}"

    def _repr_html_(self) -> str:
        """A notebook table: a row per group, a column per statistic with its 95% interval."""
        stats: list[str] = []
        for g in self.result.groups:
            stats += [s for s in group_statistics(g.to_obj()) if s not in stats]
        head = "".join(f"<th>{html.escape(s)}</th>" for s in ["group", *stats])
        body = []
        for g in self.result.groups:
            if g.suppressed:
                cells = f'<td colspan="{max(1, len(stats))}"><i>suppressed (&lt; k)</i></td>'
            else:
                scalars = group_statistics(g.to_obj())
                cells = ""
                for s in stats:
                    v = scalars.get(s)
                    text = "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"
                    if s in g.intervals and v is not None:
                        lo, hi = g.intervals[s]
                        text += f" <small>[{lo:.4g}, {hi:.4g}]</small>"
                    cells += f"<td>{text}</td>"
            body.append(f"<tr><td>{html.escape(g.label)}</td>{cells}</tr>")
        caption = html.escape(self._summary())
        return (
            f"<table><caption>{caption}</caption><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
        )


def png_name(statistic: str) -> str:
    """The file name of a statistic's plot."""
    return f"{_safe_name(statistic)}.png"
