"""`dispers simulate` gives what computing directly on the generated population gives.

The reference here is written in the test with numpy over the generated arrays (ages by the
calendar, means with bincount), not with the simulation's own ground truth: it regenerates the
population from its definition (blocks of `block_sizes`, each from `block_seed`) and, for the
faults, from the documented draws (`SeedSequence([seed, block, 1])`: offline, then declining,
then out of bounds).

The 20,000-instance runs of the issue take a minute or more with real crypto on these loaded
2-core machines, so `make test` runs the same checks on 3,000 instances and `make test-long`
(marked slow) on 20,000.
"""

from __future__ import annotations

import json
import math
from datetime import date
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dispers.cli.main import main
from dispers.core.spec import parse_query_spec
from dispers.simulation.driver import simulate
from dispers.simulation.population import Population, PopulationSpec, generate
from dispers.simulation.report import SimulationReport
from dispers.simulation.scenario import Faults, Scenario
from dispers.simulation.shard import block_seed, block_sizes

AS_OF = date(2026, 11, 1)
EDGES = (12, 25, 50, 100)
SPEC = parse_query_spec(
    {
        "query": {"target": "age:12-25 OR age:25-50 OR age:50-100", "k": 10},
        "data": {
            "function": "mean_heart_rate",
            "as_of": AS_OF.isoformat(),
            "params": {"window_days": 30},
            "group_by": {"field": "age", "edges": list(EDGES)},
        },
        "aggregate": {"bounds": [30.0, 220.0], "stats": ["count", "mean", "std"]},
    }
)


def scenario(n: int, faults: Faults | None = None, **kw: object) -> Scenario:
    return Scenario(
        name="test", spec=SPEC, instances=n, seed=3, dp=False, k_min=5, faults=faults or Faults(), **kw
    )  # type: ignore[arg-type]


def expected(
    n: int, seed: int, faults: Faults | None = None, bounds: tuple[float, float] = (30.0, 220.0)
) -> tuple[dict[str, tuple[int, float, float]], int]:
    """Per age bracket (count, mean, std) of the answering instances' 30-day mean heart rate,
    and how many eligible instances were offline."""
    faults = faults or Faults()
    values, brackets, offline_all = [], [], 0
    for b, size in enumerate(block_sizes(n)):
        pop: Population = generate(
            PopulationSpec(n_instances=size, seed=block_seed(seed, b), as_of=AS_OF, host=f"b{b:05d}")
        )
        rng = np.random.default_rng(np.random.SeedSequence([seed, b, 1]))
        offline = rng.random(size) < faults.offline
        declining = rng.random(size) < faults.declining
        oob = rng.random(size) < faults.out_of_bounds
        end = (AS_OF - date(1970, 1, 1)).days
        inside = (pop.hr_day > end - 30) & (pop.hr_day <= end)
        count = np.bincount(pop.hr_owner[inside], minlength=size)
        total = np.bincount(pop.hr_owner[inside], weights=pop.hr_bpm[inside], minlength=size)
        ages = pop.ages_at(AS_OF)
        bracket = np.digitize(ages, EDGES) - 1  # 0, 1, 2 inside [12, 100)
        bracket[(ages < EDGES[0]) | (ages >= EDGES[-1])] = -1
        eligible = pop.consent & (count > 0) & (bracket >= 0)
        offline_all += int((eligible & offline).sum())
        mean = np.divide(total, count, out=np.full(size, np.nan), where=count > 0)
        keep = eligible & ~offline & ~declining & ~oob & (mean >= bounds[0]) & (mean <= bounds[1])
        values.append(total[keep] / count[keep])
        brackets.append(bracket[keep])
    value, bracket = np.concatenate(values), np.concatenate(brackets)
    out = {}
    for i, label in enumerate(("12-25", "25-50", "50-100")):
        v: npt.NDArray[np.float64] = value[bracket == i]
        out[label] = (len(v), float(v.mean()), float(v.std(ddof=1)))
    return out, offline_all


def check(report: SimulationReport, truth: dict[str, tuple[int, float, float]]) -> None:
    assert report.state == "done", report.error
    assert report.result is not None and not report.result.privacy.noised
    for label, (count, mean, std) in truth.items():
        group = report.result.group(label)
        assert group.values["count"] == count
        assert math.isclose(float(group.values["mean"] or 0), mean, rel_tol=1e-9)
        assert math.isclose(float(group.values["std"] or 0), std, rel_tol=1e-7)


