"""Datasets that need no download, split over instances as columns (never an object per instance).

- ``digits``: scikit-learn's 8x8 digits (1,797 images shipped inside the package), 20 % held
  out as the Querier's test set, the rest split over instances IID or non-IID (per class,
  Dirichlet(alpha) proportions over instances, as in Hsu et al. 2019).
- ``health``: a synthetic high-risk label generated per instance from its own measurements
  (`dispers.simulation.population`): each heart-rate measurement is one record with the owner's
  bpm that day, age, usual steps and sex; the label is drawn from a known logistic model of
  those, so the best achievable accuracy is known.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch

from dispers.core.errors import DispersError, ErrorCode

if TYPE_CHECKING:
    from dispers.state.documents import DocumentStore

DATASETS = ("digits", "health")
DIGITS_SHAPE = (64, 10)  # features (8x8 pixels in [0, 1]) and classes of the digits dataset
HEALTH_AS_OF = date(2026, 11, 1)
# The known model behind the health labels: logit = sum(coef * standardized feature) + intercept.
HEALTH_COEF = {"bpm": 1.1, "age": 0.9, "steps": -0.7, "female": -0.3}
HEALTH_INTERCEPT = -0.8


@dataclass(frozen=True)
class FederatedData:
    """Every instance's records in one array: instance i holds rows offsets[i]:offsets[i+1]."""

    x: torch.Tensor  # (n_records, n_features) float32
    y: torch.Tensor  # (n_records,) int64
    offsets: npt.NDArray[np.int64]  # (n_instances + 1,)
    x_test: torch.Tensor  # the Querier's held-out set
    y_test: torch.Tensor
    n_classes: int

    @property
    def n_instances(self) -> int:
        """How many instances hold records."""
        return len(self.offsets) - 1

    @property
    def n_features(self) -> int:
        """Features per record."""
        return int(self.x.shape[1])

    def sizes(self) -> npt.NDArray[np.int64]:
        """Records per instance."""
        return np.diff(self.offsets)

    def records(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Instance i's own records."""
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.x[a:b], self.y[a:b]


def _grouped(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], owner: npt.NDArray[np.int64], n: int
) -> tuple[torch.Tensor, torch.Tensor, npt.NDArray[np.int64]]:
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(x[order])), torch.from_numpy(y[order]), offsets


