"""Training shards of the simulation engine: a run of instances, one model object, a partial sum.

A shard holds the records of a contiguous run of instances — generated inside the shard from
the experiment's seed (the same function the driver calls, checked against the driver's digest),
or shipped by the driver only when the driver was handed data the config does not describe —
and one model object. Each round the driver sends it the global weights and its cohort members;
it trains them (with `torch.func` in chunks of a fixed width, or one after another on the one
model), clips and weights each update, and returns a `ShardPartial`: the exact sum of its
weighted clipped updates, their total weight, its declines and its loss sums. Nothing per
instance leaves a shard, as nothing per instance leaves a leaf DA.

The model must not depend on the number of shards, so nothing a shard computes depends on which
other instances share it: an instance's batches come from (seed, round, instance) (see
`dispers.learn.local`); torch trains on one thread (its kernels' float rounding changes with the
thread count); the batched path always runs `vmap` over exactly `chunk_width(cohort)` instances,
padding with empty ones (a kernel's rounding changes with the batch's shape, never with what
else is in the batch); and the partial sums are exact (`dispers.learn.fixedsum`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from dispers.core.errors import DispersError, ErrorCode
from dispers.learn import data as datasets
from dispers.learn.config import ExperimentConfig
from dispers.learn.fixedsum import FixedSum
from dispers.learn.local import LocalResult, LocalSettings, train_batched, train_sequential
from dispers.learn.models import ModelShape, build_model, n_params

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
MAX_CHUNK = 256  # instances per vmap call at most
TORCH_THREADS = 1  # the same float rounding in every shard, and one shard per core


def local_settings(config: ExperimentConfig) -> LocalSettings:
    """What each instance is told to do locally."""
    t, p = config.training, config.privacy
    return LocalSettings(
        epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, clip=t.clip,
        record_noise=p.record_noise, record_clip=p.record_clip,
    )  # fmt: skip


def chunk_width(cohort: int) -> int:
    """Instances per `vmap` call: the power of two covering the expected cohort, at most 256.

    A function of the config only (never of the number of shards), so every instance is
    trained by a call of the same shape whatever the sharding.
    """
    return min(MAX_CHUNK, 1 << max(0, math.ceil(math.log2(max(1, cohort)))))


def assign_instances(n_instances: int, shards: int) -> list[range]:
    """Contiguous runs of instances, one per shard, as even as can be."""
    if not 1 <= shards <= n_instances:
        raise DispersError(
            ErrorCode.CONFIG, f"experiment.shards must be 1 to {n_instances} (the instances), got {shards}"
        )
    return [range(s * n_instances // shards, (s + 1) * n_instances // shards) for s in range(shards)]


Records = tuple[torch.Tensor, torch.Tensor, IntArray]  # x, y, offsets (from 0) of a run of instances


def shard_records(data: datasets.FederatedData, run: range, *, copy: bool = True) -> Records:
    """The records of instances `run` of `data`, with offsets starting at 0.

    A copy by default: a view would keep (and pickle) the whole dataset's storage.
    """
    a, b = int(data.offsets[run.start]), int(data.offsets[run.stop])
    offsets = (data.offsets[run.start : run.stop + 1] - a).astype(np.int64)
    x, y = data.x[a:b], data.y[a:b]
    return (x.clone(), y.clone(), offsets) if copy else (x, y, offsets)


def records_digest(records: Records) -> str:
    """A digest of a run of instances' records (the driver's and a shard's must agree)."""
    x, y, offsets = records
    h = hashlib.blake2b(digest_size=16)
    for part in (x.numpy(), y.numpy(), offsets):
        h.update(np.ascontiguousarray(part).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TrainShardSpec:
    """What a shard is built from: the experiment, its instances, and their records' digest."""

    config: ExperimentConfig
    run: range  # the instances this shard holds
    digest: str  # of their records, as the driver holds them
    n_features: int
    n_classes: int
    records: Records | None = None  # shipped only when the config does not describe the data


@dataclass
class ShardPartial:
    """A shard's share of a round: exact sums over its cohort members, nothing per instance."""

    updates: FixedSum  # sum of weighted clipped updates
    weight: float  # sum of weights (records, or 1 each): integers, so exact in float64
    count: int  # updates summed
    declines: int  # cohort members without records
    loss: FixedSum  # one value: sum over contributors of mean local loss times records
    examples: int  # records of the contributors (the loss's denominator)

    @classmethod
    def empty(cls, n_params: int) -> ShardPartial:
        """Nothing yet."""
        return cls(FixedSum.empty(n_params), 0.0, 0, 0, FixedSum.empty(1), 0)

    def merge(self, other: ShardPartial) -> None:
        """Add another shard's partial of the same round (exact, in any order)."""
        self.updates.merge(other.updates)
        self.weight += other.weight
        self.count += other.count
        self.declines += other.declines
        self.loss.merge(other.loss)
        self.examples += other.examples


class TrainShard:
    """One shard: its instances' records and one model object; trains its cohort members."""

    def __init__(self, spec: TrainShardSpec) -> None:
        self._spec = spec
        self._records: Records | None = None
        self._model: torch.nn.Module | None = None

    def load(self) -> int:
        """Generate (or take) the shard's records, check them, build the model; its size."""
        spec, cfg = self._spec, self._spec.config
        if spec.records is not None:
            records = spec.records
        else:
            full = datasets.load(
                cfg.data.dataset, n_instances=cfg.data.instances, split=cfg.data.split,
                alpha=cfg.data.alpha, seed=cfg.seed,
            )  # fmt: skip
            records = shard_records(full, spec.run)
            del full
        if records_digest(records) != spec.digest:
            raise DispersError(
                ErrorCode.INTERNAL,
                f"shard of instances {spec.run.start}-{spec.run.stop - 1} generated other records "
                "than the driver's",
            )
        self._records = records
        self._model = build_model(cfg.model, ModelShape(spec.n_features, spec.n_classes), seed=cfg.seed)
        return len(spec.run)

    def train(self, round_: int, weights: FloatArray, members: Sequence[int]) -> ShardPartial:
        """Train cohort members `members` (global instance numbers, in this shard) from `weights`."""
        if self._records is None or self._model is None:
            raise DispersError(ErrorCode.INTERNAL, "a training shard was called before load")
        cfg, run = self._spec.config, self._spec.run
        x, y, offsets = self._records
        out = ShardPartial.empty(n_params(self._model))
        active: list[int] = []
        for i in sorted(int(m) for m in members):
            if i not in run:
                raise DispersError(ErrorCode.INTERNAL, f"instance {i} is not in this shard")
            k = i - run.start
            if offsets[k + 1] > offsets[k]:
                active.append(i)
            else:
                out.declines += 1
        if not active:
            return out
        records = []
        for i in active:
            a, b = int(offsets[i - run.start]), int(offsets[i - run.start + 1])
            records.append((x[a:b], y[a:b]))
        result = self._train(round_, weights, records, active)
        w = (
            result.examples.astype(np.float64)
            if cfg.training.weighting == "examples"
            else np.ones(len(active))
        )
        out.updates.add(result.updates * w[:, None])
        out.weight = float(w.sum())
        out.count = len(active)
        out.loss.add((result.losses * result.examples)[:, None])
        out.examples = int(result.examples.sum())
        return out

    def _train(
        self,
        round_: int,
        weights: FloatArray,
        records: list[tuple[torch.Tensor, torch.Tensor]],
        active: list[int],
    ) -> LocalResult:
        cfg = self._spec.config
        assert self._model is not None
        settings = local_settings(cfg)
        threads = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        try:
            if not cfg.training.batched or settings.record_noise is not None:
                return train_sequential(
                    self._model, weights, records, active, settings, seed=cfg.seed, round_=round_
                )
            width = chunk_width(cfg.training.cohort)
            empty = (torch.zeros(0, records[0][0].shape[1]), torch.zeros(0, dtype=torch.int64))
            # Instances of similar sizes share a chunk, so few run steps on an all-zero mask;
            # the results come back in the order of `active`.
            order = sorted(range(len(active)), key=lambda k: (len(records[k][1]), active[k]))
            parts: list[LocalResult] = []
            for c in range(0, len(active), width):
                ids = [active[k] for k in order[c : c + width]]
                recs = [records[k] for k in order[c : c + width]]
                pad = width - len(ids)
                got = train_batched(
                    self._model, weights, recs + [empty] * pad, ids + [0] * pad, settings,
                    seed=cfg.seed, round_=round_,
                )  # fmt: skip
                parts.append(
                    LocalResult(got.updates[: len(ids)], got.examples[: len(ids)], got.losses[: len(ids)])
                )
            back = np.argsort(order)
            return LocalResult(
                np.concatenate([p.updates for p in parts])[back],
                np.concatenate([p.examples for p in parts])[back],
                np.concatenate([p.losses for p in parts])[back],
            )
        finally:
            torch.set_num_threads(threads)
