"""Federated evaluation: each instance scores the global model on its own records; sums released.

An instance's evaluation is one fixed-length record (`EVAL_FIELDS` values): its loss sum (each
record's cross-entropy capped at `MAX_LOSS`, in units of it), how many records the model got
right, and how many it evaluated (its first `max_examples`). Each value is at most max_examples,
so one person moves the sums by at most `eval_sensitivity(max_examples)` in L2: the root's
Gaussian noise is calibrated to that, and accounted like a training round (subsampled Gaussian
at the cohort's rate) on a run of its own.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from dispers.protocol.learning.messages import EVAL_FIELDS, MAX_LOSS, eval_sensitivity

FloatArray = npt.NDArray[np.float64]


def evaluation_record(model: nn.Module, x: torch.Tensor, y: torch.Tensor, max_examples: int) -> FloatArray:
    """(loss sum / MAX_LOSS, correct, count) of `model` on the first `max_examples` records."""
    x, y = x[:max_examples], y[:max_examples]
    with torch.no_grad():
        out = model(x)
        loss = F.cross_entropy(out, y, reduction="none").clamp(max=MAX_LOSS)
        correct = (out.argmax(1) == y).sum()
    return np.array([float(loss.sum()) / MAX_LOSS, float(correct), float(len(y))])


def release_sums(sums: FloatArray, *, noise_multiplier: float | None, max_examples: int) -> FloatArray:
    """The root's release of summed evaluation records: exact, or with discrete Gaussian noise of
    noise_multiplier times one instance's L2 bound; the loss sum back in nats."""
    values = np.asarray(sums, dtype=np.float64).reshape(EVAL_FIELDS)
    if noise_multiplier is not None:
        from dispers.learn.aggregate import noise_sigma
        from dispers.protocol.aggregation.dp import Noise, add_noise

        sigma, step = noise_sigma(noise_multiplier, eval_sensitivity(max_examples), EVAL_FIELDS)
        values = np.asarray(add_noise(values, Noise("gaussian", sigma, step)), dtype=np.float64)
    out: FloatArray = values * np.array([MAX_LOSS, 1.0, 1.0])
    return out


def metrics(released: FloatArray) -> tuple[float | None, float | None]:
    """(mean loss, accuracy) from released sums (post-processing); None where the (noised)
    number of examples is not positive."""
    loss, correct, count = (float(v) for v in released)
    if count <= 0:
        return None, None
    return max(0.0, loss / count), min(1.0, max(0.0, correct / count))
