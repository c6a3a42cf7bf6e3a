"""A malicious Querier's attacks on federated training (from the issue-9 review): each must fail."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dispers.protocol.learning.querier as lq
from dispers.core.errors import DispersError
from dispers.learn.accounting import UserLevelDP, round_charge
from dispers.learn.cluster import ClusterEngine
from dispers.learn.config import DataConfig, ExperimentConfig, PrivacyConfig, TrainingConfig
from dispers.learn.models import ModelShape, build_model, get_flat
from tests.learn.test_training_protocol import small_digits

N = 12


def dp_cfg(cohort: int) -> ExperimentConfig:
    return ExperimentConfig(
        engine="local", model="logreg", seed=1, data=DataConfig(instances=N),
        training=TrainingConfig(rounds=1, cohort=cohort, batch_size=8, clip=1.0, weighting="uniform",
                                local_epochs=1),
        privacy=PrivacyConfig(user_level=True, noise_multiplier=1.0, delta=1e-5, budget_epsilon=50.0),
    )  # fmt: skip


def plain_cfg(cohort: int) -> ExperimentConfig:
    return ExperimentConfig(
        engine="local",
        model="logreg",
        seed=1,
        data=DataConfig(instances=N),
        training=TrainingConfig(rounds=1, cohort=cohort, batch_size=8, local_epochs=1),
    )


def engine_for(tmp_path: Path, cfg: ExperimentConfig, empty: tuple[int, ...] = ()) -> ClusterEngine:
    data = small_digits(N, empty=empty)
    model = build_model(cfg.model, ModelShape(data.n_features, data.n_classes))
    return ClusterEngine(cfg, data, model, directory=tmp_path)


def conductor(engine: ClusterEngine) -> Any:
    return engine._querier._actor._conductor._actor  # Querier -> its bound Conductor


def spent(engine: ClusterEngine) -> float:
    return float(engine.das["da-root"].budget("researcher", "researcher").spent.epsilon)


@pytest.mark.parametrize("part", ["TrainingSpec", "TrainingRequest"])
def test_the_cohort_told_to_T_and_to_the_root_cannot_differ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    """Q tells T to train all N targets but the root a cohort of 6 (or the other way round): the
    root would charge sampling rate 6/N for a round where every target trained. The envelope Q
    signs carries the cohort; the DAs refuse a spec, and T a request, that says otherwise."""
    real = getattr(lq, part)
    monkeypatch.setattr(lq, part, lambda **kw: real(**{**kw, "cohort": 6}))
    engine = engine_for(tmp_path, dp_cfg(cohort=N))
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    try:
        qid = engine._querier.submit_round(engine.plan(0, w))
        record, result = engine._querier.round_outcome(qid, len(w), 60.0)
        charged = spent(engine)
    finally:
        engine.close()
    assert result is None and record.state in ("refused", "failed")
    assert "cohort" in record.error_message
    if part == "TrainingSpec":
        assert charged == 0.0  # refused at prepare, before any charge
    else:  # the root charged the honest rate (N/N): T refused to train anyone
        assert charged == pytest.approx(round_charge(UserLevelDP(1.0, 1.0, 1e-5), 0)[0])


def test_rounds_of_other_parameters_cannot_inflate_a_runs_round_counter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Q starts a cheap round (another noise multiplier) of its run and, while it is in flight,
    more rounds with other parameters and its real run: had they replaced the run, each finishing
    cheap round would count on the real one and its later rounds would be charged the accountant's
    small late increments. A run with a round in flight is not replaced; a round counts only on
    the run it was charged to. Threads per round, as the gRPC services run them."""
    from dispers.protocol.conductor import run_in_thread
    from dispers.protocol.target import Target

    gate, blocked = threading.Event(), []
    collect = Target.collect_round

    def slow(self: Target, caller: str, training_round: Any, sealed: bytes) -> Any:
        if not blocked:  # the first (cheap) round waits in T
            blocked.append(1)
            gate.wait(120)
        return collect(self, caller, training_round, sealed)

    monkeypatch.setattr(Target, "collect_round", slow)
    engine = engine_for(tmp_path, dp_cfg(cohort=6))
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    n = len(w)
    q = engine._querier
    m = 4
    try:
        conductor(engine)._executor = run_in_thread
        cheap = q.submit_round(dataclasses.replace(engine.plan(0, w), noise_multiplier=100.0))
        while not blocked:
            time.sleep(0.05)
        others = [q.submit_round(dataclasses.replace(engine.plan(0, w), noise_multiplier=101.0 + i))
                  for i in range(m)]  # fmt: skip
        real = q.submit_round(engine.plan(0, w))
        refused = [q.round_outcome(i, n, 60.0)[0] for i in (*others, real)]
        gate.set()
        assert q.round_outcome(cheap, n, 60.0)[0].state == "done"
        assert all(r.state == "failed" and "already running" in r.error_message for r in refused)
        states = []
        for round_ in (0, 1, m + 1):
            before = spent(engine)
            rec, _ = q.round_outcome(q.submit_round(engine.plan(round_, w)), n, 60.0)
            states.append((rec.state, spent(engine) - before))
    finally:
        engine.close()
    p = UserLevelDP(1.0, 6 / N, 1e-5)
    assert states[0] == ("done", pytest.approx(round_charge(p, 0)[0]))
    assert states[1] == ("done", pytest.approx(round_charge(p, 1)[0]))
    assert states[2] == ("failed", 0.0)  # refused before any charge: the run's next round is 2


