"""Federated training through the actors: FedAvg against a direct computation, canaries, lengths, budget."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dispers.core.config import load_config
from dispers.core.errors import DispersError, ErrorCode
from dispers.crypto.observe import recording
from dispers.learn.cluster import ClusterEngine, instance_ids, write_training_cluster
from dispers.learn.config import DataConfig, ExperimentConfig, PrivacyConfig, TrainingConfig
from dispers.learn.data import FederatedData, digits
from dispers.learn.experiment import run_experiment
from dispers.learn.local import LocalSettings, batches
from dispers.learn.models import ModelShape, build_model, get_flat, set_flat
from dispers.protocol.learning.aggregator import RoundAggregator


def small_digits(n: int = 12, empty: tuple[int, ...] = ()) -> FederatedData:
    """`n` instances of digits (IID); the instances in `empty` hold no records (they decline)."""
    d = digits(n_instances=n, split="iid", seed=3)
    sizes = d.sizes().copy()
    keep = np.ones(len(d.y), dtype=bool)
    for i in empty:
        keep[d.offsets[i] : d.offsets[i + 1]] = False
        sizes[i] = 0
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return FederatedData(d.x[keep], d.y[keep], offsets, d.x_test, d.y_test, d.n_classes)


def config(n: int, *, model: str = "mlp", **training: object) -> ExperimentConfig:
    base = {"rounds": 1, "cohort": n, "local_epochs": 2, "batch_size": 8, "lr": 0.2}
    base.update(training)
    return ExperimentConfig(
        engine="local", model=model, seed=5, data=DataConfig(instances=n),
        training=TrainingConfig(**base),  # type: ignore[arg-type]
    )  # fmt: skip


def direct_fedavg(
    cfg: ExperimentConfig,
    data: FederatedData,
    w0: np.ndarray,
    round_: int,
    instance_key: Callable[[int], int] = lambda i: i,
) -> np.ndarray:
    """Each instance trained with a plain torch loop on its own records, its batches drawn by
    `instance_key(i)` (the row itself, as the simulation draws them); the example-weighted mean."""
    settings = LocalSettings(epochs=cfg.training.local_epochs, batch_size=cfg.training.batch_size)
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    total, weight = np.zeros_like(w0), 0.0
    for i in range(data.n_instances):
        x, y = data.records(i)
        if len(y) == 0:
            continue
        set_flat(model, w0)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.training.lr)
        for b in batches(len(y), settings, seed=cfg.seed, round_=round_, instance=instance_key(i)):
            opt.zero_grad()
            F.cross_entropy(model(x[b]), y[b]).backward()
            opt.step()
        total += len(y) * (get_flat(model) - w0)
        weight += len(y)
    return total / weight


def three_level(directory: Path, data: FederatedData) -> object:
    """root <- da-1 <- {da-2, da-3}: a middle layer of aggregators."""
    cfg = write_training_cluster(directory, data, dp=False, leaf_aggregators=3)
    text = cfg.path.read_text()
    blocks = text.split("[[actor]]")
    for k, block in enumerate(blocks):
        if re.search(r'^name = "da-[23]"$', block, re.M):
            blocks[k] = block.replace('parent = "da-root"', 'parent = "da-1"')
    cfg.path.write_text("[[actor]]".join(blocks))
    return load_config(cfg.path)


@pytest.mark.parametrize("shape", ["two leaves", "three levels"])
def test_one_round_equals_the_direct_average_of_locally_trained_weights(tmp_path: Path, shape: str) -> None:
    data = small_digits(12, empty=(4,))
    cfg = config(12)
    cluster_config = three_level(tmp_path, data) if shape == "three levels" else None
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes), seed=cfg.seed)
    w0 = get_flat(model)
    engine = ClusterEngine(cfg, data, model, directory=tmp_path, cluster_config=cluster_config)  # type: ignore[arg-type]
    try:
        if shape == "three levels":
            assert engine.cluster_config.roster.da_plan().layers()[0] == ("da-2", "da-3")
        out = engine.run_round(0, w0)
        assert all(da.active_rounds == 0 for da in engine.das.values())
    finally:
        engine.close()
    assert (out.asked, out.contributed, out.declined) == (12, 11, 1)
    expected = direct_fedavg(cfg, data, w0, 0)
    np.testing.assert_allclose(out.average_update, expected, atol=2e-6)
    assert np.abs(expected).max() > 1e-2  # the round did move the model


def test_only_the_leaf_aggregators_open_updates_and_every_sealed_update_has_one_length(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = small_digits(12, empty=(1, 7))
    cfg = config(12, clip=0.5)
    lengths: list[int] = []
    ingest = RoundAggregator.ingest

    def spy(self: RoundAggregator, query_id: str, ciphertexts: list[bytes]) -> int:
        lengths.extend(len(c) for c in ciphertexts)
        return ingest(self, query_id, ciphertexts)

    monkeypatch.setattr(RoundAggregator, "ingest", spy)
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(cfg, data, model, directory=tmp_path)
    try:
        with recording() as seen:
            out = engine.run_round(0, get_flat(model))
    finally:
        engine.close()
    assert (out.contributed, out.declined) == (10, 2)
    assert len(lengths) == 12 and len(set(lengths)) == 1  # updates and declines alike
    record_size = len(get_flat(model)) * 8 + 8 + 22
    openers_of_updates = {s.actor for s in seen if len(s.plaintext) == record_size}
    assert openers_of_updates == {"da-1", "da-2"}
    assert {s.actor for s in seen if s.what == "model update"} == {"da-1", "da-2"}
    # No DA sees which instance sent what: no instance id in anything a DA opened.
    ids = [i.encode() for i in instance_ids(12)]
    for s in seen:
        if s.actor.startswith("da-"):
            assert not any(i in s.plaintext for i in ids)
    # The global model was opened by the host only; the Conductor opened nothing.
    assert {s.actor for s in seen if s.what == "global model"} == {"pc-1"}
    assert not [s for s in seen if s.actor == "conductor"]


def test_a_budget_overrun_stops_training_with_a_clear_message_and_the_ledger_shows_the_spend(
    tmp_path: Path,
) -> None:
    data = small_digits(12)
    cfg = ExperimentConfig(
        engine="local", model="logreg", seed=1, data=DataConfig(instances=12),
        training=TrainingConfig(rounds=20, cohort=6, batch_size=8, clip=1.0, weighting="uniform"),
        privacy=PrivacyConfig(user_level=True, noise_multiplier=1.5, delta=1e-5, budget_epsilon=3.0),
    )  # fmt: skip
    result = run_experiment(cfg, data=data)
    assert result.stopped is not None
    n = len(result.rounds)
    assert 1 <= n < 20
    assert result.stopped.startswith(f"training stopped before round {n + 1}: it would spend epsilon")
    spent = result.rounds[-1].epsilon
    assert spent <= 3.0
    assert result.rounds[-1].budget_left == pytest.approx(3.0 - spent, abs=1e-9)


def test_the_ledger_is_charged_the_accountants_epsilon(tmp_path: Path) -> None:
    from dispers.learn.accounting import UserLevelDP, epsilon_after

    data = small_digits(12)
    cfg = ExperimentConfig(
        engine="local", model="logreg", seed=1, data=DataConfig(instances=12),
        training=TrainingConfig(rounds=3, cohort=6, batch_size=8, clip=1.0, weighting="uniform"),
        privacy=PrivacyConfig(user_level=True, noise_multiplier=2.0, delta=1e-5, budget_epsilon=50.0),
    )  # fmt: skip
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(cfg, data, model, directory=tmp_path)
    try:
        w = get_flat(model)
        for r in range(3):
            out = engine.run_round(r, w)
        status = engine.das["da-root"].budget("researcher", "researcher")
    finally:
        engine.close()
    expected = epsilon_after(UserLevelDP(2.0, 6 / 12, 1e-5), 3)
    assert out.epsilon_spent == pytest.approx(expected)
    assert status.spent.epsilon == pytest.approx(expected)
    assert status.spent.delta == pytest.approx(1e-5)


def test_a_round_out_of_order_is_refused(tmp_path: Path) -> None:
    data = small_digits(12)
    cfg = ExperimentConfig(
        engine="local", model="logreg", seed=1, data=DataConfig(instances=12),
        training=TrainingConfig(rounds=3, cohort=6, batch_size=8, clip=1.0, weighting="uniform"),
        privacy=PrivacyConfig(user_level=True, noise_multiplier=2.0, delta=1e-5, budget_epsilon=50.0),
    )  # fmt: skip
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(cfg, data, model, directory=tmp_path)
    try:
        with pytest.raises(DispersError) as info:
            engine.run_round(5, get_flat(model))  # a later round costs less: the root counts them
    finally:
        engine.close()
    assert info.value.code is ErrorCode.FAILED_PRECONDITION
    assert "next round is 0" in info.value.message


def test_the_same_rounds_over_grpc_and_in_process_give_the_same_model(tmp_path: Path) -> None:
    """Cohort = every instance and no noise: the model is a function of the seed alone."""
    data = small_digits(10, empty=(2,))
    models = {}
    for engine in ("local", "grpc"):
        cfg = dataclasses.replace(config(10, model="logreg", rounds=2, clip=2.0), engine=engine)
        result = run_experiment(cfg, data=data, output=tmp_path / engine)
        assert [r.contributed for r in result.rounds] == [9, 9]
        models[engine] = get_flat(result.model)
        summary = json.loads((tmp_path / engine / "metrics.json").read_text())["summary"]
        if engine == "grpc":  # served hosts always wait the round time out
            assert summary["clock"] == "real"
            assert all(r.seconds >= summary["round_time_s"] for r in result.rounds)
        else:
            assert summary["clock"] == "simulated"
    np.testing.assert_allclose(models["grpc"], models["local"], atol=1e-6)
    assert not np.allclose(models["local"], get_flat(build_model("logreg", ModelShape(64, 10), seed=5)))


def test_a_round_whose_host_drops_out_is_tolerated_and_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispers.protocol.instance.host import PersonalCloudHost

    data = small_digits(12)
    cfg = config(12, model="logreg", rounds=3, cohort=12)  # rate 1: everyone is drawn
    train = PersonalCloudHost.train
    calls = {"n": 0}

    def flaky(self: PersonalCloudHost, caller: str, request: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:  # the host is down during the second round
            raise DispersError(ErrorCode.UNAVAILABLE, "host down")
        return train(self, caller, request)  # type: ignore[arg-type]

    monkeypatch.setattr(PersonalCloudHost, "train", flaky)
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(cfg, data, model, directory=tmp_path)
    w = get_flat(model)
    try:
        first = engine.run_round(0, w)
        # No policy DP here: a round with fewer than k contributors releases nothing (it counts).
        with pytest.raises(DispersError, match="fewer contributors than k"):
            engine.run_round(1, w)
        third = engine.run_round(2, w)
    finally:
        engine.close()
    assert [(r.contributed, r.unreachable) for r in (first, third)] == [(12, 0), (12, 0)]


def test_an_experiment_goes_on_past_a_round_with_fewer_than_k_contributors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host is down in round 2: the root releases nothing (no DP, fewer than k), and the
    experiment keeps its model for round 3 instead of failing; the metrics say which round."""
    from dispers.protocol.instance.host import PersonalCloudHost

    data = small_digits(12)
    train = PersonalCloudHost.train
    calls = {"n": 0}

    def flaky(self: PersonalCloudHost, caller: str, request: object) -> object:
        calls["n"] += 1
        if calls["n"] == 2:
            raise DispersError(ErrorCode.UNAVAILABLE, "host down")
        return train(self, caller, request)  # type: ignore[arg-type]

    monkeypatch.setattr(PersonalCloudHost, "train", flaky)
    cfg = config(12, model="logreg", rounds=3, cohort=12)
    result = run_experiment(cfg, data=data, output=tmp_path / "out")
    assert [r.released for r in result.rounds] == [True, False, True]
    assert [r.contributed for r in result.rounds] == [12, None, 12]
    first, skipped, _ = result.rounds
    assert (skipped.test_loss, skipped.test_accuracy) == (first.test_loss, first.test_accuracy)
    assert result.stopped is None
    csv_rows = (tmp_path / "out" / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].endswith(",released") and csv_rows[2].endswith(",False")


