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
from dispers.learn.engine import RoundEngine, SimulationEngine
from dispers.learn.models import ModelShape, build_model, get_flat, n_params, set_flat
from dispers.learn.report import RoundMetrics, write_outputs
from dispers.learn.server import ServerOptimizer

log = logging.getLogger(__name__)
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
    eval_epsilon = 0.0
    try:
        for r in range(config.training.rounds):
            start = time.perf_counter()
            try:
                out = engine.run_round(r, weights)
            except DispersError as exc:
                if exc.code is ErrorCode.BUDGET_EXCEEDED:
                    result.stopped = exc.message
                    log.info("%s", exc.message)
                    break
                raise
            weights = server.step(weights, out.average_update)
            set_flat(model, weights)
            test_loss, acc = evaluate(model, fed.x_test, fed.y_test)
            fed_loss = fed_acc = None
            budget_left = out.budget_left
            if config.evaluation.federated and (r + 1) % config.evaluation.every == 0:
                try:
                    ev = engine.run_evaluation(evaluated, weights)
                except DispersError as exc:
                    if exc.code is not ErrorCode.BUDGET_EXCEEDED:
                        raise
                    result.stopped = exc.message
                    log.info("%s", exc.message)
                else:
                    evaluated += 1
                    fed_loss, fed_acc, eval_epsilon = ev.loss, ev.accuracy, ev.epsilon_spent
                    budget_left = ev.budget_left if ev.budget_left is not None else budget_left
            row = RoundMetrics(
                round=r, asked=out.asked, contributed=out.contributed, declined=out.declined,
                cut=out.cut, unreachable=out.unreachable, train_loss=out.train_loss, test_loss=test_loss,
                test_accuracy=acc, federated_loss=fed_loss, federated_accuracy=fed_acc,
                epsilon=out.epsilon_spent + eval_epsilon, budget_left=budget_left,
                seconds=time.perf_counter() - start,
            )  # fmt: skip
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
        }
        result.outputs = write_outputs(output, model, result.rounds, summary)
    return result
