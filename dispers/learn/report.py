"""What a training run writes: the model (torch state dict), per-round CSV and JSON, PNG curves."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RoundMetrics:
    """One row of the per-round metrics."""

    round: int
    asked: int
    contributed: int | None
    declined: int | None
    cut: int | None  # of the declines, stopped by the round time (None: withheld under DP)
    unreachable: int
    train_loss: float | None
    test_loss: float
    test_accuracy: float
    federated_loss: float | None  # the instances' own records (federated evaluation rounds only)
    federated_accuracy: float | None
    epsilon: float
    budget_left: float | None
    seconds: float
    # False: fewer than k instances contributed (no DP), the root released nothing and the
    # model stayed as it was
    released: bool = True


def write_outputs(
    directory: Path, model: nn.Module, rows: list[RoundMetrics], summary: dict[str, Any]
) -> list[Path]:
    """Write model.pt, metrics.csv, metrics.json and curves.png into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / n for n in ("model.pt", "metrics.csv", "metrics.json", "curves.png")]
    torch.save(model.state_dict(), paths[0])
    names = list(RoundMetrics.__dataclass_fields__)
    with paths[1].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
    paths[2].write_text(
        json.dumps({"summary": summary, "rounds": [asdict(r) for r in rows]}, indent=2) + "\n"
    )
    _plot(paths[3], rows, str(summary.get("name", "")))
    return paths


def _plot(path: Path, rows: list[RoundMetrics], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r.round + 1 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(x, [r.test_accuracy for r in rows], label="test accuracy")
    federated = [(r.round + 1, r.federated_accuracy) for r in rows if r.federated_accuracy is not None]
    if federated:
        axes[0].plot([a for a, _ in federated], [b for _, b in federated], "o-", label="federated accuracy")
    axes[0].set_ylim(0, 1)
    axes[1].plot(x, [r.test_loss for r in rows], label="test loss")
    train = [(r.round + 1, r.train_loss) for r in rows if r.train_loss is not None]
    if train:
        axes[1].plot([a for a, _ in train], [b for _, b in train], label="train loss (local)")
    axes[2].plot(x, [r.epsilon for r in rows], label="epsilon spent")
    privacy = "privacy" if any(r.epsilon > 0 for r in rows) else "privacy (no user-level DP)"
    for ax, name in zip(axes, ("accuracy", "loss", privacy), strict=True):
        ax.set_xlabel("round")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
