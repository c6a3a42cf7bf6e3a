"""Cluster configuration: settings and the roster (role, endpoint, public keys per actor)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role, check_name
from dispers.core.vocabulary import (
    DEFAULT_VOCABULARY,
    MAX_ADDRESS_LENGTH,
    MAX_CONCEPT_LENGTH,
    validate_concept,
)
from dispers.crypto.keys import SealingPublicKey, VerifyKey
from dispers.crypto.tls import TlsIdentity

SINGLETON_ROLES = (Role.CONDUCTOR, Role.CONCEPT_INDEXOR, Role.TARGET_FINDER, Role.TARGET)


def _config_error(message: str) -> DispersError:
    return DispersError(ErrorCode.CONFIG, message)


@dataclass(frozen=True)
class RosterEntry:
    """The public face of one actor: what everyone may know about it."""

    name: str
    role: Role
    endpoint: str
    sealing_key: SealingPublicKey
    verify_key: VerifyKey
    parent: str | None = None


@dataclass(frozen=True)
class DAPlan:
    """The tree of Data Aggregators: contributions go to the leaves, the root seals to Q."""

    root: str
    parents: tuple[tuple[str, str], ...]  # (child, parent), sorted

    @property
    def members(self) -> tuple[str, ...]:
        """Every DA of the plan, root last."""
        return tuple(sorted(child for child, _ in self.parents)) + (self.root,)

    def children(self, name: str) -> tuple[str, ...]:
        """The DAs whose parent is `name`."""
        return tuple(sorted(child for child, parent in self.parents if parent == name))

    def parent(self, name: str) -> str | None:
        """The parent of `name`, or None for the root."""
        for child, parent in self.parents:
            if child == name:
                return parent
        return None

    @property
    def leaves(self) -> tuple[str, ...]:
        """The DAs that receive contributions (layer 1)."""
        return tuple(m for m in self.members if not self.children(m))

    def layers(self) -> list[tuple[str, ...]]:
        """DAs grouped by height, leaves first, root last: the order partials move up."""
        height: dict[str, int] = {}

        def h(name: str) -> int:
            if name not in height:
                kids = self.children(name)
                height[name] = 0 if not kids else 1 + max(h(k) for k in kids)
            return height[name]

        top = h(self.root)
        return [tuple(m for m in self.members if h(m) == level) for level in range(top + 1)]

    def summary(self) -> dict[str, Any]:
        """The tree's shape, as a result reports it: root, depth (layers, root included),
        leaves, aggregators and the largest number of children of one DA."""
        return {
            "root": self.root,
            "depth": len(self.layers()),
            "leaves": len(self.leaves),
            "aggregators": len(self.members),
            "fan_out": max(len(self.children(m)) for m in self.members),
        }

    def to_obj(self) -> dict[str, Any]:
        """JSON-able form, for signing and sealing."""
        return {"root": self.root, "parents": [list(p) for p in self.parents]}

    @classmethod
    def from_obj(cls, obj: Any) -> DAPlan:
        """Parse and validate the JSON-able form."""
        try:
            root = check_name(obj["root"], "plan root")
            parents = tuple(sorted((check_name(c), check_name(p)) for c, p in obj["parents"]))
        except (KeyError, TypeError, ValueError):
            raise DispersError(ErrorCode.MALFORMED, "the aggregator plan is malformed") from None
        plan = cls(root, parents)
        plan.validate()
        return plan

    def validate(self) -> None:
        """One root, every parent in the plan, no cycles, no DA twice."""
        children = [c for c, _ in self.parents]
        if len(set(children)) != len(children) or self.root in children:
            raise DispersError(ErrorCode.MALFORMED, "the aggregator plan names a DA twice")
        known = set(children) | {self.root}
        for _, parent in self.parents:
            if parent not in known:
                raise DispersError(ErrorCode.MALFORMED, "the aggregator plan has a dangling parent")
        for child in children:
            seen = {child}
            node: str | None = self.parent(child)
            while node is not None:
                if node in seen:
                    raise DispersError(ErrorCode.MALFORMED, "the aggregator plan has a cycle")
                seen.add(node)
                node = self.parent(node)


@dataclass(frozen=True)
class Roster:
    """Every actor of the cluster by name."""

    entries: tuple[RosterEntry, ...]

    def __post_init__(self) -> None:
        names = [e.name for e in self.entries]
        if len(set(names)) != len(names):
            raise _config_error("the roster names an actor twice")

    def __iter__(self) -> Iterator[RosterEntry]:
        return iter(self.entries)

    def get(self, name: str) -> RosterEntry:
        """The entry named `name`."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise DispersError(ErrorCode.NOT_FOUND, f"no actor named {name!r} in the roster")

    def by_role(self, role: Role) -> list[RosterEntry]:
        """Every entry of a role, in roster order."""
        return [e for e in self.entries if e.role is role]

    def one(self, role: Role) -> RosterEntry:
        """The single actor of a singleton role."""
        found = self.by_role(role)
        if len(found) != 1:
            raise _config_error(f"the roster must have exactly one {role.value} ({len(found)} found)")
        return found[0]

    def require(self, name: str, role: Role) -> RosterEntry:
        """The entry `name`, checked to have `role` (UNAUTHORIZED otherwise)."""
        try:
            entry = self.get(name)
        except DispersError:
            raise DispersError(
                ErrorCode.UNAUTHORIZED, f"{name!r} is not a {role.value} of this cluster"
            ) from None
        if entry.role is not role:
            raise DispersError(ErrorCode.UNAUTHORIZED, f"{name!r} is not a {role.value} of this cluster")
        return entry

    def da_plan(self) -> DAPlan:
        """The aggregator tree the roster describes."""
        das = self.by_role(Role.DATA_AGGREGATOR)
        roots = [d.name for d in das if d.parent is None]
        if len(roots) != 1:
            raise _config_error(f"exactly one data_aggregator must have no parent ({len(roots)} found)")
        plan = DAPlan(roots[0], tuple(sorted((d.name, d.parent) for d in das if d.parent)))
        try:
            plan.validate()
        except DispersError as exc:
            raise _config_error(exc.message) from None
        return plan

    def plan_tree(self, leaves: int, fan_out: int) -> DAPlan:
        """A tree of `leaves` leaf aggregators under the roster's root, no node with more than
        `fan_out` children, as shallow as that allows, drawn from the roster's other DAs (any
        declared parents aside; the root stays, as it holds the budget ledger)."""
        if leaves < 1 or fan_out < 2:
            raise DispersError(ErrorCode.MALFORMED, "a plan needs at least one leaf and a fan-out of 2")
        root = self.da_plan().root
        pool = sorted(d.name for d in self.by_role(Role.DATA_AGGREGATOR) if d.name != root)
        sizes = [leaves]
        while sizes[-1] > fan_out:
            sizes.append(-(-sizes[-1] // fan_out))
        if sum(sizes) > len(pool):
            raise DispersError(
                ErrorCode.MALFORMED,
                f"query spec: plan: {leaves} leaves with fan_out {fan_out} need {sum(sizes)} aggregators "
                f"besides the root, and the roster has {len(pool)}",
            )
        parents: list[tuple[str, str]] = []
        start = 0
        layers = []
        for size in sizes:
            layers.append(pool[start : start + size])
            start += size
        for lower, upper in zip(layers, layers[1:], strict=False):
            per = -(-len(lower) // len(upper))  # children per parent, every parent gets one
            parents += [(child, upper[i // per]) for i, child in enumerate(lower)]
        parents += [(child, root) for child in layers[-1]]
        plan = DAPlan(root, tuple(sorted(parents)))
        plan.validate()
        return plan

    def check_plan(self, plan: DAPlan) -> None:
        """A query's plan: rooted at the roster's root (it holds the budget ledger), every
        member a data aggregator of the roster."""
        if plan.root != self.da_plan().root:
            raise DispersError(
                ErrorCode.MALFORMED, "the query's aggregator plan is not rooted at the cluster's root"
            )
        aggregators = {d.name for d in self.by_role(Role.DATA_AGGREGATOR)}
        if not set(plan.members) <= aggregators:
            raise DispersError(
                ErrorCode.MALFORMED, "the query's aggregator plan names an actor that is not an aggregator"
            )

    def to_obj(self) -> list[dict[str, Any]]:
        """JSON/TOML-able public form (no secrets, no paths)."""
        out = []
        for e in self.entries:
            item: dict[str, Any] = {
                "name": e.name,
                "role": e.role.value,
                "endpoint": e.endpoint,
                "sealing_public_key": e.sealing_key.hex(),
                "verify_key": e.verify_key.hex(),
            }
            if e.parent:
                item["parent"] = e.parent
            out.append(item)
        return out


MAX_ROUND_TIME_S = 480.0  # a training round's answer time fits the transport's longest call (600 s)


@dataclass(frozen=True)
class ClusterSettings:
    """Cluster-wide policy and tuning.

    The `*_bytes` sizes are the fixed frames (DESIGN.md "Lengths are public") every sealed
    payload of that kind is padded to; a payload that does not fit is refused.
    """

    k_min: int = 10
    max_query_age_s: float = 600.0
    batch_size: int = 1000
    query_timeout_s: float = 300.0
    host_deadline_s: float = 60.0  # T waits for a host's answer this long, plus per instance asked:
    host_deadline_per_item_s: float = 0.01  # past it the query fails (no subset is ever released)
    shuffle_window: int = 8  # T forwards to each DA in windows of this many batches, each shuffled
    vocabulary: tuple[str, ...] = DEFAULT_VOCABULARY
    max_concepts: int = 16  # per subscription and per query
    max_groups: int = 128  # groups of one query (partial_bytes and result_bytes must hold them)
    max_bins: int = 32  # histogram bins of one query
    max_fields: int = 4  # values per contribution of one query (data.fields)
    concepts_bytes: int = 2048  # a subscription's or a query's concept list (JSON)
    address_bytes: int = 512  # an instance address and its nonce (JSON)
    expression_bytes: int = 1024  # a query's target expression
    request_bytes: int = 4096  # the data request sealed to T
    spec_bytes: int = 4096  # the aggregate spec sealed to each DA
    partial_bytes: int = 196608  # a partial aggregate sealed to a parent DA
    result_bytes: int = 2097152  # the result sealed to Q (intervals, histograms, quantiles included)
    max_long_polls: int = 4  # Status calls allowed to wait at once; more answer at once
    max_wait_s: float = 30.0  # the longest one Status call waits
    dp: bool = True  # the cluster's policy: noise every release (off only for simulations and tests)
    max_epsilon: float = 2.0  # the most one query may spend
    max_delta: float = 1e-6
    budget_epsilon: float = 10.0  # what each querier may spend in all (basic composition)
    budget_delta: float = 1e-5
    # Training: the most local work a querier may ask of a host per round (time and memory).
    max_local_epochs: int = 20
    max_local_batch: int = 1024
    # A host answers a round no earlier than round_time_s after the request, whatever it did (so
    # the answer's time tells nothing of who trained), and stops training by then; Q may ask for
    # another time up to max_round_time_s (T waits that long, plus host_deadline_s, per host).
    round_time_s: float = 30.0
    max_round_time_s: float = 120.0
    insecure: bool = False  # plain channels, caller names unauthenticated: loopback experiments only
    ca_cert: Path | None = None  # the cluster CA certificate (PEM), absolute once loaded


@dataclass(frozen=True)
class LocalSettings:
    """What only the process serving an actor needs: its key file and stores."""

    key_file: Path | None = None
    backend: str = "memory"
    state_path: Path | None = None
    documents: Path | None = None
    as_of: dt.date | None = None  # personal_cloud: reference date for deriving concepts
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class ClusterConfig:
    """A parsed cluster.toml."""

    path: Path | None
    settings: ClusterSettings
    roster: Roster
    local: Mapping[str, LocalSettings]

    def local_for(self, name: str) -> LocalSettings:
        """The private settings of actor `name`."""
        if name not in self.local:
            raise _config_error(f"no actor named {name!r} in the config")
        return self.local[name]

    @property
    def insecure(self) -> bool:
        """True when the cluster runs over plain channels ([cluster] insecure = true)."""
        return self.settings.insecure

    def tls_identity(self, name: str) -> TlsIdentity | None:
        """Actor `name`'s certificate, key and the cluster CA; None when the cluster is insecure.

        Reads the files on each call (they are small), so a rotated certificate is picked up
        by the next channel or server; errors name the missing key or the bad file.
        """
        if self.settings.insecure:
            return None
        local = self.local_for(name)
        needed = "(needed unless [cluster] insecure = true)"
        if self.settings.ca_cert is None:
            raise _config_error(f"[cluster] has no ca_cert {needed}")
        if local.tls_cert is None:
            raise _config_error(f"actor {name!r} has no tls_cert {needed}")
        if local.tls_key is None:
            raise _config_error(f"actor {name!r} has no tls_key {needed}")
        return TlsIdentity.load(name, cert=local.tls_cert, key=local.tls_key, ca=self.settings.ca_cert)


_ACTOR_KEYS = {
    "name", "role", "endpoint", "sealing_public_key", "verify_key", "parent",
    "key_file", "backend", "state_path", "documents", "as_of", "tls_cert", "tls_key",
}  # fmt: skip
_SETTING_KEYS = {f.name for f in dataclasses.fields(ClusterSettings)}
_SIZE_KEYS = ("concepts_bytes", "address_bytes", "expression_bytes", "request_bytes", "spec_bytes",
              "partial_bytes", "result_bytes")  # fmt: skip


def _int_setting(s: ClusterSettings, key: str, lo: int, hi: int) -> None:
    value = getattr(s, key)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _config_error(f"cluster.{key} must be an integer in {lo}..{hi}")


def _vocabulary(raw: Any) -> tuple[str, ...]:
    if not isinstance(raw, list) or not raw:
        raise _config_error("cluster.vocabulary must be a non-empty list of concepts")
    for i, concept in enumerate(raw):
        try:
            validate_concept(concept)
        except DispersError:
            raise _config_error(f"cluster.vocabulary[{i}] is not a concept namespace:value") from None
    if len(set(raw)) != len(raw):
        raise _config_error("cluster.vocabulary names a concept twice")
    return tuple(raw)


def _resolve(value: str, base: Path | None) -> Path:
    p = Path(value)
    return p if p.is_absolute() or base is None else base / p


def _settings(raw: Any, base: Path | None = None) -> ClusterSettings:
    if not isinstance(raw, dict):
        raise _config_error("[cluster] must be a table")
    unknown = set(raw) - _SETTING_KEYS
    if unknown:
        raise _config_error(f"[cluster] has unknown key(s): {', '.join(sorted(unknown))}")
    raw = dict(raw)
    if "vocabulary" in raw:
        raw["vocabulary"] = _vocabulary(raw["vocabulary"])
    for key in ("insecure", "dp"):
        if not isinstance(raw.get(key, False), bool):
            raise _config_error(f"cluster.{key} must be true or false")
    ca_cert = raw.pop("ca_cert", None)
    if ca_cert is not None and not isinstance(ca_cert, str):
        raise _config_error("cluster.ca_cert must be a path string")
    s = ClusterSettings(**raw, ca_cert=None if ca_cert is None else _resolve(ca_cert, base))
    _int_setting(s, "k_min", 2, 10**9)
    _int_setting(s, "batch_size", 1, 100_000)
    _int_setting(s, "max_concepts", 1, 1024)
    _int_setting(s, "max_groups", 1, 100_000)
    _int_setting(s, "max_bins", 1, 100_000)
    _int_setting(s, "max_fields", 1, 64)
    _int_setting(s, "max_long_polls", 0, 1024)
    _int_setting(s, "max_local_epochs", 1, 10_000)
    _int_setting(s, "max_local_batch", 1, 10**6)
    for key in _SIZE_KEYS:
        _int_setting(s, key, 64, 64 * 1024 * 1024)
    for key in ("max_epsilon", "budget_epsilon"):
        value = getattr(s, key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
            raise _config_error(f"cluster.{key} must be a positive number")
    for key in ("max_delta", "budget_delta"):
        value = getattr(s, key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
            raise _config_error(f"cluster.{key} must be a number in [0, 1)")
    _int_setting(s, "shuffle_window", 1, 10**6)
    for key in (
        "max_query_age_s",
        "query_timeout_s",
        "max_wait_s",
        "host_deadline_s",
        "host_deadline_per_item_s",
        "round_time_s",
        "max_round_time_s",
    ):
        value = getattr(s, key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 < value < math.inf:
            raise _config_error(f"cluster.{key} must be a positive number")
    if s.max_round_time_s > MAX_ROUND_TIME_S:
        # T's call to a host, and the host's answer, must fit the transport's longest call.
        raise _config_error(f"cluster.max_round_time_s must be at most {MAX_ROUND_TIME_S:g}")
    if s.round_time_s > s.max_round_time_s:
        raise _config_error(f"cluster.round_time_s must be at most max_round_time_s = {s.max_round_time_s:g}")
    # Whether a payload fits its frame must never depend on a person's data: the frames must
    # hold the worst case the other settings allow.
    need = s.max_concepts * (MAX_CONCEPT_LENGTH + 3) + 64
    if s.concepts_bytes < need:
        raise _config_error(
            f"cluster.concepts_bytes must be at least {need} to hold max_concepts = {s.max_concepts} "
            f"concepts of up to {MAX_CONCEPT_LENGTH} characters"
        )
    if s.address_bytes < MAX_ADDRESS_LENGTH + 80:
        raise _config_error(
            f"cluster.address_bytes must be at least {MAX_ADDRESS_LENGTH + 80} to hold an address "
            f"of up to {MAX_ADDRESS_LENGTH} characters"
        )
    return s


def _entry(raw: Any, i: int, base: Path | None) -> tuple[RosterEntry, LocalSettings]:
    where = f"actor[{i}]"
    if not isinstance(raw, dict):
        raise _config_error(f"{where} must be a table")
    unknown = set(raw) - _ACTOR_KEYS
    if unknown:
        raise _config_error(f"{where} has unknown key(s): {', '.join(sorted(unknown))}")
    for key in ("name", "role", "endpoint", "sealing_public_key", "verify_key"):
        if not isinstance(raw.get(key), str):
            raise _config_error(f"{where}.{key} is missing or not a string")
    try:
        name = check_name(raw["name"])
        role = Role.parse(raw["role"])
        sealing = SealingPublicKey.from_hex(raw["sealing_public_key"])
        verify = VerifyKey.from_hex(raw["verify_key"])
    except DispersError as exc:
        raise _config_error(f"{where}: {exc.message}") from None
    parent = raw.get("parent")
    if parent is not None and (role is not Role.DATA_AGGREGATOR or not isinstance(parent, str)):
        raise _config_error(f"{where}.parent is only for data_aggregator actors, as a name")
    backend = raw.get("backend", "memory")
    if backend not in ("memory", "sqlite"):
        raise _config_error(f"{where}.backend must be 'memory' or 'sqlite'")

    def path(key: str) -> Path | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise _config_error(f"{where}.{key} must be a path string")
        return _resolve(value, base)

    as_of = raw.get("as_of")
    if isinstance(as_of, str):
        try:
            as_of = dt.date.fromisoformat(as_of)
        except ValueError:
            raise _config_error(f"{where}.as_of must be a date (YYYY-MM-DD)") from None
    if as_of is not None and (not isinstance(as_of, dt.date) or isinstance(as_of, dt.datetime)):
        raise _config_error(f"{where}.as_of must be a date (YYYY-MM-DD)")
    local = LocalSettings(
        key_file=path("key_file"), backend=backend, state_path=path("state_path"),
        documents=path("documents"), as_of=as_of, tls_cert=path("tls_cert"), tls_key=path("tls_key"),
    )  # fmt: skip
    if backend == "sqlite" and local.state_path is None:
        raise _config_error(f"{where}.state_path is required with backend = 'sqlite'")
    return RosterEntry(name, role, raw["endpoint"], sealing, verify, parent), local


def parse_config(data: Mapping[str, Any], path: Path | None = None) -> ClusterConfig:
    """Validate a cluster config mapping; errors name the bad key."""
    unknown = set(data) - {"cluster", "actor"}
    if unknown:
        raise _config_error(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    base = path.parent if path is not None else None
    settings = _settings(data.get("cluster", {}), base)
    actors = data.get("actor")
    if not isinstance(actors, list) or not actors:
        raise _config_error("the config needs [[actor]] entries")
    pairs = [_entry(raw, i, base) for i, raw in enumerate(actors)]
    roster = Roster(tuple(e for e, _ in pairs))
    for role in SINGLETON_ROLES:
        roster.one(role)
    roster.da_plan()
    if not roster.by_role(Role.QUERIER):
        raise _config_error("the roster needs at least one querier")
    return ClusterConfig(path, settings, roster, {e.name: loc for e, loc in pairs})


def load_config(path: str | Path) -> ClusterConfig:
    """Read and validate cluster.toml."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise _config_error(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise _config_error(f"config file {p} is not valid TOML: {exc}") from None
    return parse_config(data, p)
