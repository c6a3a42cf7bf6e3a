"""In-process transport: every actor is a Python object and a call is a method call.

Every call carries its caller's name, as the TLS certificate does over gRPC: each actor gets
peers bound to its own name, and users reach the cluster as a named actor (`as_caller`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, cast

from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.protocol.api import (
    ConceptIndexorAPI,
    ConductorAPI,
    DataAggregatorAPI,
    PersonalCloudAdminAPI,
    PersonalCloudAPI,
    QuerierAPI,
    TargetAPI,
    TargetFinderAPI,
)
from dispers.protocol.assemble import Closer, assemble_actor
from dispers.protocol.concept_indexor import ConceptIndexor
from dispers.protocol.conductor import Conductor, run_inline
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.protocol.querier import Querier
from dispers.protocol.target import Target
from dispers.protocol.target_finder import TargetFinder


class AsCaller:
    """An actor as one caller reaches it: every method call gets the caller's name first."""

    def __init__(self, actor: object, caller: str) -> None:
        self._actor = actor
        self._caller = caller

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._actor, name)
        if name.startswith("_") or not callable(attr):
            raise AttributeError(name)  # only operations cross the (pretend) wire
        return functools.partial(attr, self._caller)


@dataclass
class LocalCluster:
    """Every actor of a cluster config, in this process."""

    config: ClusterConfig
    conductor_actor: Conductor | None = None
    ci: ConceptIndexor | None = None
    tf: TargetFinder | None = None
    t: Target | None = None
    das: dict[str, DataAggregator] = field(default_factory=dict)
    hosts: dict[str, PersonalCloudHost] = field(default_factory=dict)
    queriers: dict[str, Querier] = field(default_factory=dict)
    closers: list[Closer] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: ClusterConfig) -> LocalCluster:
        """Build every actor from the config's key files and stores (the Conductor first)."""
        cluster = cls(config)
        for entry in sorted(config.roster, key=lambda e: e.role is not Role.CONDUCTOR):
            peers = cluster.as_caller(entry.name)
            actor = assemble_actor(config, entry.name, peers, run_inline, cluster.closers)
            if isinstance(actor, Conductor):
                cluster.conductor_actor = actor
            elif isinstance(actor, ConceptIndexor):
                cluster.ci = actor
            elif isinstance(actor, TargetFinder):
                cluster.tf = actor
            elif isinstance(actor, Target):
                cluster.t = actor
            elif isinstance(actor, DataAggregator):
                cluster.das[entry.name] = actor
            elif isinstance(actor, PersonalCloudHost):
                cluster.hosts[entry.name] = actor
            else:
                cluster.queriers[entry.name] = actor
        return cluster

    def as_caller(self, caller: str) -> LocalPeers:
        """The cluster as actor `caller` reaches it (any name: an outsider is refused by each op)."""
        return LocalPeers(self, caller)

    def close(self) -> None:
        """Close every store the actors opened."""
        for close in reversed(self.closers):
            close()
        self.closers.clear()

    def querier(self, name: str | None = None) -> QuerierAPI:
        """A Querier as its own operator reaches it (the first one by default)."""
        obj = self.querier_object(name)
        return cast(QuerierAPI, AsCaller(obj, obj.name))

    def querier_object(self, name: str | None = None) -> Querier:
        """The Querier protocol object itself (builds envelopes)."""
        return self.queriers[name] if name else next(iter(self.queriers.values()))

    def host_admin(self, name: str) -> PersonalCloudAdminAPI:
        """A personal-cloud host as its own operator reaches it."""
        return cast(PersonalCloudAdminAPI, AsCaller(self.hosts[name], name))


@dataclass
class LocalPeers:
    """Peers for one caller: every call it makes carries its name."""

    cluster: LocalCluster
    caller: str

    def _bound(self, actor: object | None, what: str) -> Any:
        if actor is None:
            raise DispersError(ErrorCode.UNAVAILABLE, f"the cluster has no {what}")
        return AsCaller(actor, self.caller)

    def conductor(self) -> ConductorAPI:
        """The Conductor."""
        return cast(ConductorAPI, self._bound(self.cluster.conductor_actor, "conductor"))

    def concept_indexor(self) -> ConceptIndexorAPI:
        """The Concept Indexor."""
        return cast(ConceptIndexorAPI, self._bound(self.cluster.ci, "concept indexor"))

    def target_finder(self) -> TargetFinderAPI:
        """The Target Finder."""
        return cast(TargetFinderAPI, self._bound(self.cluster.tf, "target finder"))

    def target(self) -> TargetAPI:
        """The Target."""
        return cast(TargetAPI, self._bound(self.cluster.t, "target"))

    def data_aggregator(self, name: str) -> DataAggregatorAPI:
        """A Data Aggregator by name."""
        if name not in self.cluster.das:
            raise DispersError(ErrorCode.NOT_FOUND, f"no data aggregator {name!r}")
        return cast(DataAggregatorAPI, self._bound(self.cluster.das[name], "data aggregator"))

    def personal_cloud(self, name: str) -> PersonalCloudAPI:
        """A personal-cloud host by name."""
        if name not in self.cluster.hosts:
            raise DispersError(ErrorCode.UNAVAILABLE, f"no personal-cloud host {name!r}")
        return cast(PersonalCloudAPI, self._bound(self.cluster.hosts[name], "host"))