@pytest.mark.parametrize("engine", ["simulation", "local"])
def test_training_stops_when_rounds_in_a_row_release_nothing(engine: str) -> None:
    """Two instances of twelve hold records: without DP no round reaches k = 5. The simulation
    engine refuses as the root does; after MAX_UNRELEASED rounds in a row, training stops with a
    message saying what to change, and the model is the initial one."""
    from dispers.learn.experiment import MAX_UNRELEASED

    data = small_digits(12, empty=tuple(range(2, 12)))
    cfg = dataclasses.replace(config(12, model="logreg", rounds=MAX_UNRELEASED + 3, cohort=12), engine=engine)
    result = run_experiment(cfg, data=data)
    assert len(result.rounds) == MAX_UNRELEASED and not any(r.released for r in result.rounds)
    assert result.stopped is not None and "training.cohort" in result.stopped
    initial = build_model("logreg", ModelShape(64, 10), seed=cfg.seed)
    np.testing.assert_array_equal(get_flat(result.model), get_flat(initial))


def test_a_round_that_fails_after_its_charge_stays_charged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dispers.learn.accounting import UserLevelDP, round_charge
    from dispers.protocol.target import Target

    def broken(self: Target, caller: str, training_round: object, sealed: bytes) -> object:
        raise DispersError(ErrorCode.UNAVAILABLE, "T lost its way")

    monkeypatch.setattr(Target, "collect_round", broken)
    data = small_digits(12)
    cfg = ExperimentConfig(
        engine="local", model="logreg", seed=1, data=DataConfig(instances=12),
        training=TrainingConfig(rounds=3, cohort=6, batch_size=8, clip=1.0, weighting="uniform"),
        privacy=PrivacyConfig(user_level=True, noise_multiplier=2.0, delta=1e-5, budget_epsilon=50.0),
    )  # fmt: skip
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(cfg, data, model, directory=tmp_path)
    try:
        with pytest.raises(DispersError) as info:
            engine.run_round(0, get_flat(model))
        status = engine.das["da-root"].budget("researcher", "researcher")
        assert all(da.active_rounds == 0 for da in engine.das.values())
    finally:
        engine.close()
    assert info.value.code is ErrorCode.UNAVAILABLE
    assert status.spent.epsilon == pytest.approx(round_charge(UserLevelDP(2.0, 0.5, 1e-5), 0)[0])


