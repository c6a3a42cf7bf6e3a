"""Messages exchanged between actors: sealed payloads plus the little metadata each hop needs."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

from dispers.core.codec import dumps
from dispers.core.config import DAPlan
from dispers.core.errors import malformed
from dispers.crypto.keys import SealingPublicKey, VerifyKey


class SubscriptionOp(enum.Enum):
    """Join or leave the concepts of a subscription."""

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"


@dataclass(frozen=True)
class SubscriptionItem:
    """One instance's subscription as it reaches C: seal_CI(concepts), seal_T(address)."""

    sealed_concepts: bytes
    sealed_address: bytes


@dataclass(frozen=True)
class TokenizedSubscription:
    """One subscription as it reaches TF: seal_TF(tokens), seal_TF(pseudonym)."""

    sealed_tokens: bytes
    sealed_pseudonym: bytes


@dataclass(frozen=True)
class QueryEnvelope:
    """A query as Q submits it: every part sealed to its reader, the whole signed by Q."""

    query_id: str
    querier: str
    created_at: float
    k: int
    sealed_concepts: bytes  # to CI
    sealed_expression: bytes  # to TF
    sealed_request: bytes  # to T
    sealed_specs: tuple[tuple[str, bytes], ...]  # (DA name, aggregate spec sealed to it)
    plan: DAPlan
    querier_sealing_key: SealingPublicKey
    querier_verify_key: VerifyKey
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        """The canonical bytes Q signs: every field but the signature."""
        specs = [[name, hashlib.blake2b(ct).hexdigest()] for name, ct in self.sealed_specs]
        return b"dispers-query-v1\x00" + dumps(
            {
                "query_id": self.query_id,
                "querier": self.querier,
                "created_at": self.created_at,
                "k": self.k,
                "concepts": hashlib.blake2b(self.sealed_concepts).hexdigest(),
                "expression": hashlib.blake2b(self.sealed_expression).hexdigest(),
                "request": hashlib.blake2b(self.sealed_request).hexdigest(),
                "specs": specs,
                "plan": self.plan.to_obj(),
                "sealing_key": self.querier_sealing_key.hex(),
                "verify_key": self.querier_verify_key.hex(),
            }
        )

    def spec_for(self, da: str) -> bytes:
        """The aggregate spec sealed to DA `da`."""
        for name, ciphertext in self.sealed_specs:
            if name == da:
                return ciphertext
        raise malformed(f"the query carries no aggregate spec for {da!r}")


@dataclass(frozen=True)
class FoundTargets:
    """TF's answer: how many targets (C may know) and seal_T(shuffled pseudonyms)."""

    count: int
    sealed_pseudonyms: bytes


@dataclass(frozen=True)
class ContributionRequest:
    """T -> personal-cloud host: the signed data request and, per instance, its leaf DA."""

    query_id: str
    querier: str
    request: bytes  # the data request's canonical bytes, as Q signed them
    request_signature: bytes
    instance_ids: tuple[str, ...]
    aggregators: tuple[str, ...]  # parallel to instance_ids


@dataclass(frozen=True)
class ContributionBatch:
    """Host -> T: sealed contributions (each to its DA) and how many instances declined."""

    aggregators: tuple[str, ...]
    ciphertexts: tuple[bytes, ...]
    declined: int


@dataclass(frozen=True)
class CollectReport:
    """T -> C: sizes only."""

    targets: int
    contributed: int
    declined: int
    unreachable: int
    per_aggregator: tuple[tuple[str, int], ...]


def request_signing_bytes(request: bytes) -> bytes:
    """What Q signs so instances can check a data request came from Q unchanged."""
    return b"dispers-data-request-v1\x00" + request
