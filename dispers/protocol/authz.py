"""Who may call what: one table, read by one check that every operation calls first.

DESIGN.md "Keys, identities, who may call what" and invariant 8. The caller's name comes from
its TLS certificate over gRPC and is passed explicitly by the in-process transport; it must be
an actor of the roster, of a role this table allows for the operation. `SELF` marks
operations only the actor itself may call (its own operator's CLI acting under its identity).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from dispers.core.config import Roster, RosterEntry
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role

SELF: Final = "self"
ANY_MEMBER: Final = frozenset(Role)

Allowed = frozenset[Role] | str

AUTHORIZATION: Mapping[str, Allowed] = MappingProxyType(
    {
        "conductor.get_roster": ANY_MEMBER,
        "conductor.get_vocabulary": ANY_MEMBER,
        "conductor.subscribe": frozenset({Role.PERSONAL_CLOUD}),
        "conductor.submit": frozenset({Role.QUERIER}),
        "conductor.status": frozenset({Role.QUERIER}),  # and only the querier who submitted it
        "concept_indexor.tokenize_subscriptions": frozenset({Role.CONDUCTOR}),
        "concept_indexor.tokenize_query": frozenset({Role.CONDUCTOR}),
        "concept_indexor.settle": frozenset({Role.CONDUCTOR}),
        "target_finder.apply_subscriptions": frozenset({Role.CONDUCTOR}),
        "target_finder.find_targets": frozenset({Role.CONDUCTOR}),
        "target.pseudonymize": frozenset({Role.CONDUCTOR}),
        "target.collect": frozenset({Role.CONDUCTOR}),
        "target.settle": frozenset({Role.CONDUCTOR}),
        "data_aggregator.prepare": frozenset({Role.CONDUCTOR}),
        "data_aggregator.ingest": frozenset({Role.TARGET}),
        "data_aggregator.end_ingest": frozenset({Role.TARGET}),
        "data_aggregator.absorb": frozenset({Role.CONDUCTOR}),
        "data_aggregator.finalize": frozenset({Role.CONDUCTOR}),
        "data_aggregator.abort": frozenset({Role.CONDUCTOR}),
        "data_aggregator.budget": frozenset({Role.QUERIER}),  # and only its own
        "personal_cloud.contribute": frozenset({Role.TARGET}),
        "personal_cloud.subscribe_all": SELF,
        "querier.submit": SELF,
        "querier.outcome": SELF,
        "health.check": ANY_MEMBER,  # which actor serves here: public roster facts only
        # federated training (dispers.protocol.learning): a round is a query of its own kind
        "conductor.submit_round": frozenset({Role.QUERIER}),
        "target.collect_round": frozenset({Role.CONDUCTOR}),
        "data_aggregator.prepare_round": frozenset({Role.CONDUCTOR}),
        "data_aggregator.ingest_round": frozenset({Role.TARGET}),
        "data_aggregator.end_round_ingest": frozenset({Role.TARGET}),
        "data_aggregator.absorb_round": frozenset({Role.CONDUCTOR}),
        "data_aggregator.finalize_round": frozenset({Role.CONDUCTOR}),
        "data_aggregator.abort_round": frozenset({Role.CONDUCTOR}),
        "personal_cloud.train": frozenset({Role.TARGET}),
        "querier.submit_round": SELF,
        "querier.round_outcome": SELF,
    }
)


def authorize(roster: Roster, caller: str, operation: str, *, callee: str) -> RosterEntry:
    """Check `caller` may call `operation` on actor `callee`; return the caller's roster entry.

    UNAUTHORIZED names the operation, never anything the caller sent beyond its name.
    """
    allowed = AUTHORIZATION.get(operation)
    if allowed is None:  # a programming error: every operation has a row
        raise DispersError(ErrorCode.INTERNAL, f"operation {operation!r} has no authorization rule")
    shown = repr(caller[:64]) if isinstance(caller, str) and caller else "an unauthenticated caller"
    entry = None
    if isinstance(caller, str) and caller:
        try:
            entry = roster.get(caller)
        except DispersError:
            entry = None
    if entry is None:
        raise DispersError(ErrorCode.UNAUTHORIZED, f"{shown} is not an actor of this cluster")
    ok = entry.name == callee if allowed == SELF else entry.role in allowed
    if not ok:
        raise DispersError(ErrorCode.UNAUTHORIZED, f"{shown} may not call {operation}")
    return entry
