"""How a round's average update is obtained: the simulation engine, or the actors of a cluster.

Both take the global weights and return the round's (noised) average update and what it cost;
`dispers.learn.experiment` runs the rounds, the server optimizer and the evaluation around them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import BrokenExecutor, Future
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from torch import nn

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import new_query_id
from dispers.learn.accounting import UserLevelDP, epsilon_after, round_charge
from dispers.learn.aggregate import UpdateSum, average
from dispers.learn.config import ExperimentConfig
from dispers.learn.data import FederatedData
from dispers.learn.models import n_params
from dispers.learn.shards import (
    Records,
    ShardPartial,
    TrainShard,
    TrainShardSpec,
    assign_instances,
    records_digest,
    shard_records,
)
from dispers.simulation.backends import ShardBackend, make_backend
from dispers.state.budget import MemoryBudgetLedger, Spend

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
SIM_QUERIER = "researcher"
K_MIN = 5
"""The k of the clusters `dispers train` builds (and of the simulation engine): without user-level
DP, a round's update is exact, and the root releases none resting on fewer contributors."""


def below_k(what: str) -> DispersError:
    """The root's refusal of a release resting on fewer than k contributors (no DP)."""
    return DispersError(
        ErrorCode.TOO_FEW_TARGETS, f"{what} has fewer contributors than k; nothing is released"
    )


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
    """Every instance as columns of arrays in shards, one model object per shard, no crypto.

    The same maths as the actors (clipped updates summed, the root's `average`, the accountant
    and a budget ledger), without sealing: for experiments at scale. The driver draws the
    cohort and charges the round; each shard (`dispers.learn.shards`) trains its cohort
    members and returns one exact partial sum; the driver adds the partials and averages.
    One shard on the local backend runs in this process; more run as worker processes or Ray
    actors (`dispers.simulation.backends`), and give the same model bit for bit.
    """

    def __init__(
        self, config: ExperimentConfig, data: FederatedData, model: nn.Module, *, generated: bool = False
    ) -> None:
        """`generated`: `data` is what the config's dataset generates, so shards make their own."""
        self._config = config
        self._data = data
        self._model = model
        self._dp = user_level(config, data.n_instances)
        self._ledger = MemoryBudgetLedger()
        self._total = Spend(config.privacy.budget_epsilon, config.privacy.delta)
        self._n_params = n_params(model)
        n_shards = config.shards or default_shards(data.n_instances)
        self._runs = assign_instances(data.n_instances, n_shards)
        self._local: TrainShard | None = None
        self._backend: ShardBackend | None = None
        whole = (data.x, data.y, data.offsets)
        if n_shards == 1 and config.backend == "local":
            self._local = TrainShard(self._spec(self._runs[0], whole))
            self._local.load()
            return
        specs = []
        for run in self._runs:
            records = shard_records(data, run, copy=not generated)
            specs.append(self._spec(run, records, ship=not generated))
        self._backend = make_backend(config.backend, address=config.address)
        try:
            self._backend.start(specs, TrainShard)
            _results([self._backend.call(s, "load") for s in range(len(specs))])
        except BaseException:
            self._backend.close()
            raise

    def _spec(self, run: range, records: Records, *, ship: bool = True) -> TrainShardSpec:
        d = self._data
        return TrainShardSpec(
            self._config, run, records_digest(records), d.n_features, d.n_classes,
            records if ship else None,
        )  # fmt: skip

    def _train(self, round_: int, weights: FloatArray, cohort: IntArray) -> ShardPartial:
        """Every shard's partial for the cohort, added up."""
        total = ShardPartial.empty(self._n_params)
        if self._local is not None:
            total.merge(self._local.train(round_, weights, cohort.tolist()))
            return total
        assert self._backend is not None
        calls = []
        for s, run in enumerate(self._runs):
            members = cohort[(cohort >= run.start) & (cohort < run.stop)]
            calls.append(self._backend.call(s, "train", round_, weights, members.tolist()))
        if self._dp is not None:  # while the shards train: the next round's charge (cached)
            epsilon_after(self._dp, round_ + 2)
        for part in _results(calls):
            total.merge(part)
        return total

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
        part = self._train(round_, weights, cohort.astype(np.int64))
        if self._dp is None and part.count < K_MIN:  # as the root DA: an exact update from < k
            raise below_k(f"round {round_ + 1}")
        total = UpdateSum(part.updates.value(), part.weight, part.count, part.declines)
        avg = average(
            total,
            noise_multiplier=self._dp.noise_multiplier if self._dp else None,
            clip=cfg.training.clip,
            cohort=m,
        )
        spent = epsilon_after(self._dp, round_ + 1) if self._dp else 0.0
        loss = float(part.loss.value()[0]) / part.examples if part.count else None
        return RoundOutput(avg, m, part.count, part.declines, 0, loss, spent, left, cut=0)

    def __enter__(self) -> SimulationEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        contributors = 0
        for i in cohort:
            x, y = self._data.records(int(i))
            if len(y):
                sums += evaluation_record(self._model, x, y, e.max_examples)
                contributors += 1
        if contributors < K_MIN:  # as the root DA, with or without DP
            raise below_k(f"evaluation {index + 1}")
        released = release_sums(
            sums, noise_multiplier=dp.noise_multiplier if dp else None, max_examples=e.max_examples
        )
        loss, acc = metrics(released)
        return EvaluationOutput(released, loss, acc, epsilon_after(dp, index + 1) if dp else 0.0, left)

    def close(self) -> None:
        """Stop the shards' workers, if any."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None


def _results(calls: list[Future[Any]]) -> list[Any]:
    """Every call's result; a worker that died (killed, out of memory) is a DispersError."""
    try:
        return [call.result() for call in calls]
    except BrokenExecutor:
        raise DispersError(ErrorCode.UNAVAILABLE, "a training shard's worker process died") from None


AUTO_SHARDS_FROM = 10_000
"""Without `experiment.shards`, populations this large get one shard per core; smaller ones
train in the driver's process (starting a worker costs 5-12 s here, more than a small
experiment's rounds, and a cohort of tens gains nothing from being split)."""


def default_shards(instances: int) -> int:
    """The number of shards when the experiment does not say."""
    return min(cores(), instances) if instances >= AUTO_SHARDS_FROM else 1


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
