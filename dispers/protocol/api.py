"""What each actor offers the others, as a caller sees it: the contract both transports implement.

The protocol objects behind these take the caller's name first (see protocol/authz.py); a
transport supplies it: from the TLS certificate over gRPC, explicitly in process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from dispers.core.config import Roster
from dispers.core.messages import (
    BatchHeader,
    CollectReport,
    ContributionBatch,
    ContributionRequest,
    FoundTargets,
    QueryEnvelope,
    Receipt,
    SignedItems,
    SubscriptionBatch,
    SubscriptionOp,
)
from dispers.core.spec import QueryResult, QuerySpec
from dispers.state.queries import QueryRecord


class ConductorAPI(Protocol):
    """Orchestrates subscriptions and queries; relays ciphertext."""

    def get_roster(self) -> Roster: ...
    def get_vocabulary(self) -> tuple[str, ...]: ...
    def subscribe(self, batch: SubscriptionBatch) -> int: ...
    def submit(self, envelope: QueryEnvelope) -> str: ...
    def status(self, query_id: str, wait_s: float = 0.0) -> QueryRecord: ...


class ConceptIndexorAPI(Protocol):
    """Concept strings -> keyed tokens, sealed to TF."""

    def tokenize_subscriptions(
        self, batch_id: str, op: SubscriptionOp, sealed_concepts: Sequence[bytes]
    ) -> SignedItems: ...
    def tokenize_query(self, envelope: QueryEnvelope) -> bytes: ...
    def settle(self, batch_id: str, commit: bool, receipt: bytes = b"") -> None: ...


class TargetFinderAPI(Protocol):
    """Token -> pseudonym sets; evaluates target expressions."""

    def apply_subscriptions(
        self, op: SubscriptionOp, batch_id: str, tokens: SignedItems, pseudonyms: SignedItems
    ) -> Receipt: ...
    def find_targets(self, envelope: QueryEnvelope, sealed_tokens: bytes) -> FoundTargets: ...


class TargetAPI(Protocol):
    """Address directory; asks targets for contributions and forwards them to DAs."""

    def pseudonymize(self, header: BatchHeader, sealed_addresses: Sequence[bytes]) -> SignedItems: ...
    def collect(self, envelope: QueryEnvelope, sealed_pseudonyms: bytes) -> CollectReport: ...
    def settle(self, batch_id: str, commit: bool, receipt: bytes = b"") -> None: ...


class DataAggregatorAPI(Protocol):
    """Folds contributions into partials in memory; the root releases the result."""

    def prepare(self, envelope: QueryEnvelope, attestation: bytes = b"") -> None: ...
    def ingest(self, query_id: str, ciphertexts: Sequence[bytes]) -> int: ...
    def end_ingest(self, query_id: str, forwarded: int) -> None: ...
    def absorb(self, query_id: str, child: str, sealed_partial: bytes) -> None: ...
    def finalize(self, query_id: str) -> bytes: ...
    def abort(self, query_id: str) -> None: ...


class PersonalCloudAPI(Protocol):
    """A host of many instances: computes and seals their contributions."""

    def contribute(self, request: ContributionRequest) -> ContributionBatch: ...


class Peers(Protocol):
    """How an actor reaches the others (in-process objects or gRPC stubs)."""

    def conductor(self) -> ConductorAPI: ...
    def concept_indexor(self) -> ConceptIndexorAPI: ...
    def target_finder(self) -> TargetFinderAPI: ...
    def target(self) -> TargetAPI: ...
    def data_aggregator(self, name: str) -> DataAggregatorAPI: ...
    def personal_cloud(self, name: str) -> PersonalCloudAPI: ...


@dataclass(frozen=True)
class QueryOutcome:
    """What a Querier reports: C's record of the query and, once done, the opened result."""

    record: QueryRecord
    result: QueryResult | None


class QuerierAPI(Protocol):
    """The researcher's service: builds, signs and submits queries; opens results."""

    def submit(self, spec: QuerySpec) -> str: ...
    def outcome(self, query_id: str, wait_s: float = 0.0) -> QueryOutcome: ...


class PersonalCloudAdminAPI(Protocol):
    """Host administration: (un)subscribe every instance it serves."""

    def subscribe_all(self, op: SubscriptionOp) -> int: ...
