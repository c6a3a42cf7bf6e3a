"""dispers.learn on its own: local training paths, clipping, sums, accounting, optimizers, config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from dispers.cli.main import main
from dispers.core.errors import DispersError, ErrorCode
from dispers.learn.accounting import UserLevelDP, epsilon_after, round_charge
from dispers.learn.aggregate import UpdateSum, average, encode_update, update_layout
from dispers.learn.config import parse_experiment
from dispers.learn.data import digits, dirichlet_owners, health
from dispers.learn.local import LocalSettings, batches, clip_rows, train_batched, train_sequential
from dispers.learn.models import MODELS, ModelShape, build_model, get_flat, n_params, set_flat
from dispers.learn.server import ServerOptimizer


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    return digits(n_instances=30, split="dirichlet", alpha=0.5, seed=2)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_batched_training_equals_a_plain_torch_loop_per_instance(data, name: str) -> None:  # type: ignore[no-untyped-def]
    settings = LocalSettings(epochs=2, batch_size=8, lr=0.1)
    model = build_model(name, ModelShape(64, 10), seed=1)
    w0 = get_flat(model)
    chosen = [0, 3, 7, 11, 29]
    records = [data.records(i) for i in chosen]
    got = train_batched(model, w0, records, chosen, settings, seed=4, round_=2)
    seq = train_sequential(model, w0, records, chosen, settings, seed=4, round_=2)
    reference = build_model(name, ModelShape(64, 10))
    for k, (i, (x, y)) in enumerate(zip(chosen, records, strict=True)):
        set_flat(reference, w0)
        opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        for b in batches(len(y), settings, seed=4, round_=2, instance=i):
            opt.zero_grad()
            F.cross_entropy(reference(x[b]), y[b]).backward()
            opt.step()
        expected = get_flat(reference) - w0
        np.testing.assert_allclose(got.updates[k], expected, atol=1e-6)
        np.testing.assert_allclose(seq.updates[k], expected, atol=1e-6)
    assert list(got.examples) == [len(y) for _, y in records]


def test_clipping_bounds_the_norm_and_keeps_the_direction() -> None:
    rng = np.random.default_rng(0)
    u = rng.normal(size=(20, 50)) * rng.uniform(0.01, 5, size=(20, 1))
    c = clip_rows(u, 1.0)
    norms = np.linalg.norm(u, axis=1)
    assert np.all(np.linalg.norm(c, axis=1) <= 1.0 + 1e-12)
    small = norms <= 1.0
    np.testing.assert_array_equal(c[small], u[small])
    np.testing.assert_allclose(c[~small] * norms[~small, None], u[~small], rtol=1e-12)


@given(st.lists(st.integers(0, 9), min_size=0, max_size=12), st.integers(1, 5))
def test_update_sums_merge_to_the_direct_sum_in_any_split(cuts: list[int], n_parts: int) -> None:
    rng = np.random.default_rng(len(cuts))
    rows = np.concatenate([rng.normal(size=(10, 7)), rng.uniform(0.5, 3, size=(10, 1))], axis=1)
    owner = np.array([(c * 7 + i) % n_parts for i, c in enumerate(cuts + [0] * (10 - len(cuts)))][:10])
    parts = []
    for p in range(n_parts):
        s = UpdateSum.empty(7)
        s.add(rows[owner == p])
        parts.append(UpdateSum.from_obj(s.to_obj(), 7))  # through the wire form
    merged = UpdateSum.empty(7)
    for s in parts:
        merged.merge(s)
    np.testing.assert_allclose(merged.total, rows[:, :-1].sum(0), atol=1e-12)
    assert merged.weight == pytest.approx(rows[:, -1].sum())
    assert merged.count == 10
    np.testing.assert_allclose(
        average(merged, noise_multiplier=None, clip=None, cohort=10),
        rows[:, :-1].sum(0) / rows[:, -1].sum(),
        atol=1e-12,
    )


def test_declines_cut_by_the_round_time_are_counted_through_the_wire_form() -> None:
    """A leaf's count of cut declines merges up the tree; a partial claiming more cut instances
    than declines is refused."""
    a, b = UpdateSum.empty(3), UpdateSum.empty(3)
    a.declines, a.cut, b.declines, b.cut = 4, 1, 2, 2
    merged = UpdateSum.empty(3)
    for s in (a, b):
        merged.merge(UpdateSum.from_obj(s.to_obj(), 3))
    assert (merged.declines, merged.cut) == (6, 3)
    bad = {**a.to_obj(), "cut": 5}
    with pytest.raises(DispersError, match="cut"):
        UpdateSum.from_obj(bad, 3)


def test_an_update_record_has_the_length_of_a_decline() -> None:
    layout = update_layout(650)
    qid = "ab" * 16
    assert len(encode_update(layout, qid, np.ones(650), 3.0)) == len(layout.decline(qid)) == layout.size


def test_noised_average_has_the_calibrated_spread() -> None:
    s = UpdateSum.empty(4000)
    avg = average(s, noise_multiplier=1.0, clip=2.0, cohort=10)
    assert np.std(avg) == pytest.approx(2.0 / 10, rel=0.05)  # z C / cohort


@pytest.mark.parametrize(("z", "q", "rounds", "delta"), [(1.0, 0.1, 50, 1e-5), (0.7, 0.01, 300, 1e-6)])
def test_rdp_epsilon_equals_opacus_analysis(z: float, q: float, rounds: int, delta: float) -> None:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    orders = RDPAccountant.DEFAULT_ALPHAS
    expected, _ = rdp.get_privacy_spent(
        orders=orders, rdp=rdp.compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=orders), delta=delta
    )
    assert epsilon_after(UserLevelDP(z, q, delta, "rdp"), rounds) == pytest.approx(expected, rel=1e-12)


def test_prv_epsilon_equals_opacus_prv_accountant() -> None:
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    for _ in range(40):
        acc.step(noise_multiplier=1.2, sample_rate=0.05)
    expected = acc.get_epsilon(delta=1e-6)
    assert epsilon_after(UserLevelDP(1.2, 0.05, 1e-6, "prv"), 40) == pytest.approx(expected, rel=1e-6)


def test_round_charges_add_up_to_the_accounted_epsilon() -> None:
    p = UserLevelDP(1.1, 0.2, 1e-5)
    charges = [round_charge(p, r) for r in range(6)]
    assert sum(e for e, _ in charges) == pytest.approx(epsilon_after(p, 6), rel=1e-9)
    assert [d for _, d in charges] == [1e-5, 0, 0, 0, 0, 0]


def test_server_optimizers_follow_their_update_rules() -> None:
    w = np.array([1.0, -2.0])
    d1, d2 = np.array([0.5, 0.1]), np.array([-0.2, 0.3])
    assert np.allclose(ServerOptimizer("fedavg", lr=0.5).step(w, d1), w + 0.5 * d1)
    m = ServerOptimizer("fedavgm", lr=1.0, momentum=0.9)
    w1 = m.step(w, d1)
    assert np.allclose(m.step(w1, d2), w1 + (0.9 * d1 + d2))
    a = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3)
    m1, v1 = 0.1 * d1, 0.01 * d1**2
    assert np.allclose(a.step(w, d1), w + 0.1 * m1 / (np.sqrt(v1) + 1e-3))


def test_dirichlet_split_assigns_every_record_once_and_skews_classes() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(10), 100)
    owner = dirichlet_owners(y, 20, 0.1, rng)
    assert owner.shape == y.shape and np.bincount(owner, minlength=20).min() >= 2
    # with alpha 0.1 most instances hold few classes
    classes = [len(np.unique(y[owner == i])) for i in range(20)]
    assert np.median(classes) < 6


def test_health_labels_follow_the_instances_own_measurements() -> None:
    h = health(n_instances=300, seed=1)
    assert h.n_features == 4 and h.n_classes == 2
    x, y = h.x.numpy(), h.y.numpy()
    high_bpm = x[:, 0] > 1.0
    assert y[high_bpm].mean() > y[~high_bpm].mean() + 0.1


def test_models_fit_one_contribution_record() -> None:
    for name in MODELS:
        assert n_params(build_model(name, ModelShape(64, 10))) + 1 <= 4096


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"training": {"cohort": 0}}, "training.cohort"),
        ({"model": {"name": "resnet"}}, "model.name"),
        ({"training": {"colhort": 3}}, "training.colhort"),
        ({"privacy": {"user_level": True}}, "training.clip"),
        ({"privacy": {"user_level": True}, "training": {"clip": 1.0}}, "training.weighting"),
        ({"server": {"optimizer": "sgd"}}, "server.optimizer"),
        ({"training": {"round_time_s": 0}}, "training.round_time_s"),
        ({"training": {"clock": "wall"}}, "training.clock"),
        # Only the local engine's actors are all one experimenter's: elsewhere the wait is real.
        ({"experiment": {"engine": "grpc"}, "training": {"clock": "simulated"}}, "training.clock"),
        ({"experiment": {"engine": "simulation"}, "training": {"clock": "simulated"}}, "training.clock"),
    ],
)
def test_config_errors_name_the_bad_key(doc: dict[str, object], key: str) -> None:
    with pytest.raises(DispersError) as info:
        parse_experiment(doc)
    assert info.value.code is ErrorCode.CONFIG
    assert key in info.value.message


def test_dispers_train_writes_model_metrics_and_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exp = tmp_path / "exp.toml"
    exp.write_text(
        '[experiment]\nname = "t"\n[data]\ninstances = 20\n[model]\nname = "logreg"\n'
        "[training]\nrounds = 3\ncohort = 5\n"
    )
    out = tmp_path / "out"
    assert main(["train", str(exp), "--output", str(out), "--no-progress"]) == 0
    for name in ("model.pt", "metrics.csv", "metrics.json", "curves.png"):
        assert (out / name).stat().st_size > 0
    state = torch.load(out / "model.pt")
    assert set(state) == {"linear.weight", "linear.bias"}
    assert len((out / "metrics.csv").read_text().splitlines()) == 4
    assert "test accuracy" in capsys.readouterr().out


def test_dispers_train_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[training]\nrounds = -1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "training.rounds" in err and "Traceback" not in err


def test_record_level_dp_sgd_clips_each_record_and_adds_noise(data) -> None:  # type: ignore[no-untyped-def]
    model = build_model("logreg", ModelShape(64, 10), seed=1)
    w0 = get_flat(model)
    chosen = [0, 1]
    records = [data.records(i) for i in chosen]
    plain = train_sequential(model, w0, records, chosen, LocalSettings(lr=0.1), seed=0, round_=0)
    dp = LocalSettings(lr=0.1, record_noise=1.0, record_clip=0.01)
    a = train_sequential(model, w0, records, chosen, dp, seed=0, round_=0)
    b = train_sequential(model, w0, records, chosen, dp, seed=0, round_=0)
    assert not np.allclose(a.updates, b.updates)  # fresh noise each time, whatever the seed
    assert not np.allclose(a.updates, plain.updates)
    # The hooks are gone: the one model object trains the next instance without DP as before.
    again = train_sequential(model, w0, records, chosen, LocalSettings(lr=0.1), seed=0, round_=0)
    np.testing.assert_allclose(again.updates, plain.updates, atol=1e-7)
    # Tiny clipping: each record's gradient is nearly nothing, the update is mostly noise of
    # std lr * noise * clip / batch per coordinate and step.
    steps = int(np.ceil(len(records[0][1]) / 16))
    assert np.std(a.updates[0]) < 5 * 0.1 * 1.0 * 0.01 / 16 * np.sqrt(steps) * 3


def test_the_simulation_engine_accounts_and_stops_at_the_budget(data) -> None:  # type: ignore[no-untyped-def]
    from dispers.learn.config import DataConfig, ExperimentConfig, PrivacyConfig, TrainingConfig
    from dispers.learn.experiment import run_experiment

    cfg = ExperimentConfig(
        model="logreg", data=DataConfig(instances=30),
        training=TrainingConfig(rounds=50, cohort=6, clip=1.0, weighting="uniform"),
        privacy=PrivacyConfig(user_level=True, noise_multiplier=1.0, delta=1e-5, budget_epsilon=4.0),
    )  # fmt: skip
    result = run_experiment(cfg, data=data)
    n = len(result.rounds)
    assert 1 <= n < 50 and result.stopped is not None
    assert result.stopped.startswith(f"training stopped before round {n + 1}")
    assert result.rounds[-1].epsilon == pytest.approx(epsilon_after(UserLevelDP(1.0, 0.2, 1e-5), n))
    assert result.rounds[-1].epsilon <= 4.0 < epsilon_after(UserLevelDP(1.0, 0.2, 1e-5), n + 1)
