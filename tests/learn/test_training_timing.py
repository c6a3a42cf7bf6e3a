"""Timing of a host's answer to a training round: it must not tell T (or C) whether anyone trained.

The attack: T times each host's answer. A host whose one eligible instance trains answers later
than one whose instances all decline, so T learns that person's eligibility. Hosts answer at a
fixed time after the request (`round_time_s`, signed by Q, capped by the cluster), whatever they
did; a host still training then stops and declines every instance asked, at that same time.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dispers.core.wire import ContributionLayout
from dispers.crypto.observe import recording
from dispers.learn.cluster import ClusterEngine
from dispers.learn.config import DataConfig, ExperimentConfig, PrivacyConfig, TrainingConfig
from dispers.learn.local import LocalSettings, train_batched
from dispers.learn.models import ModelShape, build_model, get_flat
from dispers.protocol.instance.host import PersonalCloudHost
from tests.learn.test_training_protocol import small_digits

N = 6  # k_min of the training cluster is 5: every instance is asked (rate 1)
EPOCHS, BATCH = 4, 1  # a thousand single-record SGD steps: seconds of work


def cfg(dp: bool, round_time_s: float, clock: str = "real") -> ExperimentConfig:
    return ExperimentConfig(
        engine="local", model="mlp", seed=2, data=DataConfig(instances=N),
        training=TrainingConfig(rounds=1, cohort=N, local_epochs=EPOCHS, batch_size=BATCH, lr=0.05,
                                clip=1.0, weighting="uniform", round_time_s=round_time_s, clock=clock),
        privacy=PrivacyConfig(user_level=dp, noise_multiplier=1.0, delta=1e-5, budget_epsilon=50.0),
    )  # fmt: skip


def training_seconds() -> float:
    """How long the one eligible instance's local training takes here, timed directly."""
    data = small_digits(N, empty=tuple(range(1, N)))
    model = build_model("mlp", ModelShape(data.n_features, data.n_classes))
    settings = LocalSettings(epochs=EPOCHS, batch_size=BATCH, lr=0.05, clip=1.0)
    start = time.monotonic()
    train_batched(model, get_flat(model), [data.records(0)], [0], settings, seed=2, round_=0)
    return time.monotonic() - start