def test_a_round_counts_only_on_its_own_run_while_in_flight() -> None:
    """The root's bookkeeping: finalize and abort count a round on the run object it was charged
    to, and only while it is that run's round in flight."""
    from dispers.protocol.learning.aggregator import _count_round, _Run

    run = _Run("q", None)
    run.in_flight = "a" * 32
    _count_round(run, "b" * 32)  # not this run's round in flight: no count
    assert (run.rounds, run.in_flight) == (0, "a" * 32)
    _count_round(run, "a" * 32)
    assert (run.rounds, run.in_flight) == (1, None)
    _count_round(run, "a" * 32)  # counted once
    assert run.rounds == 1


def test_the_querier_refuses_a_cohort_below_k(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, plain_cfg(cohort=1))
    try:
        with pytest.raises(DispersError, match="cohort"):
            engine.run_round(0, get_flat(build_model("logreg", ModelShape(64, 10))))
    finally:
        engine.close()


@pytest.mark.parametrize("refuser", ["T", "root"])
@pytest.mark.parametrize("dp", [False, True])
def test_a_cohort_below_k_is_refused_by_T_and_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refuser: str, dp: bool
) -> None:
    """A querier that lifts its own check (cohort=1: one person's exact update under DP-off)
    meets T's and every DA's; nobody trains, nothing is charged or released."""
    import dispers.protocol.learning.aggregator as la
    import dispers.protocol.target as tg

    monkeypatch.setattr(lq, "check_cohort", lambda cohort, k, what: None)
    monkeypatch.setattr(la if refuser == "T" else tg, "check_cohort", lambda cohort, k, what: None)
    engine = engine_for(tmp_path, dp_cfg(cohort=1) if dp else plain_cfg(cohort=1))
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    try:
        record, result = engine._querier.round_outcome(
            engine._querier.submit_round(engine.plan(0, w)), len(w), 60
        )
        charged = spent(engine)
    finally:
        engine.close()
    assert result is None and "cohort" in record.error_message
    assert charged == (round_charge(UserLevelDP(1.0, 1 / N, 1e-5), 0)[0] if dp and refuser == "T" else 0.0)


def test_without_dp_the_root_releases_nothing_from_fewer_than_k_contributors(tmp_path: Path) -> None:
    """DP-off policy: a cohort of N where all but two decline (no records) releases no model."""
    engine = engine_for(tmp_path, plain_cfg(cohort=N), empty=tuple(range(2, N)))
    try:
        with pytest.raises(DispersError, match="fewer contributors than k"):
            engine.run_round(0, get_flat(build_model("logreg", ModelShape(64, 10))))
    finally:
        engine.close()


