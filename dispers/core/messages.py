"""Messages exchanged between actors: sealed payloads plus the little metadata each hop needs."""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field

from dispers.core.codec import dumps
from dispers.core.config import DAPlan
from dispers.core.errors import malformed
from dispers.core.spec import Privacy
from dispers.crypto.keys import SealingPublicKey, VerifyKey

NONCE_BYTES = 16
"""The fresh random nonce an instance puts in both halves of its subscription."""


class SubscriptionOp(enum.Enum):
    """Join or leave the concepts of a subscription."""

    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"


@dataclass(frozen=True)
class SubscriptionItem:
    """One instance's subscription as it reaches C: seal_CI(concepts), seal_T(address)."""

    sealed_concepts: bytes
    sealed_address: bytes


def digest(data: bytes) -> bytes:
    """The 32-byte BLAKE2b digest signatures over lists of ciphertexts are made of."""
    return hashlib.blake2b(data, digest_size=32).digest()


@dataclass(frozen=True)
class BatchHeader:
    """What binds a subscription batch to its host: every item's digests, signed by the host.

    CI and T each get the header and only their own half of the items; both check the host's
    signature, that each ciphertext they open is one the host signed, and that the batch is
    fresh. The batch id is derived from the signed bytes, so the Conductor cannot give a
    replayed batch a new one, and TF refuses a batch id it has applied before.
    """

    host: str
    op: SubscriptionOp
    issued_at: float
    concept_digests: tuple[bytes, ...]
    address_digests: tuple[bytes, ...]
    signature: bytes = b""

    def signing_bytes(self) -> bytes:
        """What the host signs."""
        head = dumps({"host": self.host, "op": self.op.value, "issued_at": self.issued_at})
        pairs = b"".join(c + a for c, a in zip(self.concept_digests, self.address_digests, strict=True))
        return b"dispers-subscription-v1\x00" + head + b"\x00" + pairs

    @property
    def batch_id(self) -> str:
        """128 bits derived from what the host signed."""
        return hashlib.blake2b(self.signing_bytes(), digest_size=16).hexdigest()

    def __len__(self) -> int:
        return len(self.concept_digests)


@dataclass(frozen=True)
class SubscriptionBatch:
    """A host's batch of subscriptions as it reaches C: the items and the signed header."""

    header: BatchHeader
    items: tuple[SubscriptionItem, ...]

    @classmethod
    def build(
        cls, host: str, op: SubscriptionOp, issued_at: float, items: tuple[SubscriptionItem, ...]
    ) -> SubscriptionBatch:
        """An unsigned batch whose header carries the items' digests."""
        header = BatchHeader(
            host,
            op,
            issued_at,
            tuple(digest(i.sealed_concepts) for i in items),
            tuple(digest(i.sealed_address) for i in items),
        )
        return cls(header, items)

    def check_digests(self) -> None:
        """The items are exactly those whose digests the header carries, in order."""
        if len(self.items) != len(self.header.concept_digests) or len(self.items) != len(
            self.header.address_digests
        ):
            raise malformed("the subscription batch's items do not match its header")
        for i, item in enumerate(self.items):
            if (
                digest(item.sealed_concepts) != self.header.concept_digests[i]
                or digest(item.sealed_address) != self.header.address_digests[i]
            ):
                raise malformed(f"subscription {i} does not match the batch's signed header")


@dataclass(frozen=True)
class SignedItems:
    """Sealed items an actor hands on (CI's tokens, T's pseudonyms) and its signature over them."""

    items: tuple[bytes, ...]
    signature: bytes


@dataclass(frozen=True)
class Receipt:
    """TF's word that it applied a batch: how many subscriptions, and its signature over the
    batch id and op. CI and T commit what they staged for a batch only against it."""

    applied: int
    signature: bytes


def receipt_bytes(batch_id: str, op: SubscriptionOp) -> bytes:
    """What TF signs when it has applied a batch."""
    return b"dispers-subscription-applied-v1\x00" + dumps({"batch_id": batch_id, "op": op.value})


def signed_items_bytes(signer: str, batch_id: str, op: SubscriptionOp, items: tuple[bytes, ...]) -> bytes:
    """What CI or T signs over the items it seals to TF for one batch."""
    head = dumps({"signer": signer, "batch_id": batch_id, "op": op.value})
    return b"dispers-subscription-items-v1\x00" + head + b"\x00" + b"".join(digest(x) for x in items)


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
    privacy: Privacy = field(default_factory=Privacy)  # public, like k: charged at the root DA
    # A training round's cohort size (0 for a query): public, and signed here so that T (which
    # draws it) and the root DA (which charges for it) check the same number.
    cohort: int = 0

    def signing_bytes(self) -> bytes:
        """The canonical bytes Q signs: every field but the signature (computed once per
        envelope object: it is immutable, and every actor that holds it verifies them)."""
        cached = self.__dict__.get("_signing_bytes")
        if cached is None:
            cached = self._signing_bytes_uncached()
            self.__dict__["_signing_bytes"] = cached  # not a field: frozen, eq and replace ignore it
        return cached

    def _signing_bytes_uncached(self) -> bytes:
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
                "privacy": self.privacy.to_obj(),
                **({"cohort": self.cohort} if self.cohort else {}),
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
    """TF's answer: how many targets (C may know), seal_T(shuffled pseudonyms), and the count
    signed by TF and sealed to the root DA, which refuses a result resting on more items."""

    count: int
    sealed_pseudonyms: bytes
    sealed_attestation: bytes


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
    """Host -> T: exactly one sealed item (contribution or decline, same length) per instance
    asked, each to its DA, in the host's own random order."""

    aggregators: tuple[str, ...]
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class CollectReport:
    """T -> C: sizes only. T cannot tell a contribution from a decline, so neither can C."""

    targets: int
    forwarded: int
    unreachable: int
    per_aggregator: tuple[tuple[str, int], ...]


def request_signing_bytes(request: bytes) -> bytes:
    """What Q signs so instances can check a data request came from Q unchanged."""
    return b"dispers-data-request-v1\x00" + request