def test_training_through_a_running_cluster_on_the_hosts_own_documents(tmp_path: Path) -> None:
    """engine 'cluster': gRPC services as `dispers serve` runs them; the host reads each
    instance's records (heart rate, age, steps, sex) from its document store."""
    from dispers.core.cluster_files import ClusterLayout, write_cluster
    from dispers.core.messages import SubscriptionOp
    from dispers.learn.data import health
    from dispers.services.server import start_all_in_process
    from dispers.simulation.population import PopulationSpec, generate
    from dispers.state.documents import DocumentStore
    from dispers.transport.grpc_client import PersonalCloudClient, client_for

    as_of = __import__("datetime").date(2026, 11, 1)
    # Hosts answer each round 3 s after they are asked (the cluster's round_time_s).
    fixed = {"round_time_s": 3.0}
    layout = ClusterLayout(k_min=5, batch_size=200, host_as_of=as_of, dp=False, extra_settings=fixed)
    cluster = write_cluster(tmp_path, layout)
    documents = cluster.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        generate(PopulationSpec(n_instances=120, seed=3, as_of=as_of)).write(store)
    servers = start_all_in_process(cluster)
    try:
        with client_for(cluster, "pc-1", "pc-1", PersonalCloudClient) as host:
            host.subscribe_all(SubscriptionOp.SUBSCRIBE)
        cfg = ExperimentConfig(
            engine="cluster", cluster=str(cluster.path), model="logreg", seed=2,
            data=DataConfig(dataset="health", instances=120),
            training=TrainingConfig(rounds=3, cohort=40, batch_size=8, lr=0.5),
        )  # fmt: skip
        result = run_experiment(cfg, data=health(n_instances=50, seed=9))
    finally:
        for s in servers:
            s.stop(0)
    assert len(result.rounds) == 3
    for r in result.rounds:
        assert r.asked == 40 and r.contributed is not None and 10 <= r.contributed <= 70
        # T Poisson-samples each target at rate 40/120: the cohort's size varies around 40.
        assert 15 <= r.contributed + (r.declined or 0) + r.unreachable <= 70
    assert not np.allclose(get_flat(result.model), get_flat(build_model("logreg", ModelShape(4, 2), seed=2)))
