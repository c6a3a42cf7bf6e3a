"""Federated evaluation through the actors: hosts score the global model on their instances' own
records, DAs sum fixed-length records, the root releases the sums (noised and charged under DP)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dispers.core.errors import DispersError
from dispers.core.wire import ContributionLayout
from dispers.crypto.observe import recording
from dispers.learn.accounting import UserLevelDP, round_charge
from dispers.learn.cluster import ClusterEngine, instance_ids
from dispers.learn.config import (
    DataConfig,
    EvaluationConfig,
    ExperimentConfig,
    PrivacyConfig,
    TrainingConfig,
)
from dispers.learn.data import FederatedData
from dispers.learn.experiment import run_experiment
from dispers.learn.models import ModelShape, build_model, get_flat, set_flat
from dispers.protocol.instance.host import PersonalCloudHost
from tests.learn.test_training_protocol import small_digits

N = 12
M = 50  # each instance evaluates at most its first 50 records (small_digits gives ~120 each)


def cfg(*, dp: bool = False, every: int = 1, rounds: int = 1, engine: str = "local") -> ExperimentConfig:
    return ExperimentConfig(
        engine=engine, model="logreg", seed=4, data=DataConfig(instances=N),
        training=TrainingConfig(rounds=rounds, cohort=N, batch_size=8, lr=0.3, clip=1.0, weighting="uniform",
                                round_time_s=3.0),
        privacy=PrivacyConfig(user_level=dp, noise_multiplier=1.0, delta=1e-5, budget_epsilon=50.0),
        evaluation=EvaluationConfig(federated=True, every=every, max_examples=M, noise_multiplier=2.0),
    )  # fmt: skip


def direct(data: FederatedData, weights: np.ndarray, skip: tuple[int, ...] = ()) -> tuple[float, float, int]:
    """Ground truth with a plain torch loop: (mean capped loss, accuracy, examples) over each
    instance's first M records."""
    model = build_model("logreg", ModelShape(data.n_features, data.n_classes))
    set_flat(model, weights)
    loss = correct = count = 0.0
    for i in range(data.n_instances):
        if i in skip:
            continue
        x, y = data.records(i)
        x, y = x[:M], y[:M]
        with torch.no_grad():
            out = model(x)
        loss += float(F.cross_entropy(out, y, reduction="none").clamp(max=10.0).sum())
        correct += float((out.argmax(1) == y).sum())
        count += len(y)
    return loss / count, correct / count, int(count)


def trained_weights(engine: ClusterEngine, w0: np.ndarray) -> np.ndarray:
    """The global model after one training round (so accuracy is neither chance nor perfect)."""
    return w0 + engine.run_round(0, w0).average_update


