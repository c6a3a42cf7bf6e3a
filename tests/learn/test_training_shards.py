"""The simulation engine on shards: the same model whatever the shards and backend, bad input refused."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dispers.cli.main import main
from dispers.core.errors import DispersError, ErrorCode
from dispers.learn.aggregate import UpdateSum, average
from dispers.learn.config import DataConfig, ExperimentConfig, TrainingConfig, parse_experiment
from dispers.learn.data import FederatedData, digits
from dispers.learn.engine import SimulationEngine
from dispers.learn.experiment import run_experiment
from dispers.learn.fixedsum import FixedSum
from dispers.learn.local import LocalSettings, batches, clip_rows, train_sequential
from dispers.learn.models import ModelShape, build_model, get_flat, set_flat
from dispers.learn.shards import TrainShard, TrainShardSpec, local_settings, records_digest, shard_records

SEED = 3
DATA = DataConfig(dataset="digits", instances=40, split="dirichlet", alpha=0.5)


def experiment(
    *, shards: int, batched: bool = True, backend: str = "local", rounds: int = 3
) -> ExperimentConfig:
    return ExperimentConfig(
        model="mlp", seed=SEED, shards=shards, backend=backend, data=DATA,
        training=TrainingConfig(rounds=rounds, cohort=12, local_epochs=2, batch_size=8, lr=0.2, clip=2.0,
                                batched=batched),
    )  # fmt: skip


@pytest.fixture(scope="module")
def data() -> FederatedData:
    return digits(n_instances=DATA.instances, split=DATA.split, alpha=DATA.alpha, seed=SEED)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train the reference as the shards do, on one torch thread (rounding depends on it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cohort_of(cfg: ExperimentConfig, n: int, round_: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, round_, 7])
    return np.flatnonzero(rng.random(n) < cfg.training.cohort / n)


def unsharded_round(cfg: ExperimentConfig, data: FederatedData, w: np.ndarray, round_: int) -> np.ndarray:
    """The single-process engine as it was before shards: every cohort member in one call, one sum."""
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    active = [int(i) for i in cohort_of(cfg, data.n_instances, round_) if data.sizes()[i] > 0]
    records = [data.records(i) for i in active]
    result = train_sequential(model, w, records, active, local_settings(cfg), seed=cfg.seed, round_=round_)
    weights = result.examples.astype(np.float64)
    total = UpdateSum.empty(len(w))
    total.add(np.concatenate([result.updates * weights[:, None], weights[:, None]], axis=1))
    return average(total, noise_multiplier=None, clip=cfg.training.clip, cohort=cfg.training.cohort)


def torch_loop_round(cfg: ExperimentConfig, data: FederatedData, w: np.ndarray, round_: int) -> np.ndarray:
    """Each cohort member trained by a plain torch loop, clipped; the example-weighted mean."""
    t = cfg.training
    plan_settings = LocalSettings(epochs=t.local_epochs, batch_size=t.batch_size)
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    updates, sizes = [], []
    for i in cohort_of(cfg, data.n_instances, round_):
        x, y = data.records(int(i))
        set_flat(model, w)
        opt = torch.optim.SGD(model.parameters(), lr=t.lr)
        for b in batches(len(y), plan_settings, seed=cfg.seed, round_=round_, instance=int(i)):
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        updates.append(get_flat(model) - w)
        sizes.append(len(y))
    clipped = clip_rows(np.array(updates), t.clip)
    return np.asarray(np.average(clipped, axis=0, weights=sizes))


def test_one_two_and_three_local_shards_train_the_same_model(data: FederatedData) -> None:
    models, losses = [], []
    for shards in (1, 2, 3):
        # Three shards generate their records from the seed; one and two are handed the data.
        given_data = None if shards == 3 else data
        result = run_experiment(experiment(shards=shards), data=given_data)
        models.append(get_flat(result.model))
        losses.append([r.train_loss for r in result.rounds])
    np.testing.assert_array_equal(models[1], models[0])
    np.testing.assert_array_equal(models[2], models[0])
    assert losses[1] == losses[0] and losses[2] == losses[0]
    # And the batched shards trained what a plain torch loop per instance trains.
    w = get_flat(build_model("mlp", ModelShape(64, 10), seed=SEED))
    with SimulationEngine(experiment(shards=1), data, build_model("mlp", ModelShape(64, 10))) as engine:
        np.testing.assert_allclose(
            engine.run_round(0, w).average_update,
            torch_loop_round(experiment(shards=1), data, w, 0),
            atol=1e-6,
        )


@pytest.mark.usefixtures("one_thread")
def test_sharded_rounds_equal_the_unsharded_engine_round_by_round(data: FederatedData) -> None:
    cfg = experiment(shards=2, batched=False)
    w = get_flat(build_model("mlp", ModelShape(64, 10), seed=SEED))
    with SimulationEngine(cfg, data, build_model("mlp", ModelShape(64, 10))) as engine:
        for r in range(3):
            got = engine.run_round(r, w)
            expected = unsharded_round(cfg, data, w, r)
            np.testing.assert_allclose(got.average_update, expected, rtol=1e-10, atol=1e-14)
            assert got.contributed == len(cohort_of(cfg, data.n_instances, r))
            w = w + got.average_update


@pytest.mark.usefixtures("local_ray")
def test_two_ray_shards_train_the_same_model(data: FederatedData) -> None:
    on_ray = run_experiment(experiment(shards=2, backend="ray", rounds=2), data=data)
    local = run_experiment(experiment(shards=1, rounds=2), data=data)
    np.testing.assert_array_equal(get_flat(on_ray.model), get_flat(local.model))


def test_a_shard_refuses_records_other_than_the_drivers(data: FederatedData) -> None:
    cfg = experiment(shards=2)
    run = range(20, 40)
    records = shard_records(data, run)
    TrainShard(TrainShardSpec(cfg, run, records_digest(records), 64, 10)).load()  # generated: the same
    x, y, offsets = records
    other = (x, (y + 1) % 10, offsets)
    with pytest.raises(DispersError) as info:
        TrainShard(TrainShardSpec(cfg, run, records_digest(other), 64, 10)).load()
    assert info.value.code is ErrorCode.INTERNAL and "instances 20-39" in info.value.message


@pytest.mark.parametrize(
    ("experiment_table", "key"),
    [
        ({"shards": 0}, "experiment.shards"),
        ({"shards": 41}, "experiment.shards"),
        ({"shards": "2"}, "experiment.shards"),
        ({"backend": "spark"}, "experiment.backend"),
        ({"address": "ray://head:10001"}, "experiment.address"),
        ({"backend": "ray", "address": ""}, "experiment.address"),
        ({"shard": 2}, "experiment.shard"),
    ],
)
def test_bad_sharding_names_the_key(experiment_table: dict[str, object], key: str) -> None:
    with pytest.raises(DispersError) as info:
        parse_experiment({"experiment": experiment_table, "data": {"instances": 40}})
    assert info.value.code is ErrorCode.CONFIG
    assert key in info.value.message


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--shards", "0"], "experiment.shards"),
        (["--shards", "21"], "experiment.shards"),
        (["--backend", "spark"], "experiment.backend"),
        (["--address", "ray://head:10001"], "experiment.address"),
        (["--shards", "2", "--engine", "local"], "--shards"),
    ],
)
def test_dispers_train_sharding_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], named: str
) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text("[data]\ninstances = 20\n[training]\nrounds = 1\ncohort = 5\n")
    assert main(["train", str(exp), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "Traceback" not in err


def test_the_engine_checks_the_shards_against_the_data_it_is_handed() -> None:
    small = digits(n_instances=3, seed=SEED)
    with pytest.raises(DispersError) as info:
        SimulationEngine(experiment(shards=5), small, build_model("mlp", ModelShape(64, 10)))
    assert info.value.code is ErrorCode.CONFIG and "experiment.shards" in info.value.message


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_subnormal=True),
        min_size=1,
        max_size=60,
    ),
    st.lists(st.integers(0, 60), max_size=5),
    st.randoms(use_true_random=False),
)
def test_fixed_sums_give_the_same_bits_in_any_split_and_order(
    values: list[float], cuts: list[int], rnd
) -> None:  # type: ignore[no-untyped-def]
    rows = np.array(values).reshape(-1, 1)
    whole = FixedSum.empty(1)
    whole.add(rows)
    parts = np.split(rows, sorted(c for c in cuts if c <= len(rows)))
    rnd.shuffle(parts)
    merged = FixedSum.empty(1)
    for part in parts:
        p = FixedSum.empty(1)
        p.add(part)
        merged.merge(p)
    assert merged.value().tobytes() == whole.value().tobytes() and merged.terms == len(values)
    exact = sum((Fraction(v) for v in values), Fraction(0))
    assert abs(Fraction(float(whole.value()[0])) - exact) <= len(values) * Fraction(1, 2**81) + abs(
        float(exact)
    ) * Fraction(1, 2**52)


def test_a_fixed_sum_refuses_non_finite_or_huge_updates() -> None:
    for bad in (np.nan, np.inf, 2.0**41):
        with pytest.raises(DispersError):
            FixedSum.empty(2).add(np.array([[1.0, bad]]))


def test_a_shard_worker_that_dies_is_a_clear_error(data: FederatedData) -> None:
    import os
    import signal

    engine = SimulationEngine(experiment(shards=2), data, build_model("mlp", ModelShape(64, 10)))
    try:
        pool = engine._backend._pools[1]  # type: ignore[union-attr]
        for pid in list(pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(DispersError) as info:
            engine.run_round(0, get_flat(build_model("mlp", ModelShape(64, 10), seed=SEED)))
        assert info.value.code is ErrorCode.UNAVAILABLE and "worker process died" in info.value.message
    finally:
        engine.close()


def test_small_populations_train_in_the_driver_and_large_ones_on_a_shard_per_core() -> None:
    from dispers.learn.engine import AUTO_SHARDS_FROM, cores, default_shards

    assert default_shards(100) == 1
    assert default_shards(AUTO_SHARDS_FROM - 1) == 1
    assert default_shards(AUTO_SHARDS_FROM) == min(cores(), AUTO_SHARDS_FROM)
    assert default_shards(100_000) == cores()
