"""The model registry: a training query names a model, and no actor runs code it was sent.

Every model here is small enough for a sealed update to fit a contribution record
(`dispers.core.wire.MAX_FIELDS` float64 values, one of them the update's weight).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from dispers.core.errors import DispersError, ErrorCode

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ModelShape:
    """What a model's input and output look like: features (flat) and classes."""

    n_features: int
    n_classes: int


class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer, softmax in the loss."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        self.linear = nn.Linear(shape.n_features, shape.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)  # type: ignore[no-any-return]


class MLP(nn.Module):
    """One hidden layer of 32 ReLU units."""

    def __init__(self, shape: ModelShape, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = nn.Linear(shape.n_features, hidden)
        self.out = nn.Linear(hidden, shape.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))  # type: ignore[no-any-return]


class SmallCNN(nn.Module):
    """Two 3x3 convolutions over an 8x8 image (64 features), 2x2 max-pooling, a linear head."""

    def __init__(self, shape: ModelShape) -> None:
        super().__init__()
        if shape.n_features != 64:
            raise DispersError(ErrorCode.MALFORMED, "model 'cnn' takes 8x8 images (64 features)")
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.out = nn.Linear(12 * 2 * 2, shape.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, 8, 8)
        h = torch.max_pool2d(torch.relu(self.conv1(h)), 2)
        h = torch.max_pool2d(torch.relu(self.conv2(h)), 2)
        return self.out(h.flatten(1))  # type: ignore[no-any-return]


MODELS: dict[str, Callable[[ModelShape], nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
}


def build_model(name: str, shape: ModelShape, *, seed: int = 0) -> nn.Module:
    """A fresh model of the registry, its initial weights drawn from `seed`."""
    if name not in MODELS:
        raise DispersError(
            ErrorCode.MALFORMED, f"unknown model {name!r} (the registry has {', '.join(sorted(MODELS))})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](shape).to(torch.float32)


def n_params(model: nn.Module) -> int:
    """How many trainable values the model has (the length of its update)."""
    return sum(p.numel() for p in model.parameters())


def get_flat(model: nn.Module) -> FloatArray:
    """The model's parameters as one float64 vector, in `parameters()` order."""
    with torch.no_grad():
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to(torch.float64).numpy()


def set_flat(model: nn.Module, flat: npt.ArrayLike) -> None:
    """Load a flat vector (as `get_flat` makes) into the model's parameters."""
    v = torch.as_tensor(np.asarray(flat, dtype=np.float32))
    if v.numel() != n_params(model):
        raise DispersError(ErrorCode.MALFORMED, "a model vector of the wrong length")
    with torch.no_grad():
        i = 0
        for p in model.parameters():
            p.copy_(v[i : i + p.numel()].reshape(p.shape))
            i += p.numel()