def test_without_noise_the_federated_accuracy_is_the_instances_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DP off: the released loss and accuracy equal those computed directly on every instance's
    first M records; every sealed evaluation record has one length; only the leaf DAs open them,
    the Conductor opens nothing and T only its request and the pseudonyms."""
    lengths: list[int] = []
    real = PersonalCloudHost.train

    def spy(self: PersonalCloudHost, caller: str, request: Any) -> Any:
        batch = real(self, caller, request)
        lengths.extend(len(c) for c in batch.ciphertexts)
        return batch

    data = small_digits(N, empty=(3,))  # instance 3 holds no records: it declines
    config = cfg()
    model = build_model(config.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(config, data, model, directory=tmp_path)
    try:
        w = trained_weights(engine, get_flat(model))
        monkeypatch.setattr(PersonalCloudHost, "train", spy)
        with recording() as seen:
            ev = engine.run_evaluation(0, w)
    finally:
        engine.close()
    loss, accuracy, count = direct(data, w, skip=(3,))
    assert 0.2 < accuracy < 0.99
    assert ev.sums[2] == count == (N - 1) * M
    assert ev.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert ev.loss == pytest.approx(loss, rel=1e-6)
    assert len(lengths) == N and set(lengths) == {lengths[0]}  # records and the decline alike
    records = [s for s in seen if s.what == "model update"]
    assert len(records) == N and {len(s.plaintext) for s in records} == {ContributionLayout(3).size}
    assert {s.actor for s in records} == {"da-1", "da-2"}
    assert not [s for s in seen if s.actor == "conductor"]
    assert {s.what for s in seen if s.actor == "t"} == {"training request", "target pseudonyms"}
    ids = [i.encode() for i in instance_ids(N)]
    assert not any(i in s.plaintext for s in seen if s.actor.startswith("da-") for i in ids)


def test_under_dp_the_sums_are_noised_and_charged_and_never_from_fewer_than_k(tmp_path: Path) -> None:
    """DP policy: the root charges the evaluation run the accountant's epsilon (noise multiplier
    2, rate 1) on the querier's ledger, releases noised sums and no exact counts; with fewer than
    k contributors nothing is released, and the charge stays."""
    data = small_digits(N)
    config = cfg(dp=True)
    model = build_model(config.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(config, data, model, directory=tmp_path)
    root = engine.das["da-root"]
    try:
        w = trained_weights(engine, get_flat(model))
        before = root.budget("researcher", "researcher").spent.epsilon
        ev = engine.run_evaluation(0, w)
        after = root.budget("researcher", "researcher").spent.epsilon
    finally:
        engine.close()
    charge = round_charge(UserLevelDP(2.0, 1.0, 1e-5), 0)[0]
    assert after - before == pytest.approx(charge)
    assert ev.epsilon_spent == pytest.approx(charge)
    assert ev.sums[2] != N * M  # noised: not the exact number of examples
    assert ev.accuracy is not None and 0 <= ev.accuracy <= 1

    empty = small_digits(N, empty=tuple(range(2, N)))  # two contributors, k is 5
    engine = ClusterEngine(config, empty, model, directory=tmp_path / "few")
    root = engine.das["da-root"]
    try:
        with pytest.raises(DispersError, match="fewer contributors than k"):
            engine.run_evaluation(0, get_flat(model))
        spent = root.budget("researcher", "researcher").spent.epsilon
    finally:
        engine.close()
    assert spent == pytest.approx(charge)


def test_an_experiment_reports_federated_loss_and_accuracy_every_n_rounds(tmp_path: Path) -> None:
    """[evaluation] federated = true, every = 2: the per-round CSV and JSON gain the federated
    columns, filled on rounds 2 and 4 only; the run's epsilon adds the evaluations' charges."""
    data = small_digits(N)
    result = run_experiment(cfg(every=2, rounds=4), data=data, output=tmp_path / "out")
    rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["rounds"]
    filled = [r["round"] for r in rows if r["federated_accuracy"] is not None]
    assert filled == [1, 3]
    header = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"federated_loss", "federated_accuracy", "cut"} <= set(header)
    final = get_flat(result.model)
    assert rows[3]["federated_accuracy"] == pytest.approx(direct(data, final)[1], abs=1e-9)


def test_evaluation_config_errors_name_the_key() -> None:
    from dispers.learn.config import parse_experiment

    for doc, key in (
        ({"evaluation": {"every": 0}}, "evaluation.every"),
        ({"evaluation": {"max_examples": 0}}, "evaluation.max_examples"),
        ({"evaluation": {"federated": "yes"}}, "evaluation.federated"),
        ({"evaluation": {"evry": 2}}, "evaluation.evry"),
    ):
        with pytest.raises(DispersError, match=key):
            parse_experiment(doc)


def test_a_querier_cannot_ask_more_examples_than_the_cluster_allows(tmp_path: Path) -> None:
    from dispers.core.config import ClusterSettings

    data = small_digits(N)
    config = cfg()
    model = build_model(config.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(config, data, model, directory=tmp_path)
    cap = ClusterSettings().max_local_batch
    try:
        plan = dataclasses.replace(engine.evaluation_plan(0, get_flat(model)), max_examples=cap + 1)
        with pytest.raises(DispersError, match="max_examples"):
            engine._querier.submit_round(plan)
    finally:
        engine.close()


def test_the_simulation_engine_evaluates_the_same_way_and_the_cli_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """engine 'simulation' (no actors): the same records, sums and metrics as the root releases;
    `dispers train` prints the last federated accuracy."""
    from dispers.cli.main import main

    data = small_digits(N)
    config = dataclasses.replace(cfg(rounds=2), engine="simulation")
    result = run_experiment(config, data=data)
    assert result.rounds[-1].federated_accuracy == pytest.approx(direct(data, get_flat(result.model))[1])
    exp = tmp_path / "exp.toml"
    exp.write_text(
        '[experiment]\nname = "t"\n[data]\ninstances = 20\n[model]\nname = "logreg"\n'
        "[training]\nrounds = 2\ncohort = 5\n[evaluation]\nfederated = true\nevery = 2\n"
    )
    assert main(["train", str(exp), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "federated accuracy " in capsys.readouterr().out
