"""Run a training experiment: rounds of (engine -> average update -> server optimizer -> evaluation).

The keyword-only entry point is `run_experiment`; `dispers train experiment.toml` calls it.
Training that would overspend the querier's privacy budget stops cleanly before that round:
the result says why (`stopped`), and the model and metrics so far are kept.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from dispers.core.errors import DispersError, ErrorCode
from dispers.learn import data as datasets
from dispers.learn.config import ExperimentConfig
from dispers.learn.engine import RoundEngine, RoundOutput, SimulationEngine
from dispers.learn.models import ModelShape, build_model, get_flat, n_params, set_flat
from dispers.learn.report import RoundMetrics, write_outputs
from dispers.learn.server import ServerOptimizer

log = logging.getLogger(__name__)
MAX_UNRELEASED = 5  # rounds in a row releasing nothing (fewer than k) before training stops
FloatArray = npt.NDArray[np.float64]


@dataclass
class TrainingResult:
    """The trained model, every round's metrics, and why training stopped early (if it did)."""

    model: nn.Module
    rounds: list[RoundMetrics] = field(default_factory=list)
    stopped: str | None = None
    outputs: list[Path] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        """Test accuracy after the last round run (before any, 0)."""
        return self.rounds[-1].test_accuracy if self.rounds else 0.0


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) on the Querier's held-out set."""
    with torch.no_grad():
        out = model(x)
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def build_engine(
    config: ExperimentConfig, data: datasets.FederatedData, model: nn.Module, *, generated: bool = False
) -> RoundEngine:
    """The engine the config names (`generated`: `data` is what the config's dataset generates)."""
    if config.engine == "simulation":
        return SimulationEngine(config, data, model, generated=generated)
    from dispers.learn.cluster import ClusterEngine

    return ClusterEngine(config, data, model)


def run_experiment(
    config: ExperimentConfig,
    *,
    output: Path | None = None,
    progress: bool = False,
    data: datasets.FederatedData | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
) -> TrainingResult:
    """Train `config.model` over `config.data` for `config.training.rounds` rounds.

    `data` overrides the dataset the config names (tests pass small ones); `output`, when given,
    receives model.pt, metrics.csv, metrics.json and curves.png; `progress` shows a bar per round.
    """
    torch.manual_seed(config.seed)
    fed = data or datasets.load(
        config.data.dataset, n_instances=config.data.instances, split=config.data.split,
        alpha=config.data.alpha, seed=config.seed,
    )  # fmt: skip
    model = build_model(config.model, ModelShape(fed.n_features, fed.n_classes), seed=config.seed)
    if n_params(model) + 1 > 4096:
        raise DispersError(ErrorCode.CONFIG, "experiment: the model is too large for one contribution record")
    weights = get_flat(model)
    server = ServerOptimizer(config.server.optimizer, lr=config.server.lr, momentum=config.server.momentum)
    engine = build_engine(config, fed, model, generated=data is None)
    result = TrainingResult(model)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.training.rounds, unit="round", desc=config.name)
    evaluated = 0  # federated evaluations run
    eval_epsilon = train_epsilon = 0.0
    unreleased = 0  # rounds in a row that released nothing
    try:
        for r in range(config.training.rounds):
            start = time.perf_counter()
            try:
                out: RoundOutput | None = engine.run_round(r, weights)
            except DispersError as exc:
                if exc.code is ErrorCode.BUDGET_EXCEEDED:
                    result.stopped = exc.message
                    log.info("%s", exc.message)
                    break
                if exc.code is not ErrorCode.TOO_FEW_TARGETS:
                    raise
                # Fewer than k contributed (Poisson's draw, declines, a host down): the root
                # released nothing, and the model stays as it was for the next round.
                log.info("round %d released nothing: %s", r + 1, exc.message)
                out = None
            if out is not None:
                weights = server.step(weights, out.average_update)
                set_flat(model, weights)
                unreleased = 0
            else:
                unreleased += 1
            test_loss, acc = evaluate(model, fed.x_test, fed.y_test)
            fed_loss = fed_acc = None
            if out is not None:
                budget_left = out.budget_left
            else:
                budget_left = result.rounds[-1].budget_left if result.rounds else None
            if config.evaluation.federated and (r + 1) % config.evaluation.every == 0:
                try:
                    ev = engine.run_evaluation(evaluated, weights)
                except DispersError as exc:
                    if exc.code is ErrorCode.TOO_FEW_TARGETS:
                        # Nothing released. Under DP it was charged, and counts in the
                        # evaluations' accounting: the next one's epsilon includes it.
                        evaluated += 1
                        log.info("evaluation %d released nothing: %s", evaluated, exc.message)
                    elif exc.code is ErrorCode.BUDGET_EXCEEDED:
                        result.stopped = exc.message
                        log.info("%s", exc.message)
                    else:
                        raise
                else:
                    evaluated += 1
                    fed_loss, fed_acc, eval_epsilon = ev.loss, ev.accuracy, ev.epsilon_spent
                    budget_left = ev.budget_left if ev.budget_left is not None else budget_left
            if out is not None:
                train_epsilon = out.epsilon_spent
                row = RoundMetrics(
                    round=r, asked=out.asked, contributed=out.contributed, declined=out.declined,
                    cut=out.cut, unreachable=out.unreachable, train_loss=out.train_loss,
                    test_loss=test_loss, test_accuracy=acc, federated_loss=fed_loss,
                    federated_accuracy=fed_acc, epsilon=train_epsilon + eval_epsilon,
                    budget_left=budget_left, seconds=time.perf_counter() - start,
                )  # fmt: skip
            else:  # only without DP (under DP the root always releases, noised): nothing spent
                row = RoundMetrics(
                    round=r, asked=config.training.cohort, contributed=None, declined=None, cut=None,
                    unreachable=0, train_loss=None, test_loss=test_loss, test_accuracy=acc,
                    federated_loss=fed_loss, federated_accuracy=fed_acc,
                    epsilon=train_epsilon + eval_epsilon, budget_left=budget_left,
                    seconds=time.perf_counter() - start, released=False,
                )  # fmt: skip
                if unreleased >= MAX_UNRELEASED:
                    result.stopped = (
                        f"{unreleased} rounds in a row had fewer than k contributors and released "
                        "nothing: raise training.cohort (or use user-level DP)"
                    )
                    log.info("%s", result.stopped)
            result.rounds.append(row)
            if on_round is not None:
                on_round(row)
            if bar is not None:
                bar.set_postfix(acc=f"{acc:.3f}", eps=f"{row.epsilon:.2f}")
                bar.update(1)
            if result.stopped:
                break
    finally:
        engine.close()
        if bar is not None:
            bar.close()
    set_flat(model, weights)
    if output is not None:
        summary = {
            "name": config.name,
            "model": config.model,
            "dataset": config.data.dataset,
            "engine": config.engine,
            "rounds_run": len(result.rounds),
            "final_accuracy": result.final_accuracy,
            "epsilon": result.rounds[-1].epsilon if result.rounds else 0.0,
            "delta": config.privacy.delta if config.privacy.user_level else 0.0,
            "stopped": result.stopped,
            "rounds_unreleased": sum(not r.released for r in result.rounds),
        }
        if config.engine != "simulation":
            from dispers.learn.cluster import ClusterEngine

            assert isinstance(engine, ClusterEngine)
            # A round lasts its round time; on a simulated clock (engine "local"), only counted so.
            summary["clock"] = engine.clock
            summary["round_time_s"] = engine.round_time_s
        result.outputs = write_outputs(output, model, result.rounds, summary)
    return result
