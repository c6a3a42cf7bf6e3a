"""Local training inside each instance: minibatch SGD on its own records, then a clipped update.

One model object serves every instance of a shard (its weights reloaded per instance), never a
model copy per instance. `train_batched` trains many instances at once with `torch.func`
(vmap over instances of functional_call + grad): the same SGD steps on the same batches,
padded with masks, so its updates equal the sequential ones up to float rounding.

The batches of an instance in a round are drawn from (seed, round, instance): both paths, and
any test, see the same ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from dispers.learn.models import get_flat, set_flat

FloatArray = npt.NDArray[np.float64]
Stop = Callable[[], bool]  # asked between batches: True stops the training (a host's round time)


class Stopped(Exception):
    """Training was stopped between batches (the host's round time is up)."""


def _check(stop: Stop | None) -> None:
    if stop is not None and stop():
        raise Stopped


@dataclass(frozen=True)
class LocalSettings:
    """How each instance trains: local epochs, batch size, learning rate, update clipping."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    clip: float | None = None  # the L2 norm each update is clipped to (None: no clipping)
    record_noise: float | None = None  # record-level DP-SGD (Opacus) noise multiplier, or None
    record_clip: float = 1.0  # per-record gradient norm for DP-SGD


@dataclass(frozen=True)
class LocalResult:
    """What a group of instances produced: one clipped update per instance and its loss."""

    updates: FloatArray  # (k, n_params) float64, each clipped to the settings' norm
    examples: npt.NDArray[np.int64]  # records each instance trained on
    losses: FloatArray  # mean training loss over each instance's last epoch


def batches(
    n: int, settings: LocalSettings, *, seed: int, round_: int, instance: int
) -> list[npt.NDArray[np.int64]]:
    """The minibatches (indices into the instance's records) of one instance in one round."""
    rng = np.random.default_rng([seed, round_, instance])
    out: list[npt.NDArray[np.int64]] = []
    for _ in range(settings.epochs):
        perm = rng.permutation(n)
        out.extend(perm[j : j + settings.batch_size] for j in range(0, n, settings.batch_size))
    return out


def clip_rows(updates: FloatArray, clip: float | None) -> FloatArray:
    """Scale each row down to L2 norm at most `clip` (rows already within it are unchanged)."""
    if clip is None:
        return updates
    norms = np.linalg.norm(updates, axis=1, keepdims=True)
    factor: FloatArray = np.minimum(1.0, clip / np.maximum(norms, 1e-12))
    return updates * factor


def _last_epoch_steps(n: int, settings: LocalSettings) -> int:
    return max(1, math.ceil(n / settings.batch_size))


def train_sequential(
    model: nn.Module,
    global_flat: FloatArray,
    records: list[tuple[torch.Tensor, torch.Tensor]],
    instances: list[int],
    settings: LocalSettings,
    *,
    seed: int,
    round_: int,
    stop: Stop | None = None,
) -> LocalResult:
    """Train each instance in turn on the one `model` object, starting from `global_flat`
    (`stop`, asked between batches, raises Stopped when it says so)."""
    updates = np.zeros((len(records), len(global_flat)))
    losses = np.zeros(len(records))
    examples = np.array([len(y) for _, y in records], dtype=np.int64)
    for k, ((x, y), inst) in enumerate(zip(records, instances, strict=True)):
        set_flat(model, global_flat)
        plan = batches(len(y), settings, seed=seed, round_=round_, instance=inst)
        if settings.record_noise is not None:
            losses[k] = _train_dp_sgd(model, x, y, plan, settings, stop=stop)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
            tail_from = len(plan) - _last_epoch_steps(len(y), settings)
            total = 0.0
            for s, b in enumerate(plan):
                _check(stop)
                idx = torch.from_numpy(b)
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()  # type: ignore[no-untyped-call]
                opt.step()
                if s >= tail_from:
                    total += loss.item() * len(b)
            losses[k] = total / max(1, len(y))
        updates[k] = get_flat(model) - global_flat
    return LocalResult(clip_rows(updates, settings.clip), examples, losses)


def _train_dp_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    plan: list[npt.NDArray[np.int64]],
    settings: LocalSettings,
    *,
    stop: Stop | None = None,
) -> float:
    """Record-level DP-SGD inside the instance: Opacus' `make_private` over its own records.

    Poisson-sampled batches of expected size `batch_size` (what Opacus' accountants assume),
    each record's gradient clipped to `record_clip`, Gaussian noise of `record_noise` times
    that. The noise comes from a generator seeded from the OS's random source, never from the
    run's seed (which the Querier chose). The hooks are removed afterwards: the one model
    object serves the next instance.
    """
    import secrets
    import warnings

    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    assert settings.record_noise is not None
    engine = PrivacyEngine(accountant="rdp")
    loader = DataLoader(TensorDataset(x, y), batch_size=min(settings.batch_size, max(1, len(y))))
    noise = torch.Generator().manual_seed(secrets.randbits(63))
    with warnings.catch_warnings():
        # Opacus warns of its non-cryptographic RNG and of hooks on inputs that need no grad.
        warnings.simplefilter("ignore")
        private, optimizer, batches_ = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=settings.lr),
            data_loader=loader, noise_multiplier=settings.record_noise,
            max_grad_norm=settings.record_clip, noise_generator=noise,
        )  # fmt: skip
        return _dp_epochs(private, optimizer, batches_, settings.epochs, stop)


