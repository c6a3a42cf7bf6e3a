"""Target Finder: token -> pseudonym sets; evaluates target expressions; never sees concept strings."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence

from dispers.core.codec import dumps, field, hex_bytes, loads_list, loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.expression import Not, evaluate, parse_positional
from dispers.core.ids import Role
from dispers.core.messages import FoundTargets, QueryEnvelope, SubscriptionOp, TokenizedSubscription
from dispers.crypto import ActorKeys, Opener, seal
from dispers.protocol.common import ReplayGuard, pack, same_query, verify_envelope
from dispers.state.pseudonyms import PseudonymSets

log = logging.getLogger(__name__)
TOKEN_BYTES = 32
PSEUDONYM_BYTES = 32


def _has_not(expr: object) -> bool:
    if isinstance(expr, Not):
        return True
    return any(_has_not(getattr(expr, a)) for a in ("left", "right", "operand") if hasattr(expr, a))


class TargetFinder:
    """TF learns tokens, pseudonyms and the expression's shape; nothing else."""

    def __init__(
        self, keys: ActorKeys, roster: Roster, settings: ClusterSettings, sets: PseudonymSets
    ) -> None:
        self.name = keys.name
        self._opener = Opener(keys.name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._sets = sets
        self._t_key = roster.one(Role.TARGET).sealing_key
        self._replays = ReplayGuard(settings.max_query_age_s * 2)
        self._random = secrets.SystemRandom()

    def apply_subscriptions(self, op: SubscriptionOp, items: Sequence[TokenizedSubscription]) -> int:
        """Add (or remove) each pseudonym to its tokens' sets, all or nothing; returns how many."""
        pairs: list[tuple[list[bytes], bytes]] = []
        for i, item in enumerate(items):
            what = f"subscription {i} tokens"
            raw = loads_list(self._opener.open(item.sealed_tokens, what), what)
            tokens = [hex_bytes(t, what, TOKEN_BYTES) for t in raw]
            pseudonym = self._opener.open(item.sealed_pseudonym, f"subscription {i} pseudonym")
            if len(pseudonym) != PSEUDONYM_BYTES:
                raise malformed(f"subscription {i} pseudonym must be {PSEUDONYM_BYTES} bytes")
            pairs.append((tokens, pseudonym))
        changed = self._sets.add(pairs) if op is SubscriptionOp.SUBSCRIBE else self._sets.remove(pairs)
        log.debug("%s: %d memberships changed", op.value, changed)
        # Only the number of subscriptions goes back: C already knows it, whereas the number
        # of memberships would tell C how many concepts the instances of a batch hold.
        return len(pairs)

    def find_targets(self, envelope: QueryEnvelope, sealed_tokens: bytes) -> FoundTargets:
        """Evaluate the query's expression; refuse below k; seal shuffled pseudonyms to T."""
        verify_envelope(envelope, self._roster, self._settings)
        self._replays.check(envelope.query_id, "query")
        what = "query expression"
        expr_obj = loads_object(self._opener.open(envelope.sealed_expression, what), what)
        same_query(expr_obj, envelope, what)
        tok_obj = loads_object(self._opener.open(sealed_tokens, "query tokens"), "query tokens")
        same_query(tok_obj, envelope, "query tokens")
        tokens = [
            hex_bytes(t, "query token", TOKEN_BYTES) for t in field(tok_obj, "tokens", list, "query tokens")
        ]
        text = expr_obj.get("expression")
        if not isinstance(text, str):
            raise DispersError(ErrorCode.INVALID_EXPRESSION, "the target expression is missing")
        expr = parse_positional(text, len(tokens))
        sets = [self._sets.members(t) for t in tokens]
        universe = self._sets.universe() if _has_not(expr) else frozenset()
        targets = list(evaluate(expr, sets, universe))
        if len(targets) < envelope.k:
            self._replays.record(envelope.query_id)
            raise DispersError(
                ErrorCode.TOO_FEW_TARGETS,
                f"the query matches fewer than k={envelope.k} targets; refused",
            )
        self._random.shuffle(targets)
        payload = {"query_id": envelope.query_id, "pseudonyms": pack(targets, PSEUDONYM_BYTES)}
        self._replays.record(envelope.query_id)
        log.info("query %s: %d targets", envelope.query_id[:8], len(targets))
        return FoundTargets(len(targets), seal(self._t_key, dumps(payload)))
