"""Target Finder: token -> pseudonym sets; evaluates target expressions; never sees concept strings."""

from __future__ import annotations

import logging

from dispers.core.codec import field, hex_bytes
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.expression import evaluate, needs_universe, parse_positional
from dispers.core.ids import Role, check_batch_id
from dispers.core.messages import (
    NONCE_BYTES,
    FoundTargets,
    QueryEnvelope,
    Receipt,
    SignedItems,
    SubscriptionOp,
    receipt_bytes,
    signed_items_bytes,
)
from dispers.crypto import ActorKeys, Opener, seal
from dispers.crypto.permute import shuffled
from dispers.protocol.authz import authorize
from dispers.protocol.common import (
    ReplayGuard,
    frame_size,
    open_padded,
    open_padded_strings_many,
    open_sealed_signed,
    pack,
    replay_memory_s,
    same_query,
    seal_signed,
    sign_payload,
    signed_tokens_bytes,
    tokens_bytes,
    verify_envelope,
)
from dispers.state.pseudonyms import PseudonymSets

log = logging.getLogger(__name__)
TOKEN_BYTES = 32
PSEUDONYM_BYTES = 32
PSEUDONYM_FRAME = 160  # {"pseudonym": 64 hex, "nonce": 32 hex} padded
ATTESTATION_BYTES = 512  # TF's signed target count, sealed to the root DA