def run_sizes(n: int) -> None:
    truth, _ = expected(n, 3)
    for crypto in ("real", "off"):
        for shards in (1, 2, 3):
            report = simulate(scenario(n), shards=shards, crypto=crypto)
            assert report.crypto == crypto and report.shards == shards
            check(report, truth)
    check(simulate(scenario(n), shards=2, crypto="real", crypto_workers=2), truth)


def test_result_equals_direct_computation_whatever_the_shards_and_crypto() -> None:
    run_sizes(3_000)


@pytest.mark.slow
def test_20000_instances_equal_direct_computation_whatever_the_shards_and_crypto() -> None:
    run_sizes(20_000)


@pytest.mark.usefixtures("local_ray")
def test_ray_backend_two_shards_gives_the_same_result() -> None:
    truth, _ = expected(2_000, 3)
    check(simulate(scenario(2_000), shards=2, backend="ray", crypto="real"), truth)


@pytest.mark.parametrize("crypto_workers", [0, 2])
def test_learned_items_follow_the_design_table(crypto_workers: int) -> None:
    """Also with the central actors' batches opened by worker processes: what a worker opens is
    counted as opened by the actor whose key it used, in the driver."""
    report = simulate(
        scenario(1_500, leaf_aggregators=2), shards=2, crypto="real", crypto_workers=crypto_workers
    )
    assert report.state == "done"
    assert report.crypto_workers == crypto_workers and len(report.pool_cpu) == crypto_workers
    n = report.counts["subscribed"]
    targets = report.counts["conductor: targets"]
    opened = {actor: info["opened"] for actor, info in report.learned.items()}
    assert n == 1_500
    assert opened["conductor"] == {}  # the Conductor opens nothing
    assert opened["ci"] == {"subscription concepts": n, "query concepts": 1}
    assert opened["tf"] == {
        "subscription tokens": n, "subscription pseudonym": n, "query expression": 1, "query tokens": 1,
    }  # fmt: skip
    assert opened["t"] == {"subscription address": n, "data request": 1, "target pseudonyms": 1}
    assert opened["da-root"] == {"aggregate spec": 1, "target count": 1, "partial aggregate": 2}
    leaves = [opened["da-1"], opened["da-2"]]
    assert all(set(leaf) == {"aggregate spec", "contribution"} for leaf in leaves)
    assert sum(leaf["contribution"] for leaf in leaves) == targets
    assert opened["pc-0"] == opened["pc-1"] == {}  # hosts open nothing
    assert opened["researcher"] == {"query result": 1}
    # Every byte the Conductor handled is counted, and it relayed both ways.
    assert report.messages["conductor"]["bytes_received"] > 0
    # The whole simulation's memory, sampled at the same instants over the driver and its
    # shards: never above the sum of each process's own peak, which adds peaks of other times.
    memory = report.memory
    assert memory["total_peak_sampled"]
    assert max(memory["shard_peak_bytes"]) < memory["total_peak_bytes"] <= memory["sum_of_peaks_bytes"]
    assert memory["sum_of_peaks_bytes"] == memory["driver_peak_bytes"] + sum(memory["shard_peak_bytes"])


def test_thirty_percent_offline_answers_on_the_rest_and_says_how_many_were_missing() -> None:
    faults = Faults(offline=0.3)
    truth, offline = expected(3_000, 3, faults)
    report = simulate(scenario(3_000, faults), shards=2, crypto="off")
    check(report, truth)
    assert offline > 0.25 * report.counts["truth: eligible"]
    assert report.counts["truth: offline"] == offline
    assert "missing from the result: " + f"{offline:,}" in report.render()
    # The offline instances' hosts answered declines for them: T forwarded one item per target.
    assert report.counts["conductor: forwarded"] == report.counts["conductor: targets"]


def test_declining_and_out_of_bounds_are_left_out_and_counted() -> None:
    faults = Faults(declining=0.1, out_of_bounds=0.05)
    truth, _ = expected(2_000, 3, faults)
    report = simulate(scenario(2_000, faults), shards=1, crypto="off")
    check(report, truth)
    assert report.result is not None
    assert report.result.dropped["out_of_bounds"] == report.counts["truth: out_of_bounds"] > 0


