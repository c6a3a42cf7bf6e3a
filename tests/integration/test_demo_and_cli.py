"""The demo as a user runs it (separate `dispers serve` processes) and the `dispers` command."""

from __future__ import annotations

import io
import json
import math
import stat
from pathlib import Path

import pytest

from dispers.cli.demo import DEFAULT_SPEC, run_demo
from dispers.cli.main import main
from dispers.simulation.ground_truth import mean_heart_rate_by_age
from tests.integration.conftest import grpc_world
from tests.integration.world import AS_OF, make_setup


def test_demo_over_separate_processes_is_near_the_ground_truth(tmp_path: Path) -> None:
    out = io.StringIO()
    report = run_demo(instances=10_000, workdir=tmp_path / "demo", out=out)
    outcome = report.outcome
    assert outcome.record.state == "done"
    assert outcome.result is not None
    # The demo runs the product's default: differential privacy on. Every released number is
    # near the ground truth, within a few half-widths of its 95% interval (never exact).
    assert outcome.result.privacy.noised
    for group in outcome.result.groups:
        truth = report.truth[group.label]
        assert not group.suppressed
        for stat_name in ("count", "mean", "std"):
            value = group.values[stat_name]
            lo, hi = group.intervals[stat_name]
            assert value is not None and lo <= value <= hi
        # std is clipped at 0 (its interval can collapse there, ~2% of runs), so only count and
        # mean are held to "within 4 half-widths of the truth".
        for stat_name in ("count", "mean"):
            value = group.values[stat_name]
            lo, hi = group.intervals[stat_name]
            near = abs(value - getattr(truth, stat_name)) <= 4 * (hi - lo) / 2 + 1e-9  # type: ignore[operator]
            assert near, (group.label, stat_name)
        assert 0 <= group.values["std"] <= (220 - 30) / 2  # type: ignore[operator]
    text = out.getvalue()
    assert "true mean" in text and "query: collect" in text and "subscribe 10000 instances" in text
    # Nine processes wrote their logs; none holds a traceback.
    logs = list((tmp_path / "demo" / "logs").glob("*.log"))
    assert len(logs) == 9
    assert not [p.name for p in logs if "Traceback" in p.read_text()]


@pytest.fixture
def cluster(tmp_path: Path):  # type: ignore[no-untyped-def]
    world = grpc_world(make_setup(tmp_path / "c", n=400))
    world.subscribe()
    yield world
    world.close()


def test_dispers_query_prints_the_opened_result(cluster, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    config = str(cluster.setup.config.path)
    assert main(["query", str(DEFAULT_SPEC), "--config", config, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["state"] == "done"
    truth = mean_heart_rate_by_age(
        cluster.setup.population, edges=[12, 25, 50, 100], window_days=30, as_of=AS_OF, bounds=(30, 220)
    )
    for group in printed["result"]["groups"]:
        assert group["values"]["count"] == truth[group["label"]].count
        assert math.isclose(group["values"]["mean"], truth[group["label"]].mean, rel_tol=1e-9)
    # The table form, and `dispers status` for the same query.
    assert main(["status", printed["query_id"], "--config", config]) == 0
    table = capsys.readouterr().out
    assert "25-50" in table and "query: collect" not in table  # a querier is shown no timings


def test_dispers_query_reports_bad_spec_clearly(
    cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "bad.toml"
    spec.write_text('[query]\ntarget = "age:12-25 AND ("\n[data]\nfunction = "mean_heart_rate"\n'
                    '[aggregate]\nbounds = [30, 220]\n')  # fmt: skip
    assert main(["query", str(spec), "--config", str(cluster.setup.config.path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MALFORMED: query spec: query.target: the target expression does not parse")


def test_keygen_writes_owner_only_key_and_roster_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keygen", "alice", "--role", "querier", "--out", str(tmp_path)]) == 0
    key = tmp_path / "alice.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert 'role = "querier"' in out and "sealing_public_key" in out
    assert "sealing_private_key" not in out
    assert main(["keygen", "alice", "--out", str(tmp_path)]) == 2  # no silent overwrite
    assert "exists" in capsys.readouterr().err


def test_serve_refuses_an_ambiguous_or_unknown_actor(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = make_setup(tmp_path / "s", n=10)
    config = str(setup.config.path)
    assert main(["serve", "data_aggregator", "--config", config]) == 2
    assert "pick one with --name" in capsys.readouterr().err
    assert main(["serve", "oracle", "--config", config]) == 2
    assert "unknown role 'oracle'" in capsys.readouterr().err


def test_dispers_query_and_budget_on_a_dp_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The researcher's view on a cluster whose policy is DP (the default): the result is
    printed with its intervals and what it cost, and `dispers budget` shows what is left."""
    world = grpc_world(make_setup(tmp_path / "dp", n=400, dp=True))
    try:
        world.subscribe()
        config = str(world.setup.config.path)
        assert main(["query", str(DEFAULT_SPEC), "--config", config]) == 0
        table = capsys.readouterr().out
        assert "differentially private: laplace noise, epsilon 1" in table and "±" in table
        assert main(["budget", "--config", config, "--json"]) == 0
        budget = json.loads(capsys.readouterr().out)
        settings = world.setup.config.settings
        assert budget["queries"] == 1 and budget["spent"]["epsilon"] == 1.0
        assert budget["left"]["epsilon"] == settings.budget_epsilon - 1.0
        assert main(["budget", "--config", config, "--querier", "nobody"]) == 2
        assert capsys.readouterr().err.startswith("error: UNAUTHORIZED")
    finally:
        world.close()


def test_dispers_query_prints_histograms_and_quantiles(
    cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "hist.toml"
    text = DEFAULT_SPEC.read_text().replace(
        'stats = ["count", "mean", "std"]',
        'stats = ["count", "histogram", "median", "quantiles"]\n'
        "bins = [40, 60, 70, 80, 130]\nquantiles = [0.9]",
    )
    spec.write_text(text)
    assert main(["query", str(spec), "--config", str(cluster.setup.config.path)]) == 0
    out = capsys.readouterr().out
    assert "median" in out and "q0.9" in out and "histogram (count per bin" in out and "25-50: " in out
