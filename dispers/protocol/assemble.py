"""Build any actor of a cluster config from its key file and stores, over any transport's peers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Union

from dispers.core.config import ClusterConfig, ClusterSettings
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.spec import MAX_QUANTILES
from dispers.crypto.keyfiles import read_key_file
from dispers.crypto.keys import ActorKeys
from dispers.protocol.aggregation.partial import worst_case_sizes
from dispers.protocol.api import Peers
from dispers.protocol.concept_indexor import ConceptIndexor
from dispers.protocol.conductor import Conductor, Executor
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.protocol.querier import Querier
from dispers.protocol.target import Target
from dispers.protocol.target_finder import TargetFinder
from dispers.state.budget import open_budget_ledger
from dispers.state.documents import DocumentStore
from dispers.state.factory import (
    open_address_directory,
    open_concept_catalog,
    open_pseudonym_sets,
    open_query_store,
)

log = logging.getLogger(__name__)

Actor = Union[  # noqa: UP007 (a runtime alias)
    Conductor, ConceptIndexor, TargetFinder, Target, DataAggregator, Querier, PersonalCloudHost
]
Closer = Callable[[], None]


def actor_keys(config: ClusterConfig, name: str) -> ActorKeys:
    """Read the key file of actor `name`, checking it is that actor's."""
    key_file = config.local_for(name).key_file
    if key_file is None:
        raise DispersError(ErrorCode.CONFIG, f"actor {name!r} has no key_file")
    keys = read_key_file(key_file)
    if keys.name != name:
        raise DispersError(ErrorCode.CONFIG, f"key file {key_file} belongs to another actor")
    return keys


def check_frames(settings: ClusterSettings) -> None:
    """The partial and result frames must hold the largest a query of max_groups groups can
    give: whether a payload fits must never depend on a person's data (DESIGN.md, lengths)."""
    partial_len, result_len = worst_case_sizes(
        settings.max_groups, settings.max_bins, MAX_QUANTILES, settings.max_fields
    )
    for key, need in (("partial_bytes", partial_len), ("result_bytes", result_len)):
        if getattr(settings, key) < need:
            raise DispersError(
                ErrorCode.CONFIG,
                f"cluster.{key} must be at least {need} to hold a query of "
                f"max_groups = {settings.max_groups} groups of max_bins = {settings.max_bins} bins "
                f"and max_fields = {settings.max_fields} fields",
            )


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def assemble_actor(
    config: ClusterConfig, name: str, peers: Peers, executor: Executor, own: list[Closer]
) -> Actor:
    """The protocol object for roster entry `name`; a close function per opened store goes to `own`."""
    check_frames(config.settings)
    entry = config.roster.get(name)
    local = config.local_for(name)
    roster, settings = config.roster, config.settings
    state = _path(local.state_path)
    if entry.role is Role.CONDUCTOR:  # C holds no key that opens a payload
        store = open_query_store(local.backend, state)
        own.append(store.close)
        return Conductor(name, roster, settings, store, peers, executor)
    keys = actor_keys(config, name)
    if entry.role is Role.CONCEPT_INDEXOR:
        catalog = open_concept_catalog(local.backend, state)
        own.append(catalog.close)
        return ConceptIndexor(keys, roster, settings, catalog)
    if entry.role is Role.TARGET_FINDER:
        sets = open_pseudonym_sets(local.backend, state)
        own.append(sets.close)
        return TargetFinder(keys, roster, settings, sets)
    if entry.role is Role.TARGET:
        directory = open_address_directory(local.backend, state)
        own.append(directory.close)
        return Target(keys, roster, settings, directory, peers)
    if entry.role is Role.DATA_AGGREGATOR:
        if entry.parent is None and settings.dp and local.backend == "memory":
            log.warning("%s keeps the privacy budgets in memory: a restart resets every querier's budget "
                        "(set backend = 'sqlite' and a state_path)", name)  # fmt: skip
        ledger = open_budget_ledger(local.backend, state)  # the root's privacy budgets
        own.append(ledger.close)
        return DataAggregator(keys, roster, settings, ledger)
    if entry.role is Role.QUERIER:
        return Querier(keys, peers.conductor(), settings, pinned_roster=roster)
    if entry.role is Role.PERSONAL_CLOUD:
        documents = DocumentStore(local.documents if local.documents is not None else ":memory:")
        own.append(documents.close)
        return PersonalCloudHost(name, keys, roster, settings, documents, peers.conductor(), local.as_of)
    raise DispersError(ErrorCode.CONFIG, f"cannot assemble role {entry.role.value}")
