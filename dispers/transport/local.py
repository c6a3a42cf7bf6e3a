"""In-process transport: every actor is a Python object and a call is a method call."""

from __future__ import annotations

from dataclasses import dataclass, field

from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.protocol.api import (
    ConceptIndexorAPI,
    ConductorAPI,
    DataAggregatorAPI,
    PersonalCloudAPI,
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


@dataclass
class LocalCluster:
    """Every actor of a cluster config, in this process; implements Peers for all of them."""

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
            actor = assemble_actor(config, entry.name, cluster, run_inline, cluster.closers)
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

    def close(self) -> None:
        """Close every store the actors opened."""
        for close in reversed(self.closers):
            close()
        self.closers.clear()

    def conductor(self) -> ConductorAPI:
        """The Conductor."""
        assert self.conductor_actor is not None
        return self.conductor_actor

    def concept_indexor(self) -> ConceptIndexorAPI:
        """The Concept Indexor."""
        assert self.ci is not None
        return self.ci

    def target_finder(self) -> TargetFinderAPI:
        """The Target Finder."""
        assert self.tf is not None
        return self.tf

    def target(self) -> TargetAPI:
        """The Target."""
        assert self.t is not None
        return self.t

    def data_aggregator(self, name: str) -> DataAggregatorAPI:
        """A Data Aggregator by name."""
        if name not in self.das:
            raise DispersError(ErrorCode.NOT_FOUND, f"no data aggregator {name!r}")
        return self.das[name]

    def personal_cloud(self, name: str) -> PersonalCloudAPI:
        """A personal-cloud host by name."""
        if name not in self.hosts:
            raise DispersError(ErrorCode.UNAVAILABLE, f"no personal-cloud host {name!r}")
        return self.hosts[name]

    def querier(self, name: str | None = None) -> Querier:
        """A Querier (the first one by default)."""
        return self.queriers[name] if name else next(iter(self.queriers.values()))