def answer_as_T_sees_it(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    eligible: bool,
    dp: bool,
    round_time_s: float,
    clock: str = "real",
) -> tuple[float, list[bytes], int]:
    """One round at a host whose only eligible instance (0) holds records, or whose instances
    all hold none: the seconds T waited for the host's answer, every record the DAs opened,
    and the length of every sealed item T forwarded."""
    answered: list[float] = []
    lengths: set[int] = set()
    real = PersonalCloudHost.train

    def timed(self: PersonalCloudHost, caller: str, request: Any) -> Any:
        start = time.monotonic()
        batch = real(self, caller, request)
        answered.append(time.monotonic() - start)
        lengths.update(len(c) for c in batch.ciphertexts)
        return batch

    monkeypatch.setattr(PersonalCloudHost, "train", timed)
    empty = tuple(range(1, N)) if eligible else tuple(range(N))
    data = small_digits(N, empty=empty)
    config = cfg(dp, round_time_s, clock)
    model = build_model(config.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(config, data, model, directory=tmp_path / ("e" if eligible else "n"))
    w = get_flat(model)
    try:
        with recording() as seen:
            qid = engine._querier.submit_round(engine.plan(0, w))
            engine._querier.round_outcome(qid, len(w), 120.0)
    finally:
        engine.close()
    records = [s.plaintext for s in seen if s.what == "model update"]
    assert len(answered) == 1 and len(records) == N and len(lengths) == 1
    return answered[0], records, lengths.pop()


def kinds(records: list[bytes]) -> list[tuple[bool, int]]:
    """(declined, group) of each opened record."""
    header = ContributionLayout(1).size - 8  # version, kind, query id, group
    layout = ContributionLayout((len(records[0]) - header) // 8)
    out = layout.decode_many(records)
    return sorted(zip(out.declined.tolist(), out.groups.tolist(), strict=True))


def test_a_hosts_answer_time_does_not_tell_whether_anyone_trained(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: T times a host asked about one eligible instance, then the same host asked
    about instances that all decline. Both answers come at the round's fixed time: their
    difference is far below the instance's training time, and the one that trained did train."""
    work = training_seconds()
    assert work > 0.5  # what the attack would see without fixed-time answers
    round_time = 2 * work + 0.5
    t_trained, trained, len_a = answer_as_T_sees_it(
        tmp_path, monkeypatch, eligible=True, dp=True, round_time_s=round_time
    )
    t_declined, declined, len_b = answer_as_T_sees_it(
        tmp_path, monkeypatch, eligible=False, dp=True, round_time_s=round_time
    )
    assert kinds(trained).count((False, 0)) == 1  # instance 0's update reached its DA
    assert all(d for d, _ in kinds(declined))
    assert len_a == len_b
    assert abs(t_trained - t_declined) < min(0.15, work / 4)
    assert round_time <= t_trained < round_time + 0.15
    assert round_time <= t_declined < round_time + 0.15


@pytest.mark.parametrize(("dp", "clock"), [(True, "real"), (False, "real"), (True, "simulated")])
def test_a_host_over_its_time_declines_every_instance_at_that_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dp: bool, clock: str
) -> None:
    """A round time shorter than the training: the host stops between batches and answers at the
    round time with a decline of the same length for every instance asked. Under DP the cut
    instance's decline is like any other; without DP it is marked, so the root can count it.
    A simulated clock cuts training on the real clock too: what is trained does not change."""
    work = training_seconds()
    round_time = min(0.5, work / 3)
    took, records, _ = answer_as_T_sees_it(
        tmp_path, monkeypatch, eligible=True, dp=dp, round_time_s=round_time, clock=clock
    )
    assert round_time <= took < round_time + 0.15
    assert len({len(r) for r in records}) == 1
    expected = [(True, 0)] * (N - 1) + [(True, 0 if dp else 1)]
    assert kinds(records) == sorted(expected)


@pytest.mark.parametrize("lifted", ["Q", "Q and T"])
def test_the_round_time_is_capped_by_the_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lifted: str
) -> None:
    """Q refuses a round time above the cluster's max_round_time_s, naming the key. A querier that
    lifts its own check meets T's (T waits that long for each host: the cap bounds a querier's
    hold on T and the hosts), and past T, each host's: nobody trains."""
    import dispers.protocol.learning.querier as lq
    import dispers.protocol.target as tg
    from dispers.core.config import ClusterSettings
    from dispers.core.errors import DispersError

    cap = ClusterSettings().max_round_time_s
    data = small_digits(N)
    config = cfg(False, 1.0)
    model = build_model(config.model, ModelShape(data.n_features, data.n_classes))
    engine = ClusterEngine(config, data, model, directory=tmp_path)
    w = get_flat(model)
    plan = dataclasses.replace(engine.plan(0, w), round_time_s=cap + 1)
    try:
        with pytest.raises(DispersError, match="max_round_time_s"):
            engine._querier.submit_round(plan)
        monkeypatch.setattr(lq, "check_local_work", lambda *args: None)
        if lifted == "Q and T":
            monkeypatch.setattr(tg, "check_local_work", lambda *args: None)
        qid = engine._querier.submit_round(plan)
        record, result = engine._querier.round_outcome(qid, len(w), 60.0)
        counts = engine._querier._actor._conductor._actor.record(qid).counts
    finally:
        engine.close()
    assert result is None
    if lifted == "Q":
        assert record.state == "failed" and "max_round_time_s" in record.error_message
    else:  # every host refused: all unreachable, nobody trained, no model from nobody
        assert counts["unreachable"] == N and "fewer contributors than k" in record.error_message


def test_a_simulated_clock_answers_when_done_and_trains_the_same_model(tmp_path: Path) -> None:
    """The local engine's default: every actor is the experimenter's object in one process, so no
    party times the host, and the host answers as soon as it is done. The round is counted as
    lasting its round time (the summary says so), and the model is the real clock's (up to the
    order in which the DAs add the updates)."""
    from dispers.learn.experiment import run_experiment

    data = small_digits(N, empty=())
    round_time = 3.0
    runs = {}
    for clock in ("real", "simulated"):
        config = cfg(False, round_time, clock)
        config = dataclasses.replace(config, training=dataclasses.replace(
            config.training, rounds=2, local_epochs=1, batch_size=8))  # fmt: skip
        result = run_experiment(config, data=data, output=tmp_path / clock, progress=False)
        runs[clock] = result
        summary = json.loads((tmp_path / clock / "metrics.json").read_text())["summary"]
        assert (summary["clock"], summary["round_time_s"]) == (clock, round_time)
    assert all(r.seconds >= round_time for r in runs["real"].rounds)
    assert all(r.seconds < round_time / 2 for r in runs["simulated"].rounds)
    assert [r.contributed for r in runs["simulated"].rounds] == [N, N]
    np.testing.assert_allclose(get_flat(runs["simulated"].model), get_flat(runs["real"].model), atol=1e-6)