def dirichlet_owners(
    y: npt.NDArray[np.int64], n_instances: int, alpha: float, rng: np.random.Generator, min_records: int = 2
) -> npt.NDArray[np.int64]:
    """Assign each record to an instance: per class, Dirichlet(alpha) shares over the instances
    (redrawn until every instance holds at least `min_records`)."""
    if min_records * n_instances > len(y):
        raise DispersError(ErrorCode.CONFIG, "too many instances for the records of this dataset")
    for _ in range(1000):
        owner = np.empty(len(y), dtype=np.int64)
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(n_instances, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(np.int64)
            for i, part in enumerate(np.split(idx, cuts)):
                owner[part] = i
        if np.bincount(owner, minlength=n_instances).min() >= min_records:
            return owner
    raise DispersError(ErrorCode.CONFIG, f"could not split the records non-IID with alpha={alpha}")


def digits(*, n_instances: int, split: str = "iid", alpha: float = 0.5, seed: int = 0) -> FederatedData:
    """scikit-learn's digits over `n_instances` instances, 20 % held out for the Querier."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    xt, yt = x[train], y[train]
    if split == "iid":
        owner = np.empty(len(yt), dtype=np.int64)
        owner[rng.permutation(len(yt))] = np.arange(len(yt)) % n_instances
        if n_instances > len(yt):
            raise DispersError(ErrorCode.CONFIG, "too many instances for the records of this dataset")
    elif split == "dirichlet":
        owner = dirichlet_owners(yt, n_instances, alpha, rng)
    else:
        raise DispersError(ErrorCode.CONFIG, f"unknown split {split!r} (iid or dirichlet)")
    gx, gy, offsets = _grouped(xt, yt, owner, n_instances)
    return FederatedData(gx, gy, offsets, torch.from_numpy(x[test]), torch.from_numpy(y[test]), 10)


def health_features(
    bpm: npt.NDArray[np.float64],
    age: npt.NDArray[np.float64],
    steps: npt.NDArray[np.float64],
    female: npt.NDArray[np.bool_],
) -> npt.NDArray[np.float32]:
    """Standardized features of health records (fixed public centres and scales)."""
    return np.stack(
        [(bpm - 72.0) / 10.0, (age - 50.0) / 25.0, (steps - 7000.0) / 3000.0, female.astype(np.float64)],
        axis=1,
    ).astype(np.float32)


def health(*, n_instances: int, seed: int = 0, test_instances: int | None = None) -> FederatedData:
    """The synthetic high-risk task: records from each instance's own measurements.

    The Querier's test set is drawn the same way from other people (its own cohort study).
    """
    from dispers.simulation.population import PopulationSpec, generate

    n_test = test_instances or max(200, n_instances // 10)
    pop = generate(PopulationSpec(n_instances=n_instances + n_test, seed=seed, history_days=90))
    ages = pop.ages_at(HEALTH_AS_OF).astype(np.float64)
    steps_level = np.asarray(pop.levels.get("steps", np.full(pop.n_instances, 7000.0)), dtype=np.float64)
    owner = pop.hr_owner
    feats = health_features(pop.hr_bpm, ages[owner], steps_level[owner], pop.female[owner])
    coef = np.array(list(HEALTH_COEF.values()), dtype=np.float64)
    logit = feats.astype(np.float64) @ coef + HEALTH_INTERCEPT
    rng = np.random.default_rng(seed + 1)
    label = (rng.random(len(logit)) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    train = owner < n_instances
    gx, gy, offsets = _grouped(feats[train], label[train], owner[train], n_instances)
    return FederatedData(gx, gy, offsets, torch.from_numpy(feats[~train]), torch.from_numpy(label[~train]), 2)


def health_from_store(store: DocumentStore, ids: Sequence[str], as_of: date) -> FederatedData:
    """The health task's records of `ids` read from a host's documents (no test set).

    A record per heart-rate measurement of the last 90 days, with the owner's age on `as_of`,
    mean daily steps over the window (7,000 where none) and sex; its high-risk label stands for
    a recorded outcome: drawn from the known model, by a uniform keyed on the instance and the
    day, so the same documents give the same labels on every host and in every round.
    """
    import hashlib

    from dispers.state.documents import epoch_day

    end = epoch_day(as_of)
    start = end - 90
    birth, female, _ = store.identity(list(ids))
    pos, day, bpm = store.read_measurements("heart_rate", list(ids), start, end)
    count, total = store.measurement_totals("steps", list(ids), start, end)
    steps = np.where(count > 0, total / np.maximum(count, 1), 7000.0)
    age = (end - birth) / 365.2425
    feats = health_features(bpm, age[pos], steps[pos], female[pos])
    logit = feats.astype(np.float64) @ np.array(list(HEALTH_COEF.values())) + HEALTH_INTERCEPT
    u = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{ids[p]}/{d}".encode(), digest_size=8).digest(), "big") / 2.0**64
            for p, d in zip(pos.tolist(), day.tolist(), strict=True)
        ]
    )
    label = (u < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    gx, gy, offsets = _grouped(feats, label, pos, len(ids))
    empty = torch.zeros(0, 4)
    return FederatedData(gx, gy, offsets, empty, torch.zeros(0, dtype=torch.int64), 2)


def digits_from_store(store: DocumentStore, ids: Sequence[str]) -> FederatedData:
    """The digits records of `ids` as a host keeps them (`dispers import --dataset digits`); no
    test set (the Querier holds its own)."""
    n_features, n_classes = DIGITS_SHAPE
    offsets, x, y = store.training_records("digits", list(ids), n_features)
    if len(y) and (y.max() >= n_classes or x.min() < 0 or x.max() > 1):
        raise DispersError(ErrorCode.MALFORMED, "a digits record is out of its range")
    return FederatedData(
        torch.from_numpy(x), torch.from_numpy(y), offsets,
        torch.zeros(0, n_features), torch.zeros(0, dtype=torch.int64), n_classes,
    )  # fmt: skip


def load(
    name: str, *, n_instances: int, split: str = "iid", alpha: float = 0.5, seed: int = 0
) -> FederatedData:
    """A dataset of the registry by name."""
    if name == "digits":
        return digits(n_instances=n_instances, split=split, alpha=alpha, seed=seed)
    if name == "health":
        return health(n_instances=n_instances, seed=seed)
    raise DispersError(ErrorCode.CONFIG, f"unknown dataset {name!r} ({', '.join(DATASETS)})")