@pytest.mark.parametrize("model", ["nope", "mlp"])  # not in the registry; the registry's, other size
@pytest.mark.parametrize("victim_has_records", [True, False])
def test_a_bad_model_fails_the_host_whether_or_not_anyone_is_eligible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, victim_has_records: bool
) -> None:
    """The host checks the model against its registry before it looks at anyone's eligibility:
    C's 'unreachable' count is the same whether or not the one instance with records was asked."""
    real = lq.TrainingRequest
    monkeypatch.setattr(lq, "TrainingRequest", lambda **kw: real(**{**kw, "model": model}))
    others = tuple(range(1, N))
    engine = engine_for(tmp_path, dp_cfg(cohort=N), empty=others if victim_has_records else (0, *others))
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    try:
        qid = engine._querier.submit_round(engine.plan(0, w))
        engine._querier.round_outcome(qid, len(w), 60.0)
        counts = conductor(engine).record(qid).counts
    finally:
        engine.close()
    assert counts["unreachable"] == N


def test_a_training_error_declines_the_hosts_instances_uniformly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error while training (here torch's) becomes a decline for each instance asked, of the
    same length: the host answers, and the round goes on."""
    import dispers.learn.local as local

    def broken(*args: object, **kwargs: object) -> object:
        raise RuntimeError("a tensor went astray")

    from dispers.core.wire import ContributionLayout
    from dispers.crypto.observe import recording

    engine = engine_for(tmp_path, plain_cfg(cohort=N))  # (it times a training to set the round time)
    monkeypatch.setattr(local, "train_batched", broken)
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    try:
        with recording() as seen:
            qid = engine._querier.submit_round(engine.plan(0, w))
            record, _ = engine._querier.round_outcome(qid, len(w), 60.0)
        counts = conductor(engine).record(qid).counts
    finally:
        engine.close()
    assert counts["unreachable"] == 0 and "fewer contributors than k" in record.error_message
    records = [s.plaintext for s in seen if s.what == "model update"]
    opened = ContributionLayout(len(w) + 1).decode_many(records)
    # Plain declines: an error is not the round time's cut (which an exact policy would count).
    assert len(opened.declined) == N and opened.declined.all() and (opened.groups == 0).all()


def test_a_host_that_raises_anything_is_counted_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """T catches any exception from a host (not only DispersError): that host's items are lost
    (unreachable), the round does not fail."""
    from dispers.protocol.instance.host import PersonalCloudHost

    def broken(self: object, caller: str, request: object) -> object:
        raise RuntimeError("boom")

    monkeypatch.setattr(PersonalCloudHost, "train", broken)
    engine = engine_for(tmp_path, dp_cfg(cohort=N))
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    try:
        qid = engine._querier.submit_round(engine.plan(0, w))
        record, result = engine._querier.round_outcome(qid, len(w), 60.0)
        counts = conductor(engine).record(qid).counts
    finally:
        engine.close()
    assert record.state == "done" and result is not None and counts["unreachable"] == N


@pytest.mark.parametrize("eligible", [True, False])
def test_concurrent_rounds_train_side_by_side(tmp_path: Path, eligible: bool) -> None:
    """Rounds of several runs at once (one thread each, as the services run them) all finish,
    whether or not anyone trains: a host builds one model object per round."""
    import uuid

    from dispers.protocol.conductor import run_in_thread

    engine = engine_for(tmp_path, dp_cfg(cohort=N), empty=() if eligible else tuple(range(N)))
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    q = engine._querier
    try:
        conductor(engine)._executor = run_in_thread
        ids = [q.submit_round(dataclasses.replace(engine.plan(0, w), run_id=uuid.uuid4().hex[:16]))
               for _ in range(6)]  # fmt: skip
        states = [q.round_outcome(i, len(w), 120.0)[0].state for i in ids]
    finally:
        engine.close()
    assert states == ["done"] * 6


def test_the_noise_covers_the_norm_slack_the_aggregator_accepts() -> None:
    """A DA accepts an update of norm up to C (1 + NORM_SLACK) (float rounding): the Gaussian's
    sensitivity is that, not C, so the accountant's z holds for every update it accepts."""
    import math

    from dispers.learn.aggregate import GRID_FRACTION, NORM_SLACK, noise_sigma

    z, c, n = 1.0, 1.0, 100
    sigma, step = noise_sigma(z, c, n)
    assert sigma >= z * (c * (1 + NORM_SLACK) + math.sqrt(n) * step)
    assert step == pytest.approx(z * c / GRID_FRACTION)


@pytest.mark.parametrize("field,value", [("epochs", 1000), ("batch_size", 10**7)])
def test_hosts_cap_the_local_work_a_querier_asks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, field: str, value: int
) -> None:
    """Unbounded epochs (time, and a denial of service) or batch size (memory) are refused against
    the cluster's caps by Q, then by T (before any host is asked), then by each host before it
    looks at anyone."""
    import dispers.protocol.target as tg
    from dispers.core.config import ClusterSettings

    caps = {"epochs": "max_local_epochs", "batch_size": "max_local_batch"}
    engine = engine_for(tmp_path, dp_cfg(cohort=N))
    w = get_flat(build_model("logreg", ModelShape(64, 10)))
    cap = getattr(ClusterSettings(), caps[field])
    try:
        with pytest.raises(DispersError, match=caps[field]):
            engine._querier.submit_round(dataclasses.replace(engine.plan(0, w), **{field: cap + 1}))
        real = lq.TrainingRequest
        monkeypatch.setattr(lq, "TrainingRequest", lambda **kw: real(**{**kw, field: value}))
        qid = engine._querier.submit_round(engine.plan(0, w))
        by_t, _ = engine._querier.round_outcome(qid, len(w), 60.0)
        monkeypatch.setattr(tg, "check_local_work", lambda *args: None)
        qid = engine._querier.submit_round(engine.plan(1, w))  # round 0 was charged: it counts
        engine._querier.round_outcome(qid, len(w), 60.0)
        counts = conductor(engine).record(qid).counts
    finally:
        engine.close()
    assert by_t.state == "failed" and caps[field] in by_t.error_message
    assert counts["unreachable"] == N


