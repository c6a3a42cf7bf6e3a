"""What a researcher asks (QuerySpec) and the plaintexts it becomes: data request, aggregate spec, result."""

from __future__ import annotations

import datetime as dt
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispers.core.codec import field as get_field
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.expression import compile_named
from dispers.core.ids import check_query_id
from dispers.core.vocabulary import CATEGORY_CODES
from dispers.core.wire import ContributionLayout

STATS = (
    "count", "sum", "mean", "var", "std", "min", "max", "histogram", "median", "quantiles",
    "cov", "corr", "ols",
)  # fmt: skip
FIELD_STATS = ("sum", "mean", "var", "std", "min", "max")
"""Statistics of each field of a contribution (with several fields, released as name.stat)."""
HISTOGRAM_STATS = ("histogram", "median", "quantiles")
"""Statistics read off a histogram of declared bins (quantiles to the resolution of a bin),
of the first field."""
PAIR_STATS = ("cov", "corr")
"""Statistics of every pair of fields, released as cov(a,b) and corr(a,b)."""
MULTI_STATS = (*PAIR_STATS, "ols")
"""Statistics that need at least two fields."""
MAX_QUANTILES = 16
MAX_LABEL = 101
"""Longest group label: two bucket labels of two 24-character floats each, joined by ' & '."""
MAX_FIELD_NAME = 32
"""Longest field name: results must fit their fixed frame whatever the spec names."""
DEFAULT_FIELD = "value"
"""The name of the one field of a single-function query."""
MAX_BOUND = 1e15
MAX_BOUND_RATIO = 1e6
"""|bound| / (upper - lower) at most this: float rounding of sums stays far under the noise."""
"""Largest |bound| a query may declare: squares and sums of a million values stay finite."""


def _spec_error(message: str) -> DispersError:
    return malformed(f"query spec: {message}")


