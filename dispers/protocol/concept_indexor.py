"""Concept Indexor: turns concept strings into keyed tokens, sealed to the Target Finder."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from dispers.core.codec import dumps, field, loads_list, loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role
from dispers.core.messages import QueryEnvelope, SubscriptionOp
from dispers.crypto import ActorKeys, Opener, keyed_hash, seal
from dispers.protocol.common import ReplayGuard, Staging, verify_envelope
from dispers.protocol.instance.concepts import validate_concept
from dispers.state.concepts import ConceptCatalog

log = logging.getLogger(__name__)
MAX_CONCEPTS = 256


class ConceptIndexor:
    """CI learns concept strings, never who subscribed to them."""

    def __init__(
        self, keys: ActorKeys, roster: Roster, settings: ClusterSettings, catalog: ConceptCatalog
    ) -> None:
        self.name = keys.name
        self._secret = keys.secret
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._catalog = catalog
        self._tf_key = roster.one(Role.TARGET_FINDER).sealing_key
        self._replays = ReplayGuard(settings.max_query_age_s * 2)
        self._staged: Staging[list[str]] = Staging(settings.query_timeout_s)

    def token(self, concept: str) -> bytes:
        """Keyed BLAKE2b of a concept under CI's secret."""
        return keyed_hash(self._secret, concept.encode(), b"dispers-concept")

    def _concepts(self, values: list[object], what: str) -> list[str]:
        if not values or len(values) > MAX_CONCEPTS:
            raise malformed(f"{what}: between 1 and {MAX_CONCEPTS} concepts")
        out = []
        for j, c in enumerate(values):
            if not isinstance(c, str):
                raise malformed(f"{what}: concept {j} is not a string")
            try:
                validate_concept(c)
            except DispersError as exc:
                raise malformed(f"{what}: concept {j}: {exc.message}") from None
            out.append(c)
        return out

    def tokenize_subscriptions(
        self, op: SubscriptionOp, sealed_concepts: Sequence[bytes], batch_id: str
    ) -> list[bytes]:
        """Open each subscription's concepts, return seal_TF(tokens) in the same order.

        New concepts are staged under `batch_id` and reach the catalogue only when the
        Conductor settles the batch with commit=True (after TF applied it).
        """
        per_item: list[list[str]] = []
        for i, ciphertext in enumerate(sealed_concepts):
            what = f"subscription {i} concepts"
            per_item.append(self._concepts(loads_list(self._opener.open(ciphertext, what), what), what))
        out = [seal(self._tf_key, dumps([self.token(c).hex() for c in concepts])) for concepts in per_item]
        if op is SubscriptionOp.SUBSCRIBE:
            self._staged.put(batch_id, sorted({c for concepts in per_item for c in concepts}))
        return out

    def settle(self, batch_id: str, commit: bool) -> None:
        """Commit (or drop) the concepts a subscription batch staged."""
        concepts = self._staged.take(batch_id)
        if commit and concepts:
            new = self._catalog.add(concepts)
            log.debug("batch settled: %d new concepts", new)

    def tokenize_query(self, envelope: QueryEnvelope) -> bytes:
        """Open a query's concepts and seal their tokens, in order, to TF."""
        verify_envelope(envelope, self._roster, self._settings)
        self._replays.check(envelope.query_id, "query")
        what = "query concepts"
        obj = loads_object(self._opener.open(envelope.sealed_concepts, what), what)
        if obj.get("query_id") != envelope.query_id:
            raise malformed(f"{what} belong to another query")
        concepts = self._concepts(field(obj, "concepts", list, what), what)
        unknown = self._catalog.unknown(concepts)
        if unknown:
            where = ", ".join(str(i) for i in unknown)
            raise DispersError(
                ErrorCode.UNKNOWN_CONCEPT,
                f"the concept(s) at position(s) {where} of the query are unknown to the Concept Indexor",
            )
        tokens = [self.token(c).hex() for c in concepts]
        self._replays.record(envelope.query_id)
        return seal(self._tf_key, dumps({"query_id": envelope.query_id, "tokens": tokens}))
