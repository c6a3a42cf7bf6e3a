"""Server optimizers over flat model vectors: the average update is a pseudo-gradient.

FedAvg adds the average update (times the server learning rate); FedAvgM keeps a momentum of
it; FedAdam is Adam on it (Reddi et al. 2021, "Adaptive Federated Optimization"). Applying
them to the released (noised) average is post-processing: it costs no privacy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dispers.core.errors import DispersError, ErrorCode

FloatArray = npt.NDArray[np.float64]
OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


@dataclass
class ServerOptimizer:
    """One of OPTIMIZERS, with its state (momentum, Adam moments) across rounds."""

    name: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3
    _m: FloatArray | None = field(default=None, repr=False)
    _v: FloatArray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise DispersError(
                ErrorCode.CONFIG, f"unknown server optimizer {self.name!r} ({', '.join(OPTIMIZERS)})"
            )

    def step(self, weights: FloatArray, average_update: FloatArray) -> FloatArray:
        """The next global weights from the current ones and the round's average update."""
        d = np.asarray(average_update, dtype=np.float64)
        if self.name == "fedavg":
            return weights + self.lr * d
        if self.name == "fedavgm":
            self._m = d if self._m is None else self.momentum * self._m + d
            return weights + self.lr * self._m
        self._m = (1 - self.beta1) * d if self._m is None else self.beta1 * self._m + (1 - self.beta1) * d
        self._v = (
            (1 - self.beta2) * d * d if self._v is None else self.beta2 * self._v + (1 - self.beta2) * d * d
        )
        out: FloatArray = weights + self.lr * self._m / (np.sqrt(self._v) + self.eps)
        return out