@dataclass(frozen=True)
class GroupBy:
    """Group contributions by a bucketed field the instance computes locally: numeric edges, or
    categories of a categorical field (sex: F, M); optionally `then` a second field, the groups
    being every pair (first-level index * second-level count + second-level index)."""

    field: str
    edges: tuple[float, ...]
    categories: tuple[str, ...] = ()
    then: GroupBy | None = None

    @classmethod
    def of_categories(cls, field: str, categories: tuple[str, ...], then: GroupBy | None = None) -> GroupBy:
        """Groups by the named categories of a categorical field (their codes must follow on)."""
        codes = CATEGORY_CODES.get(field)
        if codes is None:
            known = ", ".join(sorted(CATEGORY_CODES))
            raise malformed(f"group_by.categories: {field!r} is not a categorical field (those are: {known})")
        unknown = [c for c in categories if c not in codes]
        if unknown or not categories or len(set(categories)) != len(categories):
            raise malformed(
                f"group_by.categories must name distinct categories of {field}: {', '.join(codes)}"
            )
        ordered = tuple(sorted(categories, key=lambda c: codes[c]))
        first = codes[ordered[0]]
        if [codes[c] for c in ordered] != list(range(first, first + len(ordered))):
            raise malformed("group_by.categories must be a run of consecutive categories")
        edges = tuple(float(x) for x in range(first, first + len(ordered) + 1))
        return cls(field, edges, ordered, then)

    def __post_init__(self) -> None:
        if not isinstance(self.field, str) or not self.field.isidentifier():
            raise malformed("group_by.field must be an identifier")
        if len(self.edges) < 2 or any(not isinstance(e, int | float) for e in self.edges):
            raise malformed("group_by.edges must be at least two numbers")
        if any(not math.isfinite(e) for e in self.edges) or any(
            b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)
        ):
            raise malformed("group_by.edges must be finite and strictly increasing")
        if any(abs(e) > MAX_BOUND for e in self.edges):
            raise malformed(f"group_by.edges must lie within ±{MAX_BOUND:g}")
        if self.categories and len(self.categories) != len(self.edges) - 1:
            raise malformed("group_by.categories must label every bucket")
        if self.then is not None and self.then.then is not None:
            raise malformed("group_by groups by at most two fields")

    @property
    def own_labels(self) -> tuple[str, ...]:
        """This level's labels: its categories, or one per bucket such as '12-25'."""
        if self.categories:
            return self.categories
        return tuple(f"{_num(a)}-{_num(b)}" for a, b in zip(self.edges, self.edges[1:], strict=False))

    @property
    def labels(self) -> tuple[str, ...]:
        """One label per group, such as '12-25', or '12-25 & F' with a second field."""
        if self.then is None:
            return self.own_labels
        return tuple(f"{a} & {b}" for a in self.own_labels for b in self.then.own_labels)

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        # Categories stand for their edges (the spec-file form, which parse_query_spec reads back).
        obj: dict[str, Any] = {"field": self.field}
        if self.categories:
            obj["categories"] = list(self.categories)
        else:
            obj["edges"] = list(self.edges)
        if self.then is not None:
            obj["then"] = self.then.to_obj()
        return obj

    @classmethod
    def from_obj(cls, obj: Any, what: str) -> GroupBy | None:
        """Parse the JSON-able form (None stays None)."""
        if obj is None:
            return None
        if not isinstance(obj, dict):
            raise malformed(f"{what}: group_by must be an object")
        then = cls.from_obj(obj.get("then"), what)
        field_name = get_field(obj, "field", str, what)
        if "categories" in obj:
            categories = obj["categories"]
            if not isinstance(categories, list) or any(not isinstance(c, str) for c in categories):
                raise malformed(f"{what}: group_by.categories must be a list of names")
            return cls.of_categories(field_name, tuple(categories), then)
        return cls(field_name, tuple(get_field(obj, "edges", list, what)), (), then)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def check_bounds(bounds: Any, key: str) -> tuple[float, float]:
    """[lower, upper], finite, lower < upper, within ±MAX_BOUND and not too narrow for their
    magnitude; errors name `key`."""
    if (
        not isinstance(bounds, list | tuple)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        or not all(math.isfinite(b) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        raise malformed(f"{key} must be [lower, upper], finite, with lower < upper")
    lo, hi = float(bounds[0]), float(bounds[1])
    if max(abs(lo), abs(hi)) > MAX_BOUND:
        raise malformed(f"{key} must lie within ±{MAX_BOUND:g}")
    if max(abs(lo), abs(hi)) > MAX_BOUND_RATIO * (hi - lo):
        raise malformed(
            f"{key} are too narrow for their magnitude (at most {MAX_BOUND_RATIO:g} times "
            "their width): floating-point rounding would exceed the noise's calibration"
        )
    return lo, hi


@dataclass(frozen=True)
class FieldSpec:
    """One value of each contribution: a registry function of the instance's own documents,
    with the bounds its values must lie in (public, declared by the querier)."""

    name: str
    function: str
    params: Mapping[str, Any] = field(default_factory=dict)
    bounds: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier() or len(self.name) > MAX_FIELD_NAME:
            raise malformed(
                f"data.fields: name {self.name!r} must be an identifier "
                f"of at most {MAX_FIELD_NAME} characters"
            )
        if not isinstance(self.function, str) or not self.function:
            raise malformed(f"data.fields.{self.name}: function is required")
        if not isinstance(self.params, Mapping):
            raise malformed(f"data.fields.{self.name}: params must be a table")
        object.__setattr__(self, "bounds", check_bounds(self.bounds, f"data.fields.{self.name}.bounds"))

    def to_obj(self) -> dict[str, Any]:
        """The spec-file form."""
        return {
            "name": self.name, "function": self.function, "params": dict(self.params),
            "bounds": list(self.bounds),
        }  # fmt: skip


@dataclass(frozen=True)
class Regression:
    """Ordinary least squares of field `y` on fields `x` (with an intercept)."""

    y: str
    x: tuple[str, ...]

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"y": self.y, "x": list(self.x)}

    @classmethod
    def from_obj(cls, obj: Any, key: str) -> Regression | None:
        """Parse (None stays None); errors name `key`."""
        if obj is None:
            return None
        if not isinstance(obj, dict) or set(obj) != {"y", "x"}:
            raise malformed(f"{key} must be a table with y (a field) and x (a list of fields)")
        y, x = obj["y"], obj["x"]
        if not isinstance(y, str) or not isinstance(x, list) or any(not isinstance(n, str) for n in x):
            raise malformed(f"{key} must be a table with y (a field) and x (a list of fields)")
        return cls(y, tuple(x))


RESERVED_NAMES = ("ols", "cov", "corr", "se", "intercept", "r2")
"""Words of the released keys (ols.se.x, cov(a,b) ...) that no field may be named."""


def check_fields(
    names: tuple[str, ...], stats: tuple[str, ...], regression: Regression | None, key: str
) -> None:
    """Field names are distinct and not reserved; multi-field statistics have at least two
    fields; ols comes with a regression over known, distinct fields, and a regression with ols.
    Errors name `key`."""
    if len(set(names)) != len(names):
        raise malformed(f"{key}: field names must be distinct")
    reserved = [n for n in names if n in RESERVED_NAMES]
    if reserved:
        raise malformed(f"{key}: {reserved[0]!r} is reserved (not a field name: {', '.join(RESERVED_NAMES)})")
    multi = [s for s in stats if s in MULTI_STATS]
    if multi and len(names) < 2:
        raise malformed(f"{key}: {', '.join(multi)} need at least two fields (data.fields)")
    if ("ols" in stats) != (regression is not None):
        raise malformed(f"{key}: the ols stat and aggregate.regression go together")
    if regression is not None:
        unknown = [n for n in (regression.y, *regression.x) if n not in names]
        if unknown:
            raise malformed(
                f"{key}: regression names unknown field(s) {', '.join(map(repr, unknown))} "
                f"(the fields are: {', '.join(names)})"
            )
        if not regression.x or regression.y in regression.x or len(set(regression.x)) != len(regression.x):
            raise malformed(f"{key}: regression.x must list distinct fields other than y")


@dataclass(frozen=True)
class DataRequest:
    """What T asks each target instance to compute, signed by Q; names a registry function."""

    query_id: str
    function: str
    params: Mapping[str, Any]
    as_of: dt.date
    group_by: GroupBy | None
    aggregators: tuple[str, ...]  # the leaf DAs an instance may seal to
    issued_at: float  # seconds since the epoch: hosts refuse stale requests
    extra_fields: tuple[tuple[str, Mapping[str, Any]], ...] = ()  # (function, params) after the first

    @property
    def functions(self) -> tuple[tuple[str, Mapping[str, Any]], ...]:
        """(function, params) of every field, in record order."""
        return ((self.function, self.params), *self.extra_fields)

    @property
    def layout(self) -> ContributionLayout:
        """The fixed record every target answers with: one value per field."""
        return ContributionLayout(1 + len(self.extra_fields))

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form (what Q signs)."""
        return {
            "query_id": self.query_id,
            "issued_at": self.issued_at,
            "function": self.function,
            "params": dict(self.params),
            "as_of": self.as_of.isoformat(),
            "group_by": self.group_by.to_obj() if self.group_by else None,
            "aggregators": list(self.aggregators),
            "extra_fields": [{"function": f, "params": dict(p)} for f, p in self.extra_fields],
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> DataRequest:
        """Parse and validate."""
        what = "data request"
        try:
            as_of = dt.date.fromisoformat(get_field(obj, "as_of", str, what))
        except ValueError:
            raise malformed(f"{what}: as_of is not an ISO date") from None
        return cls(
            query_id=check_query_id(get_field(obj, "query_id", str, what)),
            function=get_field(obj, "function", str, what),
            params=get_field(obj, "params", dict, what),
            as_of=as_of,
            group_by=GroupBy.from_obj(obj.get("group_by"), what),
            aggregators=tuple(str(a) for a in get_field(obj, "aggregators", list, what)),
            issued_at=float(get_field(obj, "issued_at", (int, float), what)),
            extra_fields=tuple(
                (get_field(f, "function", str, what), get_field(f, "params", dict, what))
                if isinstance(f, dict)
                else _bad_field(what)
                for f in get_field(obj, "extra_fields", list, what)
            ),
        )


def _bad_field(what: str) -> tuple[str, Mapping[str, Any]]:
    raise malformed(f"{what}: extra_fields must be objects with function and params")


def check_histogram(
    bounds: tuple[float, float],
    stats: tuple[str, ...],
    bins: tuple[float, ...],
    quantiles: tuple[float, ...],
    prefix: str,
) -> None:
    """Bins run from the lower bound to the upper one, strictly increasing; they are needed
    exactly when a histogram, the median or quantiles are asked; quantile levels lie in (0, 1)."""
    wanted = any(s in HISTOGRAM_STATS for s in stats)
    if not wanted:
        if bins or quantiles:
            raise malformed(f"{prefix}bins and quantiles go with the histogram, median or quantiles stats")
        return
    if len(bins) < 2 or any(not isinstance(b, int | float) or not math.isfinite(b) for b in bins):
        raise malformed(f"{prefix}bins must be at least two finite edges (histogram, median, quantiles)")
    if any(b <= a for a, b in zip(bins, bins[1:], strict=False)):
        raise malformed(f"{prefix}bins must be strictly increasing")
    if (bins[0], bins[-1]) != (bounds[0], bounds[1]):
        raise malformed(f"{prefix}bins must start at the lower bound and end at the upper one")
    if "quantiles" in stats:
        if not quantiles or len(quantiles) > MAX_QUANTILES:
            raise malformed(f"{prefix}quantiles must list 1 to {MAX_QUANTILES} levels")
        if any(not 0 < q < 1 for q in quantiles) or list(quantiles) != sorted(set(quantiles)):
            raise malformed(f"{prefix}quantiles must be increasing levels in (0, 1)")
    elif quantiles:
        raise malformed(f"{prefix}quantiles are listed but the quantiles stat is not asked")


def quantile_key(level: float) -> str:
    """The name a quantile is released under, e.g. q0.9."""
    return f"q{level:g}"


@dataclass(frozen=True)
class AggregateSpec:
    """What each DA must compute: bounds to check, stats to release, groups, k."""

    query_id: str
    k: int
    bounds: tuple[float, float]  # of the first field
    stats: tuple[str, ...]
    groups: tuple[str, ...]  # labels; contributions carry an index into this
    n_fields: int = 1  # values per contribution record
    bins: tuple[float, ...] = ()  # histogram edges of the first field, lower bound to upper one
    quantiles: tuple[float, ...] = ()  # levels in (0, 1), read off the histogram
    field_names: tuple[str, ...] = ()  # with several fields: their names, in record order
    field_bounds: tuple[tuple[float, float], ...] = ()  # with several fields: the bounds of each
    regression: Regression | None = None
    clip: bool = False  # values outside the bounds are clipped to them (else dropped)

    @property
    def layout(self) -> ContributionLayout:
        """The fixed record the DAs decode."""
        return ContributionLayout(self.n_fields)

    @property
    def names(self) -> tuple[str, ...]:
        """The name of each field."""
        return self.field_names or (DEFAULT_FIELD,)

    @property
    def all_bounds(self) -> tuple[tuple[float, float], ...]:
        """The bounds of each field."""
        return self.field_bounds or (self.bounds,)

    def __post_init__(self) -> None:
        what = "aggregate spec"
        for i, b in enumerate((self.bounds, *self.field_bounds)):
            check_bounds(b, f"{what}: bounds" + (f" of field {i}" if i else ""))
        bad = [s for s in self.stats if s not in STATS]
        if bad or not self.stats:
            raise malformed(f"{what}: stats must be a non-empty subset of {', '.join(STATS)}")
        if not self.groups:
            raise malformed(f"{what}: at least one group")
        if self.field_names or self.field_bounds or self.n_fields != 1:
            if not (len(self.field_names) == len(self.field_bounds) == self.n_fields >= 2):
                raise malformed(f"{what}: every field has a name and bounds")
            if self.field_bounds[0] != self.bounds:
                raise malformed(f"{what}: bounds are the first field's")
            if any(not n.isidentifier() or len(n) > MAX_FIELD_NAME for n in self.field_names):
                raise malformed(
                    f"{what}: field names must be identifiers of at most {MAX_FIELD_NAME} characters"
                )
        check_fields(self.names, self.stats, self.regression, what)
        check_histogram(self.bounds, self.stats, self.bins, self.quantiles, f"{what}: ")

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "query_id": self.query_id,
            "k": self.k,
            "bounds": list(self.bounds),
            "stats": list(self.stats),
            "groups": list(self.groups),
            "n_fields": self.n_fields,
            "bins": list(self.bins),
            "quantiles": list(self.quantiles),
            "field_names": list(self.field_names),
            "field_bounds": [list(b) for b in self.field_bounds],
            "regression": None if self.regression is None else self.regression.to_obj(),
            "clip": self.clip,
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> AggregateSpec:
        """Parse and validate."""
        what = "aggregate spec"

        def pair(b: Any) -> tuple[float, float]:
            if not isinstance(b, list) or len(b) != 2 or not all(isinstance(x, int | float) for x in b):
                raise malformed(f"{what}: bounds must be two numbers")
            return float(b[0]), float(b[1])

        return cls(
            query_id=check_query_id(get_field(obj, "query_id", str, what)),
            k=get_field(obj, "k", int, what),
            bounds=pair(get_field(obj, "bounds", list, what)),
            stats=tuple(get_field(obj, "stats", list, what)),
            groups=tuple(get_field(obj, "groups", list, what)),
            n_fields=get_field(obj, "n_fields", int, what),
            bins=tuple(float(b) for b in get_field(obj, "bins", list, what)),
            quantiles=tuple(float(q) for q in get_field(obj, "quantiles", list, what)),
            field_names=tuple(str(n) for n in get_field(obj, "field_names", list, what)),
            field_bounds=tuple(pair(b) for b in get_field(obj, "field_bounds", list, what)),
            regression=Regression.from_obj(obj.get("regression"), f"{what}: regression"),
            clip=get_field(obj, "clip", bool, what),
        )


MECHANISMS = ("laplace", "gaussian")


@dataclass(frozen=True)
class Privacy:
    """How private a query's release is: its (epsilon, delta) cost and the noise mechanism.

    Public, like k: the Conductor and every actor may know them. Laplace gives pure
    epsilon-DP (delta must be 0); Gaussian needs 0 < delta < 1.
    """

    epsilon: float = 1.0
    delta: float = 0.0
    mechanism: str = "laplace"

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise malformed(f"privacy.mechanism must be one of {', '.join(MECHANISMS)}")
        e, d = self.epsilon, self.delta
        if isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e) or e <= 0:
            raise malformed("privacy.epsilon must be a positive number")
        if isinstance(d, bool) or not isinstance(d, int | float) or not math.isfinite(d) or not 0 <= d < 1:
            raise malformed("privacy.delta must be a number in [0, 1)")
        if self.mechanism == "gaussian" and d == 0:
            raise malformed("privacy.delta must be above 0 for the gaussian mechanism")
        if self.mechanism == "laplace" and d != 0:
            raise malformed("privacy.delta must be 0 for the laplace mechanism (pure epsilon-DP)")

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"epsilon": float(self.epsilon), "delta": float(self.delta), "mechanism": self.mechanism}

    @classmethod
    def from_obj(cls, obj: Any, what: str = "privacy") -> Privacy:
        """Parse the JSON-able form."""
        if not isinstance(obj, dict):
            raise malformed(f"{what} must be an object")
        return cls(
            epsilon=get_field(obj, "epsilon", (int, float), what),
            delta=get_field(obj, "delta", (int, float), what),
            mechanism=get_field(obj, "mechanism", str, what),
        )


@dataclass(frozen=True)
class PlanSpec:
    """How the query's tree of aggregators is planned from the roster: `leaves` leaf DAs, or
    enough leaves that `expected_targets` make at most `max_per_leaf` items each; no DA with
    more than `fan_out` children. The plan depends on the spec and the roster only, never on
    how many targets the query really has (that would tell the querier a count)."""

    leaves: int | None = None
    max_per_leaf: int | None = None
    expected_targets: int | None = None
    fan_out: int = 8

    def __post_init__(self) -> None:
        for key in ("leaves", "max_per_leaf", "expected_targets", "fan_out"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise malformed(f"plan.{key} must be a positive integer")
        if self.fan_out < 2:
            raise malformed("plan.fan_out must be at least 2")
        if (self.leaves is None) == (self.max_per_leaf is None):
            raise malformed("plan needs exactly one of leaves and max_per_leaf")
        if (self.max_per_leaf is None) != (self.expected_targets is None):
            raise malformed("plan.max_per_leaf goes with plan.expected_targets")

    @property
    def n_leaves(self) -> int:
        """How many leaf DAs the plan has."""
        if self.leaves is not None:
            return self.leaves
        assert self.max_per_leaf is not None and self.expected_targets is not None
        return -(-self.expected_targets // self.max_per_leaf)

    def to_obj(self) -> dict[str, Any]:
        """The spec-file form."""
        keys = ("leaves", "max_per_leaf", "expected_targets", "fan_out")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


OUT_OF_BOUNDS = ("drop", "clip")


@dataclass(frozen=True)
class QuerySpec:
    """A researcher's aggregate query, as written in a spec file.

    One field (`function`, `params`, `bounds`), or several (`fields`; then `function`, `params`
    and `bounds` are the first field's, filled in from it).
    """

    target: str  # expression over concept names
    function: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)
    as_of: dt.date = dt.date(2026, 11, 1)
    group_by: GroupBy | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    stats: tuple[str, ...] = ("count", "mean", "std")
    k: int = 10
    privacy: Privacy = field(default_factory=Privacy)
    bins: tuple[float, ...] = ()  # histogram edges (histogram, median, quantiles) of the first field
    quantiles: tuple[float, ...] = ()
    fields: tuple[FieldSpec, ...] = ()  # several values per contribution
    regression: Regression | None = None  # with the ols stat
    out_of_bounds: str = "drop"  # or "clip": what a DA does with a value outside its bounds
    plan: PlanSpec | None = None  # the aggregator tree; None: the roster's own

    def __post_init__(self) -> None:
        if self.fields:
            if len(self.fields) < 2 or any(not isinstance(f, FieldSpec) for f in self.fields):
                raise malformed("data.fields must list at least two fields (or use data.function)")
            first = self.fields[0]
            if self.function and self.function != first.function:
                raise malformed("data.function and data.fields go apart: give one or the other")
            object.__setattr__(self, "function", first.function)
            object.__setattr__(self, "params", first.params)
            object.__setattr__(self, "bounds", first.bounds)
        if not isinstance(self.function, str) or not self.function:
            raise malformed("data.function (or data.fields) is required")
        if self.out_of_bounds not in OUT_OF_BOUNDS:
            raise malformed(f"aggregate.out_of_bounds must be one of {', '.join(OUT_OF_BOUNDS)}")
        check_fields(tuple(f.name for f in self.all_fields), self.stats, self.regression, "query spec")

    @property
    def all_fields(self) -> tuple[FieldSpec, ...]:
        """Every field of a contribution, the single one included."""
        if self.fields:
            return self.fields
        return (FieldSpec(DEFAULT_FIELD, self.function, self.params, self.bounds),)

    def compiled(self) -> tuple[tuple[str, ...], str]:
        """(concepts, positional expression) for CI and TF."""
        return compile_named(self.target)

    @property
    def groups(self) -> tuple[str, ...]:
        """Group labels of the result."""
        return self.group_by.labels if self.group_by else ("all",)

    def to_obj(self) -> dict[str, Any]:
        """The spec-file form (parse_query_spec reads it back)."""
        data: dict[str, Any] = {"as_of": self.as_of.isoformat()}
        aggregate: dict[str, Any] = {"stats": list(self.stats)}
        if self.fields:
            data["fields"] = [f.to_obj() for f in self.fields]
        else:
            data["function"] = self.function
            data["params"] = dict(self.params)
            aggregate["bounds"] = list(self.bounds)
        if self.group_by:
            data["group_by"] = self.group_by.to_obj()
        if self.bins:
            aggregate["bins"] = list(self.bins)
        if self.quantiles:
            aggregate["quantiles"] = list(self.quantiles)
        if self.regression is not None:
            aggregate["regression"] = self.regression.to_obj()
        if self.out_of_bounds != "drop":
            aggregate["out_of_bounds"] = self.out_of_bounds
        out = {
            "query": {"target": self.target, "k": self.k},
            "data": data,
            "aggregate": aggregate,
            "privacy": self.privacy.to_obj(),
        }
        if self.plan is not None:
            out["plan"] = self.plan.to_obj()
        return out


_SPEC_TABLES = {
    "query": {"target", "k"},
    "data": {"function", "as_of", "params", "group_by", "fields"},
    "aggregate": {"stats", "bounds", "bins", "quantiles", "regression", "out_of_bounds"},
    "privacy": {"epsilon", "delta", "mechanism"},
    "plan": {"leaves", "max_per_leaf", "expected_targets", "fan_out"},
}


def _group_by(gb: Any, key: str, *, nested: bool) -> GroupBy:
    """A group_by table: field with edges or categories, and optionally (once) `then`."""
    allowed = {"field", "edges", "categories"} | (set() if nested else {"then"})
    if not isinstance(gb, dict) or "field" not in gb or set(gb) - allowed:
        raise malformed(
            f"{key} must have 'field', then 'edges' or 'categories'"
            + ("" if nested else ", and may have 'then'")
        )
    if ("edges" in gb) == ("categories" in gb):
        raise malformed(f"{key} must have exactly one of 'edges' and 'categories'")
    then = _group_by(gb["then"], f"{key}.then", nested=True) if "then" in gb else None
    if not isinstance(gb["field"], str):
        raise malformed(f"{key}.field must be a name")
    if "categories" in gb:
        if not isinstance(gb["categories"], list) or any(not isinstance(c, str) for c in gb["categories"]):
            raise malformed(f"{key}.categories must be a list of names")
        return GroupBy.of_categories(gb["field"], tuple(gb["categories"]), then)
    if not isinstance(gb["edges"], list):
        raise malformed(f"{key}.edges must be a list of numbers")
    return GroupBy(gb["field"], tuple(gb["edges"]), (), then)


_FIELD_KEYS = {"name", "function", "params", "bounds"}


def _fields(raw: Any) -> tuple[FieldSpec, ...]:
    """data.fields: a list of tables, each with name, function, bounds and optionally params."""
    if not isinstance(raw, list) or len(raw) < 2:
        raise _spec_error("data.fields must list at least two fields (or use data.function)")
    out = []
    for i, f in enumerate(raw):
        key = f"data.fields[{i}]"
        if not isinstance(f, dict):
            raise _spec_error(f"{key} must be a table with name, function, bounds and optionally params")
        unknown = sorted(set(f) - _FIELD_KEYS)
        if unknown:
            raise _spec_error(f"unknown key {key}.{unknown[0]}")
        for needed in ("name", "function", "bounds"):
            if needed not in f:
                raise _spec_error(f"{key}.{needed} is required")
        if not isinstance(f["name"], str) or not f["name"].isidentifier() or len(f["name"]) > MAX_FIELD_NAME:
            raise _spec_error(f"{key}.name must be an identifier of at most {MAX_FIELD_NAME} characters")
        if not isinstance(f["function"], str):
            raise _spec_error(f"{key}.function must be a function name")
        params = f.get("params", {})
        if not isinstance(params, dict):
            raise _spec_error(f"{key}.params must be a table")
        try:
            bounds = check_bounds(f["bounds"], f"{key}.bounds")
        except DispersError as exc:
            raise _spec_error(exc.message) from None
        out.append(FieldSpec(f["name"], f["function"], params, bounds))
    return tuple(out)


def parse_query_spec(data: Mapping[str, Any]) -> QuerySpec:
    """Validate a query spec mapping (from TOML); errors name the bad key."""
    for table in data:
        if table not in _SPEC_TABLES:
            raise _spec_error(f"unknown table [{table}]")
        if not isinstance(data[table], dict):
            raise _spec_error(f"[{table}] must be a table")
        for key in data[table]:
            if key not in _SPEC_TABLES[table]:
                raise _spec_error(f"unknown key {table}.{key}")
    query = data.get("query", {})
    dat = data.get("data", {})
    agg = data.get("aggregate", {})
    if not isinstance(query.get("target"), str):
        raise _spec_error("query.target (a concept expression) is required")
    fields: tuple[FieldSpec, ...] = ()
    if "fields" in dat:
        for key in ("function", "params"):
            if key in dat:
                raise _spec_error(f"data.{key} goes with one field: with data.fields, each field has its own")
        if "bounds" in agg:
            raise _spec_error(
                "aggregate.bounds goes with one field: with data.fields, each field has its own"
            )
        fields = _fields(dat["fields"])
    elif not isinstance(dat.get("function"), str):
        raise _spec_error("data.function (or data.fields) is required")
    k = query.get("k", 10)
    if not isinstance(k, int) or isinstance(k, bool) or k < 2:
        raise _spec_error("query.k must be an integer >= 2")
    as_of = dat.get("as_of", dt.date(2026, 11, 1))
    if isinstance(as_of, str):
        try:
            as_of = dt.date.fromisoformat(as_of)
        except ValueError:
            raise _spec_error("data.as_of must be a date (YYYY-MM-DD)") from None
    if not isinstance(as_of, dt.date) or isinstance(as_of, dt.datetime):
        raise _spec_error("data.as_of must be a date (YYYY-MM-DD)")
    params = dat.get("params", {})
    if not isinstance(params, dict):
        raise _spec_error("data.params must be a table")
    group_by = None
    if "group_by" in dat:
        try:
            group_by = _group_by(dat["group_by"], "data.group_by", nested=False)
        except DispersError as exc:
            raise _spec_error(
                exc.message if exc.message.startswith("data.") else f"data.{exc.message}"
            ) from None
    if fields:
        bounds = fields[0].bounds
    else:
        if "bounds" not in agg:
            raise _spec_error("aggregate.bounds is required: [lower, upper] of the values")
        try:
            bounds = check_bounds(agg["bounds"], "aggregate.bounds")
        except DispersError as exc:
            raise _spec_error(exc.message) from None
    stats = agg.get("stats", ["count", "mean", "std"])
    if not isinstance(stats, list) or not stats or any(s not in STATS for s in stats):
        raise _spec_error(f"aggregate.stats must be a non-empty list from {', '.join(STATS)}")
    if len(set(stats)) != len(stats):
        raise _spec_error("aggregate.stats lists a statistic twice")
    raw_privacy = data.get("privacy", {})
    try:
        privacy = Privacy(
            epsilon=raw_privacy.get("epsilon", 1.0),
            delta=raw_privacy.get("delta", 0.0),
            mechanism=raw_privacy.get("mechanism", "laplace"),
        )
    except DispersError as exc:
        raise _spec_error(exc.message) from None
    bins, quantiles = agg.get("bins", []), agg.get("quantiles", [])
    for key, value in (("bins", bins), ("quantiles", quantiles)):
        if not isinstance(value, list) or any(
            isinstance(x, bool) or not isinstance(x, int | float) for x in value
        ):
            raise _spec_error(f"aggregate.{key} must be a list of numbers")
    try:
        check_histogram(
            bounds, tuple(stats), tuple(float(b) for b in bins), tuple(float(q) for q in quantiles), "",
        )  # fmt: skip
    except DispersError as exc:
        raise _spec_error(f"aggregate.{exc.message}") from None
    out_of_bounds = agg.get("out_of_bounds", "drop")
    if out_of_bounds not in OUT_OF_BOUNDS:
        raise _spec_error(f"aggregate.out_of_bounds must be one of {', '.join(OUT_OF_BOUNDS)}")
    plan = None
    if "plan" in data:
        try:
            plan = PlanSpec(**data["plan"])
        except DispersError as exc:
            raise _spec_error(exc.message) from None
    try:
        regression = Regression.from_obj(agg.get("regression"), "aggregate.regression")
        spec = QuerySpec(
            bins=tuple(float(b) for b in bins),
            quantiles=tuple(float(q) for q in quantiles),
            privacy=privacy,
            target=query["target"],
            function="" if fields else dat["function"],
            params={} if fields else params,
            as_of=as_of,
            group_by=group_by,
            bounds=bounds,
            stats=tuple(stats),
            k=k,
            fields=fields,
            regression=regression,
            out_of_bounds=out_of_bounds,
            plan=plan,
        )
    except DispersError as exc:
        raise _spec_error(exc.message.removeprefix("query spec: ")) from None
    try:
        spec.compiled()  # the target expression must parse
    except DispersError as exc:
        raise _spec_error(f"query.target: {exc.message}") from None
    return spec


def load_query_spec(path: str | Path) -> QuerySpec:
    """Read and validate a query spec TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise _spec_error(f"file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise _spec_error(f"file {p} is not valid TOML: {exc}") from None
    return parse_query_spec(data)


@dataclass(frozen=True)
class GroupResult:
    """One group of a released result: numbers, or suppressed when fewer than k contributed."""

    label: str
    suppressed: bool
    values: Mapping[str, float | None]  # stat -> value; empty when suppressed
    intervals: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # stat -> 95% interval
    noise: Mapping[str, float] = field(default_factory=dict)  # stat -> standard deviation of its noise
    histogram: tuple[float, ...] = ()  # counts per declared bin, when asked

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "label": self.label,
            "suppressed": self.suppressed,
            "values": dict(self.values),
            "intervals": {s: list(v) for s, v in self.intervals.items()},
            "noise": dict(self.noise),
            "histogram": list(self.histogram),
        }

    @classmethod
    def from_obj(cls, obj: Any) -> GroupResult:
        """Parse."""
        if not isinstance(obj, dict):
            raise malformed("result group must be an object")
        return cls(
            label=get_field(obj, "label", str, "result group"),
            suppressed=get_field(obj, "suppressed", bool, "result group"),
            values=get_field(obj, "values", dict, "result group"),
            intervals={s: (float(v[0]), float(v[1])) for s, v in dict(obj.get("intervals", {})).items()},
            noise={s: float(v) for s, v in dict(obj.get("noise", {})).items()},
            histogram=tuple(float(x) for x in obj.get("histogram", [])),
        )


@dataclass(frozen=True)
class ReleaseInfo:
    """How a result was released: noised or not, what it cost, what the querier has left."""

    noised: bool
    mechanism: str | None = None
    epsilon: float = 0.0
    delta: float = 0.0
    epsilon_left: float | None = None
    delta_left: float | None = None
    accounting: str | None = None  # how the query's noised vectors compose: "basic" or "zcdp"

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "noised": self.noised, "mechanism": self.mechanism, "epsilon": self.epsilon,
            "delta": self.delta, "epsilon_left": self.epsilon_left, "delta_left": self.delta_left,
            "accounting": self.accounting,
        }  # fmt: skip

    @classmethod
    def from_obj(cls, obj: Any) -> ReleaseInfo:
        """Parse."""
        if not isinstance(obj, dict):
            raise malformed("result privacy must be an object")
        return cls(
            noised=get_field(obj, "noised", bool, "result privacy"),
            mechanism=obj.get("mechanism"),
            epsilon=float(obj.get("epsilon", 0.0)),
            delta=float(obj.get("delta", 0.0)),
            epsilon_left=obj.get("epsilon_left"),
            delta_left=obj.get("delta_left"),
            accounting=obj.get("accounting"),
        )


@dataclass(frozen=True)
class QueryResult:
    """What the root DA seals to Q."""

    query_id: str
    k: int
    groups: tuple[GroupResult, ...]
    contributions: int  # folded into the released groups
    dropped: Mapping[str, int | None]  # reason -> count, e.g. out_of_bounds; None: fewer than k
    declined: int | None = None  # instances that declined; None: fewer than k
    privacy: ReleaseInfo = field(default_factory=lambda: ReleaseInfo(noised=False))
    clipped: int | None = None  # contributions clipped to their bounds; None: fewer than k, or not clipping
    plan: Mapping[str, Any] | None = None  # the aggregator tree's shape: root, depth, leaves, fan-out

    def group(self, label: str) -> GroupResult:
        """The group labelled `label`."""
        for g in self.groups:
            if g.label == label:
                return g
        raise DispersError(ErrorCode.NOT_FOUND, f"no group {label!r} in the result")

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "query_id": self.query_id,
            "k": self.k,
            "groups": [g.to_obj() for g in self.groups],
            "contributions": self.contributions,
            "dropped": dict(self.dropped),
            "declined": self.declined,
            "privacy": self.privacy.to_obj(),
            "clipped": self.clipped,
            "plan": None if self.plan is None else dict(self.plan),
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> QueryResult:
        """Parse."""
        what = "result"
        return cls(
            query_id=check_query_id(get_field(obj, "query_id", str, what)),
            k=get_field(obj, "k", int, what),
            groups=tuple(GroupResult.from_obj(g) for g in get_field(obj, "groups", list, what)),
            contributions=get_field(obj, "contributions", int, what),
            dropped=get_field(obj, "dropped", dict, what),
            declined=obj.get("declined"),
            privacy=ReleaseInfo.from_obj(obj.get("privacy", {"noised": False})),
            clipped=obj.get("clipped"),
            plan=obj.get("plan"),
        )
