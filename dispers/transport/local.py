"""In-process transport: every actor is a Python object and a call is a method call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.crypto.keyfiles import read_key_file
from dispers.protocol.api import (
    ConceptIndexorAPI,
    ConductorAPI,
    DataAggregatorAPI,
    PersonalCloudAPI,
    TargetAPI,
    TargetFinderAPI,
)
from dispers.protocol.concept_indexor import ConceptIndexor
from dispers.protocol.conductor import Conductor, run_inline
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.protocol.querier import Querier
from dispers.protocol.target import Target
from dispers.protocol.target_finder import TargetFinder
from dispers.state.documents import DocumentStore
from dispers.state.factory import (
    open_address_directory,
    open_concept_catalog,
    open_pseudonym_sets,
    open_query_store,
)


def _path(p: Path | None) -> str | None:
    return str(p) if p is not None else None


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

    @classmethod
    def from_config(cls, config: ClusterConfig) -> LocalCluster:
        """Build every actor from the config's key files and stores."""
        cluster = cls(config)
        roster, settings = config.roster, config.settings

        def keys(name: str):  # type: ignore[no-untyped-def]
            key_file = config.local_for(name).key_file
            if key_file is None:
                raise DispersError(ErrorCode.CONFIG, f"actor {name!r} has no key_file")
            return read_key_file(key_file)

        for entry in roster:
            local = config.local_for(entry.name)
            state = _path(local.state_path)
            if entry.role is Role.CONDUCTOR:
                cluster.conductor_actor = Conductor(
                    entry.name,
                    roster,
                    settings,
                    open_query_store(local.backend, state),
                    cluster,
                    run_inline,
                )
            elif entry.role is Role.CONCEPT_INDEXOR:
                cluster.ci = ConceptIndexor(
                    keys(entry.name), roster, settings, open_concept_catalog(local.backend, state)
                )
            elif entry.role is Role.TARGET_FINDER:
                cluster.tf = TargetFinder(
                    keys(entry.name), roster, settings, open_pseudonym_sets(local.backend, state)
                )
            elif entry.role is Role.TARGET:
                cluster.t = Target(
                    keys(entry.name),
                    roster,
                    settings,
                    open_address_directory(local.backend, state),
                    cluster,
                )
            elif entry.role is Role.DATA_AGGREGATOR:
                cluster.das[entry.name] = DataAggregator(keys(entry.name), roster, settings)
        for entry in roster.by_role(Role.PERSONAL_CLOUD):
            local = config.local_for(entry.name)
            store = DocumentStore(local.documents if local.documents else ":memory:")
            cluster.hosts[entry.name] = PersonalCloudHost(
                entry.name,
                keys(entry.name),
                roster,
                settings,
                store,
                cluster.conductor(),
                local.as_of,
            )
        for entry in roster.by_role(Role.QUERIER):
            cluster.queriers[entry.name] = Querier(
                keys(entry.name), cluster.conductor(), settings, pinned_roster=roster
            )
        return cluster

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
