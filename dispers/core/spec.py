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

STATS = ("count", "sum", "mean", "var", "std", "min", "max", "histogram", "median", "quantiles")
HISTOGRAM_STATS = ("histogram", "median", "quantiles")
"""Statistics read off a histogram of declared bins (quantiles to the resolution of a bin)."""
MAX_QUANTILES = 16
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

    @property
    def layout(self) -> ContributionLayout:
        """The fixed record every target answers with (one value per contribution for now)."""
        return ContributionLayout(1)

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
        )


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
    bounds: tuple[float, float]
    stats: tuple[str, ...]
    groups: tuple[str, ...]  # labels; contributions carry an index into this
    n_fields: int = 1  # values per contribution record
    bins: tuple[float, ...] = ()  # histogram edges, from the lower bound to the upper one
    quantiles: tuple[float, ...] = ()  # levels in (0, 1), read off the histogram

    @property
    def layout(self) -> ContributionLayout:
        """The fixed record the DAs decode."""
        return ContributionLayout(self.n_fields)

    def __post_init__(self) -> None:
        lo, hi = self.bounds
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise malformed("aggregate spec: bounds must be finite with lower < upper")
        if max(abs(lo), abs(hi)) > MAX_BOUND:
            raise malformed(f"aggregate spec: bounds must lie within ±{MAX_BOUND:g}")
        if max(abs(lo), abs(hi)) > MAX_BOUND_RATIO * (hi - lo):
            raise malformed("aggregate spec: bounds too narrow for their magnitude (floating point)")
        bad = [s for s in self.stats if s not in STATS]
        if bad or not self.stats:
            raise malformed(f"aggregate spec: stats must be a non-empty subset of {', '.join(STATS)}")
        if not self.groups:
            raise malformed("aggregate spec: at least one group")
        check_histogram(self.bounds, self.stats, self.bins, self.quantiles, "aggregate spec: ")

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
        }

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> AggregateSpec:
        """Parse and validate."""
        what = "aggregate spec"
        bounds = get_field(obj, "bounds", list, what)
        if len(bounds) != 2 or not all(isinstance(b, int | float) for b in bounds):
            raise malformed(f"{what}: bounds must be two numbers")
        return cls(
            query_id=check_query_id(get_field(obj, "query_id", str, what)),
            k=get_field(obj, "k", int, what),
            bounds=(float(bounds[0]), float(bounds[1])),
            stats=tuple(get_field(obj, "stats", list, what)),
            groups=tuple(get_field(obj, "groups", list, what)),
            n_fields=get_field(obj, "n_fields", int, what),
            bins=tuple(float(b) for b in get_field(obj, "bins", list, what)),
            quantiles=tuple(float(q) for q in get_field(obj, "quantiles", list, what)),
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
class QuerySpec:
    """A researcher's aggregate query, as written in a spec file."""

    target: str  # expression over concept names
    function: str
    params: Mapping[str, Any] = field(default_factory=dict)
    as_of: dt.date = dt.date(2026, 11, 1)
    group_by: GroupBy | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    stats: tuple[str, ...] = ("count", "mean", "std")
    k: int = 10
    privacy: Privacy = field(default_factory=Privacy)
    bins: tuple[float, ...] = ()  # histogram edges (histogram, median, quantiles)
    quantiles: tuple[float, ...] = ()

    def compiled(self) -> tuple[tuple[str, ...], str]:
        """(concepts, positional expression) for CI and TF."""
        return compile_named(self.target)

    @property
    def groups(self) -> tuple[str, ...]:
        """Group labels of the result."""
        return self.group_by.labels if self.group_by else ("all",)

    def to_obj(self) -> dict[str, Any]:
        """The spec-file form (parse_query_spec reads it back)."""
        data: dict[str, Any] = {
            "function": self.function,
            "as_of": self.as_of.isoformat(),
            "params": dict(self.params),
        }
        if self.group_by:
            data["group_by"] = self.group_by.to_obj()
        return {
            "query": {"target": self.target, "k": self.k},
            "data": data,
            "aggregate": {
                "stats": list(self.stats),
                "bounds": list(self.bounds),
                **({"bins": list(self.bins)} if self.bins else {}),
                **({"quantiles": list(self.quantiles)} if self.quantiles else {}),
            },
            "privacy": self.privacy.to_obj(),
        }


_SPEC_TABLES = {
    "query": {"target", "k"},
    "data": {"function", "as_of", "params", "group_by"},
    "aggregate": {"stats", "bounds", "bins", "quantiles"},
    "privacy": {"epsilon", "delta", "mechanism"},
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
    if not isinstance(dat.get("function"), str):
        raise _spec_error("data.function is required")
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
    bounds = agg.get("bounds")
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        or not all(math.isfinite(b) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        raise _spec_error("aggregate.bounds must be [lower, upper], finite, with lower < upper")
    if max(abs(bounds[0]), abs(bounds[1])) > MAX_BOUND:
        raise _spec_error(f"aggregate.bounds must lie within ±{MAX_BOUND:g}")
    if max(abs(bounds[0]), abs(bounds[1])) > MAX_BOUND_RATIO * (bounds[1] - bounds[0]):
        raise _spec_error(
            f"aggregate.bounds are too narrow for their magnitude (at most {MAX_BOUND_RATIO:g} times "
            "their width): floating-point rounding would exceed the noise's calibration"
        )
    stats = agg.get("stats", ["count", "mean", "std"])
    if not isinstance(stats, list) or not stats or any(s not in STATS for s in stats):
        raise _spec_error(f"aggregate.stats must be a non-empty list from {', '.join(STATS)}")
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
            (float(bounds[0]), float(bounds[1])), tuple(stats),
            tuple(float(b) for b in bins), tuple(float(q) for q in quantiles), "",
        )  # fmt: skip
    except DispersError as exc:
        raise _spec_error(f"aggregate.{exc.message}") from None
    spec = QuerySpec(
        bins=tuple(float(b) for b in bins),
        quantiles=tuple(float(q) for q in quantiles),
        privacy=privacy,
        target=query["target"],
        function=dat["function"],
        params=params,
        as_of=as_of,
        group_by=group_by,
        bounds=(float(bounds[0]), float(bounds[1])),
        stats=tuple(stats),
        k=k,
    )
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

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "noised": self.noised, "mechanism": self.mechanism, "epsilon": self.epsilon,
            "delta": self.delta, "epsilon_left": self.epsilon_left, "delta_left": self.delta_left,
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
        )
