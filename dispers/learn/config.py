"""A training experiment: a TOML file or keyword-only dataclasses, validated with errors naming the key.

```toml
[experiment]                  # name, seed, engine = "simulation" | "local" | "grpc"
                              # (local: every actor in process; grpc: each a gRPC service, mTLS)
                              # simulation: shards (default one per core from 10,000 instances),
                              # backend = "local" | "ray", address (an existing Ray cluster)
[data]                        # dataset = "digits" | "health", instances, split, alpha
[model]                       # name = "logreg" | "mlp" | "cnn"
[training]                    # rounds, cohort, local_epochs, batch_size, lr, weighting, clip, batched
[server]                      # optimizer = "fedavg" | "fedavgm" | "fedadam", lr, momentum
[privacy]                     # user_level, noise_multiplier, delta, accountant, budget_epsilon, record_noise
[evaluation]                  # federated, every, max_examples, noise_multiplier
```
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dispers.core.errors import DispersError, ErrorCode
from dispers.learn.accounting import ACCOUNTANTS
from dispers.learn.data import DATASETS
from dispers.learn.models import MODELS
from dispers.learn.server import OPTIMIZERS

ENGINES = ("simulation", "local", "grpc", "cluster")
SHARD_BACKENDS = ("local", "ray")
EXPERIMENT_KEYS = ("address", "backend", "cluster", "engine", "name", "querier", "seed", "shards")
WEIGHTINGS = ("examples", "uniform")
CLOCKS = ("simulated", "real")


def _bad(key: str, message: str) -> DispersError:
    return DispersError(ErrorCode.CONFIG, f"experiment: {key} {message}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which dataset, over how many instances, split how."""

    dataset: str = "digits"
    instances: int = 100
    split: str = "iid"  # or "dirichlet"
    alpha: float = 0.5


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Rounds, cohort and what each instance does locally."""

    rounds: int = 50
    cohort: int = 10
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 0.1
    weighting: str = "examples"
    clip: float | None = None
    batched: bool = True  # torch.func over the cohort (simulation engine)
    # When every host answers a round (it stops training by then): None is the cluster's
    # round_time_s, or for the clusters `dispers train` builds itself, timed from the data.
    round_time_s: float | None = None
    # Engine "local" only: "simulated" (default there) sends each host's answer as soon as its
    # training is done and counts the round as lasting round_time_s; "real" waits it out, as
    # the gRPC services and running clusters always do. Training is cut on the real clock either way.
    clock: str | None = None


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """The server optimizer applied to each round's average update."""

    optimizer: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """User-level DP-FedAvg (noise at the root DA) and record-level DP-SGD (inside each instance)."""

    user_level: bool = False
    noise_multiplier: float = 1.0
    delta: float = 1e-6
    accountant: str = "rdp"
    budget_epsilon: float = 10.0  # the querier's total (simulation engine; clusters set their own)
    record_noise: float | None = None
    record_clip: float = 1.0


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig:
    """Federated evaluation: every `every` rounds, the cohort's instances score the global model
    on their own first `max_examples` records, through the same actors as a training round."""

    federated: bool = False
    every: int = 1
    max_examples: int = 64  # bounds one person's influence on the sums (and the DP noise)
    noise_multiplier: float = 1.0  # under user-level DP: Gaussian noise per unit of that bound


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything a training run needs; `load_experiment` reads it from TOML."""

    name: str = "experiment"
    seed: int = 0
    engine: str = "simulation"
    cluster: str | None = None  # engine "cluster": the running cluster's cluster.toml
    querier: str | None = None  # engine "cluster": which querier of its roster (default: the first)
    # engine "simulation": worker shards (None: one per core from 10,000 instances, else 1)
    shards: int | None = None
    backend: str = "local"  # engine "simulation": where shards run, "local" processes or "ray" actors
    address: str | None = None  # backend "ray": an existing Ray cluster (default: start a local one)
    model: str = "mlp"
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        d, t, s, p = self.data, self.training, self.server, self.privacy
        _choice("experiment.engine", self.engine, ENGINES)
        _choice("experiment.backend", self.backend, SHARD_BACKENDS)
        _choice("model.name", self.model, tuple(MODELS))
        _choice("data.dataset", d.dataset, DATASETS)
        _choice("data.split", d.split, ("iid", "dirichlet"))
        _choice("training.weighting", t.weighting, WEIGHTINGS)
        _choice("server.optimizer", s.optimizer, OPTIMIZERS)
        _choice("privacy.accountant", p.accountant, ACCOUNTANTS)
        _int("data.instances", d.instances, 1)
        _int("training.rounds", t.rounds, 1)
        _int("training.cohort", t.cohort, 1)
        _int("training.local_epochs", t.local_epochs, 1)
        _int("training.batch_size", t.batch_size, 1)
        _pos("data.alpha", d.alpha)
        _pos("training.lr", t.lr)
        _pos("server.lr", s.lr)
        if t.cohort > d.instances:
            raise _bad("training.cohort", "must be at most data.instances")
        if t.clip is not None:
            _pos("training.clip", t.clip)
        if t.round_time_s is not None:
            _pos("training.round_time_s", t.round_time_s)
        if t.clock is not None:
            _choice("training.clock", t.clock, CLOCKS)
            if t.clock == "simulated" and self.engine != "local":
                raise _bad(
                    "training.clock",
                    f"'simulated' is for engine 'local' (engine {self.engine!r} "
                    "waits out each round time for real)",
                )
        if not 0 <= s.momentum < 1:
            raise _bad("server.momentum", "must be in [0, 1)")
        if p.user_level:
            _pos("privacy.noise_multiplier", p.noise_multiplier)
            _pos("privacy.budget_epsilon", p.budget_epsilon)
            if not 0 < p.delta < 1:
                raise _bad("privacy.delta", "must be in (0, 1)")
            if t.clip is None:
                raise _bad("training.clip", "must be set under user-level DP (it bounds one person's update)")
            if t.weighting != "uniform":
                raise _bad("training.weighting", "must be 'uniform' under user-level DP")
        if self.shards is not None:
            _int("experiment.shards", self.shards, 1)
            if self.shards > d.instances:
                raise _bad("experiment.shards", f"must be at most data.instances ({d.instances})")
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise _bad("experiment.address", "must be a Ray cluster's address (a non-empty string)")
        if self.address is not None and self.backend != "ray":
            raise _bad("experiment.address", "is for backend 'ray' (a running Ray cluster)")
        if self.engine == "cluster" and not self.cluster:
            raise _bad(
                "experiment.cluster", "must name the running cluster's cluster.toml for engine 'cluster'"
            )
        if p.record_noise is not None:
            _pos("privacy.record_noise", p.record_noise)
            _pos("privacy.record_clip", p.record_clip)
        e = self.evaluation
        if not isinstance(e.federated, bool):
            raise _bad("evaluation.federated", "must be true or false")
        _int("evaluation.every", e.every, 1)
        _int("evaluation.max_examples", e.max_examples, 1)
        _pos("evaluation.noise_multiplier", e.noise_multiplier)


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _bad(key, f"must be one of {', '.join(allowed)} (got {value!r})")


def _int(key: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise _bad(key, f"must be an integer >= {low}")


def _pos(key: str, value: object) -> None:
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise _bad(key, "must be a positive number")


def _section(cls: type[Any], table: object, name: str) -> Any:
    if table is None:
        return cls()
    if not isinstance(table, dict):
        raise _bad(f"[{name}]", "must be a table")
    known = {f.name for f in fields(cls)}
    for key in table:
        if key not in known:
            raise _bad(f"{name}.{key}", f"is not a known key (known: {', '.join(sorted(known))})")
    kwargs = dict(table)
    for f in fields(cls):
        if f.name in kwargs and f.type in ("float", "float | None") and isinstance(kwargs[f.name], int):
            kwargs[f.name] = float(kwargs[f.name])
    return cls(**kwargs)


def parse_experiment(data: dict[str, Any]) -> ExperimentConfig:
    """Validate a parsed TOML document."""
    known = {"experiment", "data", "model", "training", "server", "privacy", "evaluation"}
    for key in data:
        if key not in known:
            raise _bad(f"[{key}]", f"is not a known section (known: {', '.join(sorted(known))})")
    exp = data.get("experiment", {})
    model = data.get("model", {})
    if not isinstance(exp, dict) or not isinstance(model, dict):
        raise _bad("[experiment] / [model]", "must be tables")
    for key in exp:
        if key not in EXPERIMENT_KEYS:
            raise _bad(f"experiment.{key}", f"is not a known key (known: {', '.join(EXPERIMENT_KEYS)})")
    for key in model:
        if key != "name":
            raise _bad(f"model.{key}", "is not a known key (known: name)")
    seed = exp.get("seed", 0)
    _int("experiment.seed", seed, 0)
    try:
        return ExperimentConfig(
            name=str(exp.get("name", "experiment")),
            seed=seed,
            engine=exp.get("engine", "simulation"),
            cluster=exp.get("cluster"),
            querier=exp.get("querier"),
            shards=exp.get("shards"),
            backend=exp.get("backend", "local"),
            address=exp.get("address"),
            model=model.get("name", "mlp"),
            data=_section(DataConfig, data.get("data"), "data"),
            training=_section(TrainingConfig, data.get("training"), "training"),
            server=_section(ServerConfig, data.get("server"), "server"),
            privacy=_section(PrivacyConfig, data.get("privacy"), "privacy"),
            evaluation=_section(EvaluationConfig, data.get("evaluation"), "evaluation"),
        )
    except TypeError as exc:  # a wrong type the checks above did not name
        raise _bad("file", f"has a value of the wrong type ({exc})") from None


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise _bad("file", f"{p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise _bad("file", f"{p} is not valid TOML: {exc}") from None
    return parse_experiment(data)
