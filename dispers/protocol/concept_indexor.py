"""Concept Indexor: turns concept strings into keyed tokens, sealed to the Target Finder."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dispers.core.codec import field, hex_bytes
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role, check_batch_id
from dispers.core.messages import (
    NONCE_BYTES,
    QueryEnvelope,
    SignedItems,
    SubscriptionOp,
    signed_items_bytes,
)
from dispers.core.vocabulary import validate_concept
from dispers.crypto import ActorKeys, Opener, keyed_hash
from dispers.protocol.authz import authorize
from dispers.protocol.common import (
    ReplayGuard,
    Staging,
    frame_size,
    open_padded,
    open_padded_strings_many,
    replay_memory_s,
    seal_padded_strings_many,
    seal_signed,
    signed_tokens_bytes,
    take_to_commit,
    tokens_bytes,
    verify_envelope,
)
from dispers.state.concepts import ConceptCatalog

log = logging.getLogger(__name__)


class ConceptIndexor:
    """CI learns concept strings, never who subscribed to them."""

    def __init__(
        self, keys: ActorKeys, roster: Roster, settings: ClusterSettings, catalog: ConceptCatalog
    ) -> None:
        self.name = keys.name
        self._keys = keys
        self._secret = keys.secret
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._vocabulary = frozenset(settings.vocabulary)
        self._catalog = catalog
        self._tf_key = roster.one(Role.TARGET_FINDER).sealing_key
        self._replays = ReplayGuard(replay_memory_s(settings))
        self._staged: Staging[tuple[SubscriptionOp, list[str]]] = Staging(settings.query_timeout_s)

    def token(self, concept: str) -> bytes:
        """Keyed BLAKE2b of a concept under CI's secret."""
        return keyed_hash(self._secret, concept.encode(), b"dispers-concept")

    def _concepts(self, values: list[object], what: str, *, least: int = 1) -> list[str]:
        """Validate a concept list: 1..max_concepts vocabulary concepts.

        The vocabulary is public, so refusing a concept outside it tells nobody anything about
        who holds what; every vocabulary concept is tokenized, populated or not.
        """
        limit = self._settings.max_concepts
        if not least <= len(values) <= limit:
            raise malformed(f"{what}: between {least} and {limit} concepts")
        out = []
        for j, c in enumerate(values):
            if not isinstance(c, str):
                raise malformed(f"{what}: concept {j} is not a string")
            try:
                validate_concept(c)
            except DispersError as exc:
                raise malformed(f"{what}: concept {j}: {exc.message}") from None
            if c not in self._vocabulary:
                raise DispersError(
                    ErrorCode.UNKNOWN_CONCEPT, f"{what}: concept {j} is not in the cluster's vocabulary"
                )
            out.append(c)
        return out

    def tokenize_subscriptions(
        self, caller: str, batch_id: str, op: SubscriptionOp, sealed_concepts: Sequence[bytes]
    ) -> SignedItems:
        """Open each subscription's concepts; return seal_TF(tokens, nonce), signed as a whole
        with the batch id and op (TF checks both against T's, which T took from the host's
        signed batch).

        CI is not told which host the batch comes from: with a host of one instance, that
        would tell it who subscribed to what. It needs no more: an item the host did not sign
        carries no nonce T's half matches, and TF refuses it. Concepts are staged under the
        batch id and reach the catalogue only against TF's receipt.
        """
        authorize(self._roster, caller, "concept_indexor.tokenize_subscriptions", callee=self.name)
        check_batch_id(batch_id)
        if not 0 < len(sealed_concepts) <= self._settings.batch_size:
            raise malformed(f"a subscription batch holds 1 to {self._settings.batch_size} items")
        if any(len(c) != frame_size(self._settings.concepts_bytes) for c in sealed_concepts):
            raise malformed("a subscription item does not have the cluster's fixed length")
        if len(set(sealed_concepts)) != len(sealed_concepts):
            raise malformed("a subscription batch holds an item twice")
        size, out_size = self._settings.concepts_bytes, tokens_bytes(self._settings)
        per_item: list[list[str]] = []
        bodies: list[dict[str, str | list[str]]] = []
        opened = open_padded_strings_many(self._opener, sealed_concepts, size, "subscription {i} concepts")
        for i, obj in enumerate(opened):
            what = f"subscription {i} concepts"
            nonce = hex_bytes(obj.get("nonce"), f"{what} nonce", NONCE_BYTES)
            # An unsubscription carries none: TF removes the instance from every set.
            concepts = self._concepts(field(obj, "concepts", list, what), what, least=0)
            per_item.append(concepts)
            bodies.append({"tokens": [self.token(c).hex() for c in concepts], "nonce": nonce.hex()})
        items = tuple(seal_padded_strings_many(self._tf_key, bodies, out_size, "token list"))
        self._staged.put(batch_id, (op, sorted({c for concepts in per_item for c in concepts})))
        signature = self._keys.signing.sign(signed_items_bytes(self.name, batch_id, op, items))
        return SignedItems(items, signature)

    def settle(self, caller: str, batch_id: str, commit: bool, receipt: bytes = b"") -> None:
        """Commit (or drop) the concepts a subscription batch staged (a commit needs TF's receipt)."""
        authorize(self._roster, caller, "concept_indexor.settle", callee=self.name)
        staged = take_to_commit(self._staged, self._roster, batch_id, commit, receipt)
        concepts = staged[1] if staged is not None else []
        if concepts:
            new = self._catalog.add(concepts)
            log.debug("batch settled: %d new concepts", new)

    def tokenize_query(self, caller: str, envelope: QueryEnvelope) -> bytes:
        """Open a query's concepts and seal their tokens, in order, to TF."""
        authorize(self._roster, caller, "concept_indexor.tokenize_query", callee=self.name)
        verify_envelope(envelope, self._roster, self._settings)
        self._replays.claim(envelope.query_id, "query", made_at=envelope.created_at)
        what = "query concepts"
        obj = open_padded(self._opener, envelope.sealed_concepts, self._settings.concepts_bytes, what)
        if obj.get("query_id") != envelope.query_id:
            raise malformed(f"{what} belong to another query")
        concepts = self._concepts(field(obj, "concepts", list, what), what)
        tokens = [self.token(c).hex() for c in concepts]
        body = {"query_id": envelope.query_id, "tokens": tokens}
        # Signed: the Conductor relays it and could otherwise seal its own tokens to TF.
        return seal_signed(
            self._tf_key,
            self._keys.signing,
            self.name,
            body,
            signed_tokens_bytes(self._settings),
            "token list",
        )
