"""Test worlds: a generated cluster, a seeded population with canaries, over either transport."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import ClusterConfig
from dispers.core.spec import QuerySpec, parse_query_spec
from dispers.crypto.keyfiles import read_key_file
from dispers.crypto.keys import ActorKeys
from dispers.simulation.population import Population, PopulationSpec, concat, generate
from dispers.state.documents import DocumentStore, epoch_day

AS_OF = dt.date(2026, 11, 1)


@dataclass(frozen=True)
class Canaries:
    """Unique strings planted as a concept, as addresses and as a data value."""

    concept: str
    ids: tuple[str, ...]
    value: float
    host: str = "pc-1"

    @classmethod
    def fresh(cls, n: int = 12) -> Canaries:
        tag = secrets.token_hex(4)
        # A dyadic value: the mean of equal measurements is exactly it, so its text is stable.
        value = 137.0 + secrets.randbelow(31) / 32 + 1 / 64
        return cls(
            concept=f"cohort:canary-concept-{tag}",
            ids=tuple(f"canary-addr-{tag}-{i:02d}" for i in range(n)),
            value=value,
        )

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(f"{self.host}/{i}" for i in self.ids)

    @property
    def value_text(self) -> str:
        return repr(self.value)

    def population(self) -> Population:
        """Aged 30 on AS_OF, consenting, ten measurements each in the last 30 days, all `value`."""
        n = len(self.ids)
        birth = epoch_day(AS_OF) - int(30.5 * 365.25)
        owner = np.repeat(np.arange(n), 10)
        return Population(
            instance_ids=list(self.ids),
            birth_days=np.full(n, birth, dtype=np.int64),
            female=np.ones(n, dtype=bool),
            consent=np.ones(n, dtype=bool),
            hr_owner=owner.astype(np.int64),
            hr_day=(epoch_day(AS_OF) - (owner % 10) * 2).astype(np.int64),
            hr_bpm=np.full(len(owner), self.value),
        )


def heart_rate_spec(**overrides: Any) -> QuerySpec:
    """The demo's query: mean heart rate over 30 days per age bracket."""
    data: dict[str, Any] = {
        "query": {"target": "age:12-25 OR age:25-50 OR age:50-100", "k": 10},
        "data": {
            "function": "mean_heart_rate",
            "as_of": AS_OF.isoformat(),
            "params": {"window_days": 30},
            "group_by": {"field": "age", "edges": [12, 25, 50, 100]},
        },
        "aggregate": {
            "bounds": [30, 220],
            "stats": ["count", "sum", "mean", "var", "std", "min", "max"],
        },
        "privacy": {},
    }
    for key, value in overrides.items():
        table, _, name = key.partition("__")
        if name:
            data[table][name] = value
        else:  # a whole table, such as plan={...}
            data[table] = value
    return parse_query_spec(data)


@dataclass
class Setup:
    """Files of a cluster and the population written into its host."""

    directory: Path
    config: ClusterConfig
    population: Population
    canaries: Canaries | None

    def keys(self, name: str) -> ActorKeys:
        key_file = self.config.local_for(name).key_file
        assert key_file is not None
        return read_key_file(key_file)


def make_setup(
    directory: Path,
    *,
    n: int = 400,
    seed: int = 11,
    canaries: Canaries | None = None,
    k_min: int = 5,
    backend: str = "sqlite",
    outlier_bpm: float | None = None,
    dp: bool = False,
    aggregators: int = 2,
) -> Setup:
    """Write keys, cluster.toml and a host store holding a seeded population (plus canaries).

    DP is off by default here, so that results can be compared with the ground truth exactly;
    tests of the noise turn it on.
    """
    config = write_cluster(
        directory,
        ClusterLayout(
            k_min=k_min, backend=backend, host_as_of=AS_OF, batch_size=128,
            cohorts=(canaries.concept,) if canaries is not None else (), dp=dp,
            leaf_aggregators=aggregators,
        ),
    )  # fmt: skip
    pop = generate(PopulationSpec(n_instances=n, seed=seed, as_of=AS_OF))
    if canaries is not None:
        pop = concat(pop, canaries.population())
    if outlier_bpm is not None:
        # One 40-year-old whose every measurement is outside the query's bounds.
        outlier = Population(
            instance_ids=["outlier-0"],
            birth_days=np.array([epoch_day(AS_OF) - int(40.5 * 365.25)], dtype=np.int64),
            female=np.array([False]),
            consent=np.array([True]),
            hr_owner=np.zeros(3, dtype=np.int64),
            hr_day=np.array([epoch_day(AS_OF) - d for d in (1, 5, 9)], dtype=np.int64),
            hr_bpm=np.full(3, outlier_bpm),
        )
        pop = concat(pop, outlier)
    documents = config.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        pop.write(store)
        if canaries is not None:
            store.declare_concepts(list(canaries.ids), [canaries.concept] * len(canaries.ids))
    return Setup(directory, config, pop, canaries)