class TargetFinder:
    """TF learns tokens, pseudonyms and the expression's shape; nothing else."""

    def __init__(
        self, keys: ActorKeys, roster: Roster, settings: ClusterSettings, sets: PseudonymSets
    ) -> None:
        self.name = keys.name
        self._keys = keys
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._sets = sets
        self._t_key = roster.one(Role.TARGET).sealing_key
        self._replays = ReplayGuard(replay_memory_s(settings))

    def apply_subscriptions(
        self, caller: str, op: SubscriptionOp, batch_id: str, tokens: SignedItems, pseudonyms: SignedItems
    ) -> Receipt:
        """Apply one batch, all or nothing, once; returns how many it held, with TF's signed
        receipt (CI and T commit their side of the batch only against it).

        Both halves must be signed for this batch id and op (by CI and by T), pair up item by
        item with the same nonce (so the Conductor cannot re-pair them), and the batch id must
        be new (so it cannot replay one).
        """
        authorize(self._roster, caller, "target_finder.apply_subscriptions", callee=self.name)
        check_batch_id(batch_id)
        n = len(tokens.items)
        if not 0 < n <= self._settings.batch_size or len(pseudonyms.items) != n:
            raise malformed(f"a subscription batch holds 1 to {self._settings.batch_size} paired items")
        ci = self._roster.one(Role.CONCEPT_INDEXOR)
        t = self._roster.one(Role.TARGET)
        ci.verify_key.verify(
            signed_items_bytes(ci.name, batch_id, op, tokens.items), tokens.signature, "token list"
        )
        t.verify_key.verify(
            signed_items_bytes(t.name, batch_id, op, pseudonyms.items), pseudonyms.signature, "pseudonyms"
        )
        size = tokens_bytes(self._settings)
        if any(len(x) != frame_size(size) for x in tokens.items) or any(
            len(x) != frame_size(PSEUDONYM_FRAME) for x in pseudonyms.items
        ):
            raise malformed("a subscription item does not have the cluster's fixed length")
        pairs: list[tuple[list[bytes], bytes]] = []
        token_objs = open_padded_strings_many(self._opener, tokens.items, size, "subscription {i} tokens")
        pseudonym_objs = open_padded_strings_many(
            self._opener, pseudonyms.items, PSEUDONYM_FRAME, "subscription {i} pseudonym"
        )
        for i, (obj, pobj) in enumerate(zip(token_objs, pseudonym_objs, strict=True)):
            what = f"subscription {i} tokens"
            raw = field(obj, "tokens", list, what)
            if len(raw) > self._settings.max_concepts:
                raise malformed(f"{what}: more than {self._settings.max_concepts} tokens")
            toks = [hex_bytes(tk, what, TOKEN_BYTES) for tk in raw]
            nonce = hex_bytes(obj.get("nonce"), f"{what} nonce", NONCE_BYTES)
            what = f"subscription {i} pseudonym"
            pseudonym = hex_bytes(pobj.get("pseudonym"), what, PSEUDONYM_BYTES)
            if hex_bytes(pobj.get("nonce"), f"{what} nonce", NONCE_BYTES) != nonce:
                raise malformed(f"subscription {i}: its tokens and pseudonym carry different nonces")
            pairs.append((toks, pseudonym))
        if op is SubscriptionOp.SUBSCRIBE:
            self._sets.subscribe_batch(batch_id, pairs)
        else:
            self._sets.unsubscribe_batch(batch_id, [p for _, p in pairs])
        # Only the number of subscriptions goes back: C already knows it, whereas the number
        # of memberships would tell C how many concepts the instances of a batch hold.
        return Receipt(len(pairs), self._keys.signing.sign(receipt_bytes(batch_id, op)))

    def find_targets(self, caller: str, envelope: QueryEnvelope, sealed_tokens: bytes) -> FoundTargets:
        """Evaluate the query's expression; refuse below k; seal shuffled pseudonyms to T."""
        authorize(self._roster, caller, "target_finder.find_targets", callee=self.name)
        verify_envelope(envelope, self._roster, self._settings)
        self._replays.claim(envelope.query_id, "query", made_at=envelope.created_at)
        what = "query expression"
        expr_obj = open_padded(
            self._opener, envelope.sealed_expression, self._settings.expression_bytes, what
        )
        same_query(expr_obj, envelope, what)
        ci = self._roster.one(Role.CONCEPT_INDEXOR)
        tok_obj = open_sealed_signed(
            self._opener,
            sealed_tokens,
            signed_tokens_bytes(self._settings),
            ci.name,
            ci.verify_key,
            "query tokens",
        )
        same_query(tok_obj, envelope, "query tokens")
        tokens = [
            hex_bytes(t, "query token", TOKEN_BYTES) for t in field(tok_obj, "tokens", list, "query tokens")
        ]
        text = expr_obj.get("expression")
        if not isinstance(text, str):
            raise DispersError(ErrorCode.INVALID_EXPRESSION, "the target expression is missing")
        expr = parse_positional(text, len(tokens))
        sets = [self._sets.members(t) for t in tokens]
        universe = self._sets.universe() if needs_universe(expr) else frozenset()
        targets = list(evaluate(expr, sets, universe))
        # The cluster's k_min, not the query's k: a querier free to choose the threshold could
        # search over k, refused query after refused query, for the exact number of targets.
        # Groups under the query's k are suppressed at the root DA as usual.
        # Under DP there is no refusal at all: an exact, uncharged refusal would be one free
        # bit (is this expression's population below k_min?) per query, which no noise covers;
        # instead the query runs, is charged, and the root suppresses every group whose noised
        # count stays under k.
        if not self._settings.dp and len(targets) < self._settings.k_min:
            raise DispersError(
                ErrorCode.TOO_FEW_TARGETS,
                f"the query matches fewer than the cluster's k_min={self._settings.k_min} targets; refused",
            )
        targets = shuffled(targets)
        payload = {"query_id": envelope.query_id, "pseudonyms": pack(targets, PSEUDONYM_BYTES)}
        # Signed: the Conductor relays it and could otherwise hand T pseudonyms of its choice.
        sealed_pseudonyms = seal(self._t_key, sign_payload(self._keys.signing, self.name, payload))
        root = self._roster.get(envelope.plan.root)
        attestation = seal_signed(
            root.sealing_key,
            self._keys.signing,
            self.name,
            {"query_id": envelope.query_id, "targets": len(targets)},
            ATTESTATION_BYTES,
            "target count",
        )
        log.info("query %s: %d targets", envelope.query_id[:8], len(targets))
        return FoundTargets(len(targets), sealed_pseudonyms, attestation)
