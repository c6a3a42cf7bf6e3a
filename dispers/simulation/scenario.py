"""A simulation scenario: a query spec (TOML) plus optional [simulation] and [faults] tables.

A plain query spec such as ``simulations/heart_rate.toml`` is a scenario with every default.
``[simulation]`` sets the population and the cluster (instances, seed, dp, leaf_aggregators,
k_min, batch_size, host_deadline_s); ``[faults]`` sets the share of instances (or host answers)
that misbehave:

- ``offline``: the instance cannot be reached when the query runs; its host answers a decline
  for it (the item every target owes, of the same length), so T and the DAs learn nothing of
  why, and the result rests on the others;
- ``declining``: the owner declines this query (does not consent) although subscribed;
- ``out_of_bounds``: a malicious instance whose every value of the queried kind is set far
  outside the query's bounds (twice the upper bound, plus one); the DAs drop and count it;
- ``slow``: a share of host answers arrive after T's deadline; T then fails the query
  loudly rather than release a result on the quick ones.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.spec import QuerySpec, parse_query_spec


def _error(message: str) -> DispersError:
    return DispersError(ErrorCode.CONFIG, f"scenario: {message}")


@dataclass(frozen=True)
class Faults:
    """Shares (0 to 1) of instances, or of host answers for ``slow``, that misbehave."""

    offline: float = 0.0
    declining: float = 0.0
    out_of_bounds: float = 0.0
    slow: float = 0.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise _error(f"faults.{f.name} must be a number in [0, 1]")

    @property
    def any(self) -> bool:
        """Whether any fault is switched on."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class Scenario:
    """What `dispers simulate` runs: the population, the cluster and the query."""

    name: str
    spec: QuerySpec
    instances: int = 10_000
    seed: int = 7
    dp: bool = True
    leaf_aggregators: int = 2
    k_min: int = 10
    batch_size: int = 1000
    host_deadline_s: float = 60.0
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        ints = {"instances": 1, "seed": 0, "leaf_aggregators": 1, "k_min": 2, "batch_size": 1}
        for key, least in ints.items():
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise _error(f"simulation.{key} must be an integer >= {least}")
        if not isinstance(self.dp, bool):
            raise _error("simulation.dp must be true or false")
        deadline = self.host_deadline_s
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline <= 0:
            raise _error("simulation.host_deadline_s must be a positive number")

    def with_overrides(self, **changes: Any) -> Scenario:
        """A copy with the given fields changed (None leaves a field as it is)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_SIM_KEYS = {f.name for f in dataclasses.fields(Scenario)} - {"name", "spec", "faults"}
_FAULT_KEYS = {f.name for f in dataclasses.fields(Faults)}


def parse_scenario(data: dict[str, Any], name: str = "scenario") -> Scenario:
    """Validate a scenario mapping (a query spec plus [simulation] and [faults]); errors name the key."""
    data = dict(data)
    sim = data.pop("simulation", {})
    faults = data.pop("faults", {})
    for table, raw, keys in (("simulation", sim, _SIM_KEYS), ("faults", faults, _FAULT_KEYS)):
        if not isinstance(raw, dict):
            raise _error(f"[{table}] must be a table")
        unknown = sorted(set(raw) - keys)
        if unknown:
            raise _error(f"unknown key {table}.{unknown[0]}")
    spec = parse_query_spec(data)
    return Scenario(name=name, spec=spec, faults=Faults(**faults), **sim)


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML file (a query spec file is one, with every default)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise _error(f"no file {p}") from None
    except OSError as exc:
        raise _error(f"cannot read {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise _error(f"{p} is not valid TOML: {exc}") from None
    return parse_scenario(data, name=p.stem)