def test_answers_past_the_deadline_fail_the_query_loudly() -> None:
    report = simulate(
        scenario(1_000, Faults(slow=1.0), batch_size=50, host_deadline_s=0.2), shards=1, crypto="off"
    )
    assert report.state == "failed" and report.result is None
    assert report.error is not None and report.error.startswith("EXPIRED")
    assert "nothing was released" in report.render()


def test_cli_writes_the_report_and_labels_crypto_off(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sim"
    code = main(["simulate", "--instances", "1500", "--shards", "2", "--crypto", "off", "--dp", "off",
                 "--output", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0
    assert "crypto OFF" in text and "CRYPTO OFF: no box was sealed" in text
    report = json.loads((out / "report.json").read_text())
    assert report["crypto"] == "off" and "CRYPTO OFF" in report["crypto_note"]
    assert report["learned"]["conductor"]["opened"] == {}
    for name in ("result.png", "phases.png", "bytes.png", "learned.png"):
        assert (out / name).stat().st_size > 1000


def test_several_fields_count_complete_cases_and_the_first_fields_mean() -> None:
    spec = parse_query_spec(
        {
            "query": {"target": "age:25-50 OR age:50-100", "k": 10},
            "data": {
                "as_of": AS_OF.isoformat(),
                "group_by": {"field": "age", "edges": [25, 50, 100]},
                "fields": [
                    {
                        "name": "hr",
                        "function": "mean_heart_rate",
                        "params": {"window_days": 30},
                        "bounds": [30, 220],
                    },
                    {
                        "name": "w",
                        "function": "mean_weight_kg",
                        "params": {"window_days": 90},
                        "bounds": [2, 400],
                    },
                ],
            },
            "aggregate": {"stats": ["count", "mean", "corr"]},
        }
    )
    n, seed = 2_000, 3
    report = simulate(
        Scenario(name="fields", spec=spec, instances=n, seed=seed, dp=False, k_min=5), shards=2, crypto="off"
    )
    assert report.state == "done" and report.result is not None
    end = (AS_OF - date(1970, 1, 1)).days
    values, brackets = [], []
    for b, size in enumerate(block_sizes(n)):
        pop = generate(
            PopulationSpec(n_instances=size, seed=block_seed(seed, b), as_of=AS_OF, host=f"b{b:05d}")
        )
        hr = (pop.hr_day > end - 30) & (pop.hr_day <= end)
        count = np.bincount(pop.hr_owner[hr], minlength=size)
        total = np.bincount(pop.hr_owner[hr], weights=pop.hr_bpm[hr], minlength=size)
        w = (pop.weight_kg.day > end - 90) & (pop.weight_kg.day <= end)
        weighed = np.bincount(pop.weight_kg.owner[w], minlength=size) > 0
        ages = pop.ages_at(AS_OF)
        bracket = np.where(ages < 50, 0, 1)
        keep = pop.consent & (count > 0) & weighed & (ages >= 25) & (ages < 100)
        values.append(total[keep] / count[keep])
        brackets.append(bracket[keep])
    value, bracket = np.concatenate(values), np.concatenate(brackets)
    for i, label in enumerate(("25-50", "50-100")):
        group = report.result.group(label)
        assert group.values["count"] == int((bracket == i).sum())
        assert math.isclose(
            float(group.values["hr.mean"] or 0), float(value[bracket == i].mean()), rel_tol=1e-9
        )
        assert report.errors[label]["mean"]["released"] == group.values["hr.mean"]


def test_values_outside_narrow_bounds_are_dropped_as_the_das_do() -> None:
    spec = parse_query_spec(
        {**SPEC.to_obj(), "aggregate": {"bounds": [60.0, 80.0], "stats": ["count", "mean", "std"]}}
    )
    truth, _ = expected(2_000, 3, bounds=(60.0, 80.0))
    report = simulate(
        Scenario(name="narrow", spec=spec, instances=2_000, seed=3, dp=False, k_min=5), shards=2, crypto="off"
    )
    check(report, truth)
    assert report.result is not None and (report.result.dropped["out_of_bounds"] or 0) > 0
    for per in report.errors.values():  # the report's own truth applies the bounds too
        assert abs(per["mean"]["dp_error"]) < 1e-9