def _dp_epochs(private: Any, optimizer: Any, batches_: Any, epochs: int, stop: Stop | None) -> float:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            total, seen = 0.0, 0
            for _ in range(epochs):
                for xb, yb in batches_:
                    _check(stop)
                    optimizer.zero_grad()
                    out = private(xb)
                    # An empty Poisson batch still takes its (noise-only) step, as accounted.
                    loss = F.cross_entropy(out, yb) if len(yb) else out.sum() * 0.0
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(yb)
                    seen += len(yb)
            return total / max(1, seen)
        finally:
            private._close()


def train_batched(
    model: nn.Module,
    global_flat: FloatArray,
    records: list[tuple[torch.Tensor, torch.Tensor]],
    instances: list[int],
    settings: LocalSettings,
    *,
    seed: int,
    round_: int,
    stop: Stop | None = None,
) -> LocalResult:
    """The same local SGD as `train_sequential`, many instances at once with torch.func.

    Each step takes every instance's next minibatch, padded to the batch size with a mask (an
    instance out of batches gets an all-zero mask: a zero gradient, no change).
    """
    if settings.record_noise is not None:  # Opacus' per-record clipping is done sequentially
        return train_sequential(
            model, global_flat, records, instances, settings, seed=seed, round_=round_, stop=stop
        )
    k = len(records)
    set_flat(model, global_flat)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.dim())) for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    plans = [batches(len(y), settings, seed=seed, round_=round_, instance=i)
             for (_, y), i in zip(records, instances, strict=True)]  # fmt: skip
    steps = max((len(p) for p in plans), default=0)
    bsz = settings.batch_size
    nfeat = records[0][0].shape[1] if k else 0
    # Every instance's records padded into one (k, n_max, features) block.
    n_max = max((len(y) for _, y in records), default=1)
    xs = torch.zeros(k, max(1, n_max), nfeat)
    ys = torch.zeros(k, max(1, n_max), dtype=torch.int64)
    for j, (x, y) in enumerate(records):
        xs[j, : len(y)] = x
        ys[j, : len(y)] = y
    idx = np.zeros((steps, k, bsz), dtype=np.int64)
    mask = np.zeros((steps, k, bsz), dtype=np.float32)
    for j, plan in enumerate(plans):
        for s, b in enumerate(plan):
            idx[s, j, : len(b)] = b
            mask[s, j, : len(b)] = 1.0
    idx_t, mask_t = torch.from_numpy(idx), torch.from_numpy(mask)
    rows = torch.arange(k).unsqueeze(1)

    def loss_fn(
        p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor, mb: torch.Tensor
    ) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xb,))
        per = F.cross_entropy(out, yb, reduction="none")
        return (per * mb).sum() / mb.sum().clamp(min=1.0)

    # One forward pass per step gives both the gradient and the loss (the latter for the metric).
    step = vmap(grad_and_value(loss_fn), in_dims=(0, 0, 0, 0))
    tail_from = np.array(
        [len(p) - _last_epoch_steps(len(y), settings) for p, (_, y) in zip(plans, records, strict=True)]
    )
    loss_sum = torch.zeros(k)
    for s in range(steps):
        _check(stop)
        xb = xs[rows, idx_t[s]]
        yb = ys[rows, idx_t[s]]
        mb = mask_t[s]
        in_tail = torch.from_numpy((s >= tail_from).astype(np.float32))
        g, loss = step(params, xb, yb, mb)
        with torch.no_grad():
            loss_sum += loss * mb.sum(1) * in_tail
        params = {n: params[n] - settings.lr * g[n] for n in names}
    with torch.no_grad():
        flat = torch.cat([params[n].reshape(k, -1) for n in names], dim=1).to(torch.float64).numpy()
    updates = flat - global_flat[None, :]
    examples = np.array([len(y) for _, y in records], dtype=np.int64)
    losses = loss_sum.double().numpy() / np.maximum(1, examples)
    return LocalResult(clip_rows(updates, settings.clip), examples, losses)