def test_T_samples_each_target_independently_at_the_rate_the_root_charges() -> None:
    """The accountant (Opacus RDP/PRV) assumes Poisson sampling at rate cohort / targets (TF's
    attested count, what the root charges for): T includes each target independently at that
    rate, unresolvable addresses included (they count as unreachable), not a fixed-size draw."""
    import random

    from dispers.protocol.target import draw_cohort

    targets = [bytes([i]) * 32 for i in range(40)]
    rng = random.Random(7)
    sizes = [len(draw_cohort(targets, 10, rng)) for _ in range(4000)]
    assert len(set(sizes)) > 5  # binomial, not fixed
    assert np.mean(sizes) == pytest.approx(10, rel=0.03)
    assert np.var(sizes) == pytest.approx(40 * 0.25 * 0.75, rel=0.15)
    counts = np.zeros(40)
    for _ in range(4000):
        for t in draw_cohort(targets, 10, rng):
            counts[t[0]] += 1
    assert np.abs(counts / 4000 - 0.25).max() < 0.04  # every target at the same rate
    assert draw_cohort(targets, 40, rng) == targets and draw_cohort(targets, 400, rng) == targets


def test_a_malicious_hosts_bad_updates_are_dropped_and_the_round_survives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN, a huge norm, a weight above 1 under uniform weighting, infinities: each is dropped
    and counted by the DA, the round releases the average of the sound updates."""
    import dispers.learn.aggregate as agg

    real = agg.encode_update
    calls = {"n": 0}

    def evil(layout: Any, qid: str, update: Any, weight: float) -> bytes:
        calls["n"] += 1
        u = np.array(update, dtype=float)
        if calls["n"] == 1:
            u[0] = np.nan
        elif calls["n"] == 2:
            u *= 1e9
        elif calls["n"] == 3:
            return real(layout, qid, u, 1e6)
        elif calls["n"] == 4:
            u[:] = np.inf
        return real(layout, qid, u, weight)

    monkeypatch.setattr(agg, "encode_update", evil)
    cfg = dataclasses.replace(
        plain_cfg(N), training=dataclasses.replace(plain_cfg(N).training, clip=1.0, weighting="uniform")
    )
    engine = engine_for(tmp_path, cfg)
    try:
        out = engine.run_round(0, get_flat(build_model("logreg", ModelShape(64, 10))))
    finally:
        engine.close()
    assert out.contributed == N - 4 and np.isfinite(out.average_update).all()
    assert np.linalg.norm(out.average_update) <= 1.0 + 1e-6
