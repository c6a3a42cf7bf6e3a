"""How a round's average update is obtained: the simulation engine, or the actors of a cluster.

Both take the global weights and return the round's (noised) average update and what it cost;
`dispers.learn.experiment` runs the rounds, the server optimizer and the evaluation around them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt
from torch import nn

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import new_query_id
from dispers.learn.accounting import UserLevelDP, epsilon_after, round_charge
from dispers.learn.aggregate import UpdateSum, average
from dispers.learn.config import ExperimentConfig
from dispers.learn.data import FederatedData
from dispers.learn.local import LocalSettings, train_batched, train_sequential
from dispers.state.budget import MemoryBudgetLedger, Spend

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]
SIM_QUERIER = "researcher"


@dataclass(frozen=True)
class RoundOutput:
    """A round as the Querier sees it once the root DA released it."""

    average_update: FloatArray
    asked: int  # cohort size asked
    contributed: int | None  # None when the cluster's DP policy withholds exact counts
    declined: int | None
    unreachable: int  # instances whose host did not answer (dropouts seen by T)
    train_loss: float | None  # mean local loss (simulation only: instances keep theirs)
    epsilon_spent: float  # the run's accounted epsilon so far (0 without user-level DP)
    budget_left: float | None
    cut: int | None = None  # declines of instances the round time stopped (exact policy only)


@dataclass(frozen=True)
class EvaluationOutput:
    """A federated evaluation as the Querier sees it: (noised) sums, then mean loss and accuracy."""

    sums: FloatArray  # loss (nats), correct, examples: summed over the instances, noised under DP
    loss: float | None  # None when the (noised) number of examples is not positive
    accuracy: float | None
    epsilon_spent: float  # the evaluation run's accounted epsilon so far
    budget_left: float | None


class RoundEngine(Protocol):
    """Runs one federated round from the global weights."""

    def run_round(self, round_: int, weights: FloatArray) -> RoundOutput: ...
    def run_evaluation(self, index: int, weights: FloatArray) -> EvaluationOutput: ...
    def close(self) -> None: ...


def local_settings(config: ExperimentConfig) -> LocalSettings:
    """What each instance is told to do locally."""
    t, p = config.training, config.privacy
    return LocalSettings(
        epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, clip=t.clip,
        record_noise=p.record_noise, record_clip=p.record_clip,
    )  # fmt: skip


def user_level(config: ExperimentConfig, population: int) -> UserLevelDP | None:
    """The run's user-level DP parameters (the sampling rate from the population size)."""
    p = config.privacy
    if not p.user_level:
        return None
    rate = min(1.0, config.training.cohort / max(1, population))
    return UserLevelDP(p.noise_multiplier, rate, p.delta, p.accountant)


def budget_message(round_: int, need: float, left: float, what: str = "round") -> str:
    """Why training stopped: the next round (or evaluation) would overspend the querier's budget."""
    return (
        f"training stopped before {what} {round_ + 1}: it would spend epsilon {need:.4g} "
        f"and the querier's budget has {left:.4g} left"
    )


class SimulationEngine:
    """Every instance in this process as columns of arrays, one model object, no crypto.

    The same maths as the actors (clipped updates summed into an UpdateSum, the root's
    `average`, the accountant and a budget ledger), without sealing: for experiments at scale.
    """

    def __init__(self, config: ExperimentConfig, data: FederatedData, model: nn.Module) -> None:
        self._config = config
        self._data = data
        self._model = model
        self._settings = local_settings(config)
        self._dp = user_level(config, data.n_instances)
        self._ledger = MemoryBudgetLedger()
        self._total = Spend(config.privacy.budget_epsilon, config.privacy.delta)

    def run_round(self, round_: int, weights: FloatArray) -> RoundOutput:
        cfg = self._config
        m = cfg.training.cohort
        n = self._data.n_instances
        rng = np.random.default_rng([cfg.seed, round_, 7])
        # Poisson sampling at rate m / n, as T draws and as the accountant assumes.
        cohort = np.arange(n) if m >= n else np.flatnonzero(rng.random(n) < m / n)
        left = None
        if self._dp is not None:
            eps, delta = round_charge(self._dp, round_)
            try:
                status = self._ledger.charge(SIM_QUERIER, new_query_id(), Spend(eps, delta), self._total)
            except DispersError as exc:
                if exc.code is ErrorCode.BUDGET_EXCEEDED:
                    now = self._ledger.status(SIM_QUERIER, self._total)
                    raise DispersError(exc.code, budget_message(round_, eps, now.left.epsilon)) from None
                raise
            left = status.left.epsilon
        sizes = self._data.sizes()[cohort]
        active = [int(i) for i, n in zip(cohort, sizes, strict=True) if n > 0]
        records = [self._data.records(i) for i in active]
        train = train_batched if cfg.training.batched else train_sequential
        result = train(self._model, weights, records, active, self._settings, seed=cfg.seed, round_=round_)
        w = (
            result.examples.astype(np.float64)
            if cfg.training.weighting == "examples"
            else np.ones(len(active))
        )
        total = UpdateSum.empty(len(weights))
        total.add(np.concatenate([result.updates * w[:, None], w[:, None]], axis=1))
        total.declines = len(cohort) - len(active)
        avg = average(
            total,
            noise_multiplier=self._dp.noise_multiplier if self._dp else None,
            clip=cfg.training.clip,
            cohort=m,
        )
        spent = epsilon_after(self._dp, round_ + 1) if self._dp else 0.0
        loss = float(np.average(result.losses, weights=np.maximum(result.examples, 1))) if active else None
        return RoundOutput(avg, m, len(active), len(cohort) - len(active), 0, loss, spent, left, cut=0)

    def run_evaluation(self, index: int, weights: FloatArray) -> EvaluationOutput:
        """Evaluation `index`: a cohort drawn as for training scores `weights` on its own records;
        sums noised and charged as the root does (a run of its own in the accountant)."""
        from dispers.learn.evaluation import evaluation_record, metrics, release_sums
        from dispers.learn.models import set_flat

        cfg, e = self._config, self._config.evaluation
        m = cfg.training.cohort
        n = self._data.n_instances
        rng = np.random.default_rng([cfg.seed, index, 11])
        cohort = np.arange(n) if m >= n else np.flatnonzero(rng.random(n) < m / n)
        dp = (
            UserLevelDP(
                e.noise_multiplier, min(1.0, m / max(1, n)), cfg.privacy.delta, cfg.privacy.accountant
            )
            if cfg.privacy.user_level
            else None
        )
        left = None
        if dp is not None:
            eps, delta = round_charge(dp, index)
            try:
                status = self._ledger.charge(SIM_QUERIER, new_query_id(), Spend(eps, delta), self._total)
            except DispersError as exc:
                if exc.code is ErrorCode.BUDGET_EXCEEDED:
                    now = self._ledger.status(SIM_QUERIER, self._total)
                    message = budget_message(index, eps, now.left.epsilon, "evaluation")
                    raise DispersError(exc.code, message) from None
                raise
            left = status.left.epsilon
        set_flat(self._model, weights)
        sums = np.zeros(3)
        for i in cohort:
            x, y = self._data.records(int(i))
            if len(y):
                sums += evaluation_record(self._model, x, y, e.max_examples)
        released = release_sums(
            sums, noise_multiplier=dp.noise_multiplier if dp else None, max_examples=e.max_examples
        )
        loss, acc = metrics(released)
        return EvaluationOutput(released, loss, acc, epsilon_after(dp, index + 1) if dp else 0.0, left)

    def close(self) -> None:
        """Nothing to release."""
