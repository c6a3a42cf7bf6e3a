"""Results as a researcher uses them: rows, CSV and JSON that agree, plots, a DataFrame, a table."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from dispers.cli.render import result_table
from dispers.core.spec import GroupResult, QueryResult, ReleaseInfo, parse_query_spec
from dispers.results import ROW_COLUMNS, Result, all_suppressed

SPEC = parse_query_spec({
    "query": {"target": "age:25-50", "k": 10},
    "data": {"function": "mean_heart_rate", "group_by": {"field": "age", "edges": [12, 25, 50]}},
    "aggregate": {
        "bounds": [30.0, 220.0], "stats": ["count", "mean", "histogram"], "bins": [30.0, 100.0, 220.0],
    },
})  # fmt: skip
PRIVACY = ReleaseInfo(noised=True, mechanism="laplace", epsilon=1.0, epsilon_left=9.0, delta_left=1e-5)


def released() -> QueryResult:
    return QueryResult(
        query_id="0" * 32,
        k=10,
        groups=(
            GroupResult("12-25", True, {}),
            GroupResult(
                "25-50", False, {"count": 40.0, "mean": 71.25, "corr(x,y)": -0.5},
                intervals={"count": (35.0, 45.0), "mean": (69.0, 73.5)},
                noise={"count": 2.0, "mean": 1.1, "histogram": 1.4},
                histogram=(12.0, 28.0),
            ),
        ),
        contributions=40,
        dropped={"out_of_bounds": None},
        declined=None,
        privacy=PRIVACY,
    )  # fmt: skip


def test_rows_carry_every_number_and_suppressed_groups_carry_none() -> None:
    rows = Result(released(), SPEC).rows()
    by = {(r["group"], r["statistic"], r["bin"]): r for r in rows}
    assert by[("25-50", "mean", None)]["value"] == 71.25
    assert (by[("25-50", "mean", None)]["ci_low"], by[("25-50", "mean", None)]["ci_high"]) == (69.0, 73.5)
    assert by[("25-50", "count", None)]["noise_sd"] == 2.0
    assert by[("25-50", "corr(x,y)", None)]["value"] == -0.5  # a statistic the renderer never heard of
    assert by[("25-50", "histogram", "[30, 100)")]["value"] == 12.0
    assert by[("25-50", "histogram", "[100, 220]")]["value"] == 28.0
    hidden = [r for r in rows if r["group"] == "12-25"]
    assert hidden and all(r["suppressed"] for r in hidden)
    assert all(r[c] is None for r in hidden for c in ("value", "ci_low", "ci_high", "noise_sd"))
    assert {r["statistic"] for r in hidden} == {"count", "mean", "corr(x,y)", "histogram"}


def test_written_files_agree_and_the_plots_are_images(tmp_path: Path) -> None:
    from matplotlib.image import imread

    paths = Result(released(), SPEC).write(tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["result.json", "result.csv", "count.png", "mean.png", "corr_x_y.png", "histogram.png"]
    )
    obj = json.loads((tmp_path / "out" / "result.json").read_text())
    assert obj["result"]["query_id"] == "0" * 32 and obj["spec"]["query"]["target"] == "age:25-50"
    with open(tmp_path / "out" / "result.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(ROW_COLUMNS)
    assert len(table) == len(obj["rows"])
    for line, row in zip(table, obj["rows"], strict=True):
        for column in ("value", "ci_low", "ci_high", "noise_sd"):
            expect = row[column]
            assert (line[column] == "") if expect is None else math.isclose(float(line[column]), expect)
        assert line["group"] == row["group"] and line["suppressed"] == str(row["suppressed"])
    for name in ("count.png", "mean.png", "histogram.png"):
        image = imread(tmp_path / "out" / name)
        assert image.shape[:2] == (450, 800), name  # height, width in pixels


def test_a_result_with_every_group_suppressed_renders_and_plots(tmp_path: Path) -> None:
    nothing = QueryResult(
        query_id="1" * 32, k=10, groups=(GroupResult("12-25", True, {}), GroupResult("25-50", True, {})),
        contributions=0, dropped={"out_of_bounds": None}, declined=None, privacy=PRIVACY,
    )  # fmt: skip
    assert all_suppressed(nothing) and not all_suppressed(released())
    text = result_table(nothing)
    assert text.count("suppressed (< k)") == 2
    report = Result(nothing, SPEC)
    assert {r["statistic"] for r in report.rows()} == {"count", "mean", "histogram"}
    names = {p.name for p in report.write(tmp_path)}
    assert {"count.png", "mean.png", "histogram.png"} <= names


def test_dataframe_html_and_repr() -> None:
    pd = pytest.importorskip("pandas")
    report = Result(released(), SPEC)
    frame = report.to_dataframe()
    assert isinstance(frame, pd.DataFrame) and list(frame.columns) == list(ROW_COLUMNS)
    mean = frame[(frame.group == "25-50") & (frame.statistic == "mean")]
    assert mean["value"].item() == 71.25
    page = report._repr_html_()
    assert "<table>" in page and "suppressed" in page and "71.25" in page and "[69, 73.5]" in page
    assert "25-50" in repr(report) and "suppressed (< k)" in repr(report)
    assert report.value("25-50", "mean") == 71.25 and report.value("12-25", "mean") is None


def test_csv_text_parses_back_to_the_rows() -> None:
    report = Result(released(), SPEC)
    back = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["statistic"] for r in back] == [r["statistic"] for r in report.rows()]


def test_without_pandas_the_dataframe_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from dispers.core.errors import DispersError

    monkeypatch.setitem(sys.modules, "pandas", None)  # as if it were not installed
    report = Result(released(), SPEC)
    with pytest.raises(DispersError, match="pip install pandas"):
        report.to_dataframe()
    assert len(report.rows()) == 2 * (3 + 2)  # 3 statistics and 2 histogram bins a group: no pandas needed


def test_a_spec_may_be_given_as_a_mapping_a_path_or_a_spec(tmp_path: Path) -> None:
    from dispers.client import as_spec

    path = tmp_path / "s.toml"
    path.write_text('[query]\ntarget = "age:25-50"\nk = 10\n[data]\nfunction = "mean_heart_rate"\n'
                    '[aggregate]\nbounds = [30.0, 220.0]\nstats = ["count"]\n')  # fmt: skip
    from_path = as_spec(path)
    assert from_path == as_spec(str(path)) == as_spec(from_path)
    assert as_spec({"query": {"target": "age:25-50", "k": 10}, "data": {"function": "mean_heart_rate"},
                    "aggregate": {"bounds": [30.0, 220.0], "stats": ["count"]}}) == from_path  # fmt: skip
