"""Digits on a running cluster: `dispers import --dataset digits` writes each instance's records
into its host's store; `dispers train` with engine "cluster" trains on them through the services."""

from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pytest

from dispers.cli.main import main
from dispers.cli.workflow import dataset_instance_ids
from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import ClusterConfig
from dispers.learn.cluster import ClusterEngine
from dispers.learn.config import DataConfig, ExperimentConfig, TrainingConfig
from dispers.learn.data import FederatedData, digits
from dispers.learn.experiment import evaluate, run_experiment
from dispers.learn.models import ModelShape, build_model, get_flat
from dispers.state.documents import DocumentStore
from tests.learn.test_training_protocol import direct_fedavg

N, SEED = 24, 7
IMPORT = ["import", "--dataset", "digits", "--instances", str(N), "--split", "dirichlet", "--alpha", "0.5",
          "--seed", str(SEED)]  # fmt: skip


def cluster(tmp_path: Path, cohorts: tuple[str, ...] = ("cohort:digits",)) -> ClusterConfig:
    layout = ClusterLayout(
        k_min=5, batch_size=200, host_as_of=dt.date(2026, 11, 1), dp=False, cohorts=cohorts,
        extra_settings={"round_time_s": 4.0},
    )  # fmt: skip
    return write_cluster(tmp_path, layout)


def stored(config: ClusterConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    documents = config.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        return store.training_records("digits", dataset_instance_ids("digits", N), 64)


def test_import_writes_each_instances_digits_into_the_hosts_store(tmp_path: Path) -> None:
    """The store holds exactly the split `digits(...)` makes with the same arguments (never the
    seed's held-out set), and importing again changes nothing."""
    config = cluster(tmp_path)
    assert main([*IMPORT, "--config", str(config.path)]) == 0
    offsets, x, y = stored(config)
    expected = digits(n_instances=N, split="dirichlet", alpha=0.5, seed=SEED)
    np.testing.assert_array_equal(offsets, expected.offsets)
    np.testing.assert_array_equal(x, expected.x.numpy())
    np.testing.assert_array_equal(y, expected.y.numpy())
    assert main([*IMPORT, "--config", str(config.path)]) == 0
    again = stored(config)
    assert all(np.array_equal(a, b) for a, b in zip(again, (offsets, x, y), strict=True))
    assert len(y) + len(expected.y_test) == 1797  # scikit-learn's digits: all but the held-out 20 %


def test_import_errors_are_one_line_and_name_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cluster(tmp_path, cohorts=())
    assert main([*IMPORT, "--config", str(config.path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cohort:digits" in err and "vocabulary" in err
    assert main([*IMPORT, "people.csv", "--config", str(config.path)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["import", "--config", str(config.path)]) == 2
    assert "--dataset" in capsys.readouterr().err


def direct_round(data: FederatedData, ids: list[str], w0: np.ndarray, cfg: ExperimentConfig) -> np.ndarray:
    """Ground truth: the direct FedAvg, each instance's batches drawn from its id (as a host
    reading its store draws them)."""

    def key(i: int) -> int:
        return int.from_bytes(hashlib.blake2b(ids[i].encode(), digest_size=4).digest(), "big")

    return direct_fedavg(cfg, data, w0, 0, instance_key=key)


def test_dispers_train_on_digits_through_a_running_cluster(tmp_path: Path) -> None:
    """engine 'cluster' over gRPC services as `dispers serve` runs them: the host reads each
    instance's digits from its store. The first round's update equals the direct FedAvg of the
    imported records; after a few rounds the model beats its start on Q's held-out set."""
    from dispers.core.messages import SubscriptionOp
    from dispers.services.server import start_all_in_process
    from dispers.transport.grpc_client import PersonalCloudClient, client_for

    config = cluster(tmp_path)
    assert main([*IMPORT, "--config", str(config.path)]) == 0
    servers = start_all_in_process(config)
    cfg = ExperimentConfig(
        engine="cluster", cluster=str(config.path), model="logreg", seed=SEED,
        data=DataConfig(dataset="digits", instances=N, split="dirichlet", alpha=0.5),
        training=TrainingConfig(rounds=3, cohort=N, local_epochs=2, batch_size=16, lr=0.5),
    )  # fmt: skip
    data = digits(n_instances=N, split="dirichlet", alpha=0.5, seed=SEED)
    model = build_model("logreg", ModelShape(64, 10), seed=SEED)
    w0 = get_flat(model)
    try:
        with client_for(config, "pc-1", "pc-1", PersonalCloudClient) as host:
            host.subscribe_all(SubscriptionOp.SUBSCRIBE)
        engine = ClusterEngine(cfg, data, model)
        try:
            first = engine.run_round(0, w0)
        finally:
            engine.close()
        result = run_experiment(cfg, data=data)
    finally:
        for s in servers:
            s.stop(0)
    assert (first.contributed, first.declined) == (N, 0)  # rate 1: everyone, all with records
    expected = direct_round(data, dataset_instance_ids("digits", N), w0, cfg)
    np.testing.assert_allclose(first.average_update, expected, atol=2e-6)
    assert [r.contributed for r in result.rounds] == [N] * 3
    start = evaluate(model, data.x_test, data.y_test)[1]
    assert result.final_accuracy > max(0.6, start + 0.3)


def test_instances_the_round_time_cuts_are_counted_where_counts_are_exact(tmp_path: Path) -> None:
    """Two hosts, one round time: pc-1's 120 instances hold ~12 images each and finish in time;
    pc-2's 4 hold ~360 each (thirty times the steps) and are stopped. Under this exact policy
    the round's metrics count pc-2's instances as declined and cut; pc-1's updates are released."""
    from dispers.core.messages import SubscriptionOp
    from dispers.services.server import start_all_in_process
    from dispers.transport.grpc_client import PersonalCloudClient, client_for

    layout = ClusterLayout(
        k_min=5, batch_size=200, host_as_of=dt.date(2026, 11, 1), dp=False, cohorts=("cohort:digits",),
        hosts=("pc-1", "pc-2"),
    )  # fmt: skip
    config = write_cluster(tmp_path, layout)
    base = ["import", "--dataset", "digits", "--seed", str(SEED), "--config", str(config.path)]
    assert main([*base, "--host", "pc-1", "--instances", "120"]) == 0
    assert main([*base, "--host", "pc-2", "--instances", "4"]) == 0
    servers = start_all_in_process(config)
    cfg = ExperimentConfig(
        engine="cluster", cluster=str(config.path), model="mlp", seed=SEED,
        data=DataConfig(dataset="digits", instances=124),
        training=TrainingConfig(rounds=1, cohort=124, local_epochs=12, batch_size=1, lr=0.05,
                                round_time_s=3.0),  # pc-1 trains in ~0.5 s here, pc-2 would take ~9 s
    )  # fmt: skip
    model = build_model("mlp", ModelShape(64, 10), seed=SEED)
    try:
        for host in ("pc-1", "pc-2"):
            with client_for(config, host, host, PersonalCloudClient) as client:
                client.subscribe_all(SubscriptionOp.SUBSCRIBE)
        engine = ClusterEngine(cfg, digits(n_instances=4, seed=SEED), model)
        try:
            out = engine.run_round(0, get_flat(model))
        finally:
            engine.close()
    finally:
        for s in servers:
            s.stop(0)
    assert (out.contributed, out.declined, out.cut) == (120, 4, 4)
