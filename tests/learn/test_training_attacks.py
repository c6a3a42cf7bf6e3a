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
        engine="local", model="logreg", seed=1, data=DataConfig(instances=N),
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
