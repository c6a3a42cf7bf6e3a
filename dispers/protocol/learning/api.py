"""The training operations each actor offers, as a caller sees them (beside protocol/api.py's)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, cast

from dispers.core.messages import CollectReport, ContributionBatch, QueryEnvelope
from dispers.protocol.learning.messages import RoundRequest, TrainingRound
from dispers.state.queries import QueryRecord


class RoundAggregatorAPI(Protocol):
    """A DA's training ops."""

    def prepare_round(self, envelope: QueryEnvelope, attestation: bytes = b"") -> None: ...
    def ingest_round(self, query_id: str, ciphertexts: Sequence[bytes]) -> int: ...
    def end_round_ingest(self, query_id: str, forwarded: int) -> None: ...
    def absorb_round(self, query_id: str, child: str, sealed_partial: bytes) -> None: ...
    def finalize_round(self, query_id: str) -> bytes: ...
    def abort_round(self, query_id: str) -> None: ...


class RoundTargetAPI(Protocol):
    """T's training op."""

    def collect_round(self, training_round: TrainingRound, sealed_pseudonyms: bytes) -> CollectReport: ...


class RoundHostAPI(Protocol):
    """A host's training op."""

    def train(self, request: RoundRequest) -> ContributionBatch: ...


class RoundConductorAPI(Protocol):
    """C's training op (the round's status is read with `status`, as a query's)."""

    def submit_round(self, training_round: TrainingRound) -> str: ...
    def status(self, query_id: str, wait_s: float = 0.0) -> QueryRecord: ...


def as_round_aggregator(peer: Any) -> RoundAggregatorAPI:
    """A DA peer (in-process or gRPC) seen through its training ops."""
    return cast(RoundAggregatorAPI, peer)


def as_round_target(peer: Any) -> RoundTargetAPI:
    """T seen through its training op."""
    return cast(RoundTargetAPI, peer)


def as_round_host(peer: Any) -> RoundHostAPI:
    """A host seen through its training op."""
    return cast(RoundHostAPI, peer)


def as_round_conductor(peer: Any) -> RoundConductorAPI:
    """C seen through its training op."""
    return cast(RoundConductorAPI, peer)
