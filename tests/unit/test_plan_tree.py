"""Aggregator trees planned from the roster: the leaves asked, no DA over its fan-out, as
shallow as the fan-out allows, the root kept, every DA at most once."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispers.core.config import Roster, RosterEntry
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.crypto.keys import SealingKeyPair, SigningKeyPair

_SEAL = SealingKeyPair.generate().public
_VERIFY = SigningKeyPair.generate().verify_key


def roster(n_das: int) -> Roster:
    """A root and n_das other aggregators (declared under the root), plus a querier."""
    entries = [RosterEntry("da-root", Role.DATA_AGGREGATOR, "x:1", _SEAL, _VERIFY)]
    entries += [
        RosterEntry(f"da-{i}", Role.DATA_AGGREGATOR, "x:1", _SEAL, _VERIFY, parent="da-root")
        for i in range(n_das)
    ]
    entries.append(RosterEntry("researcher", Role.QUERIER, "x:1", _SEAL, _VERIFY))
    return Roster(tuple(entries))


@given(
    leaves=st.integers(min_value=1, max_value=60),
    fan_out=st.integers(min_value=2, max_value=9),
    spare=st.integers(min_value=0, max_value=5),
)
def test_planned_trees_have_the_asked_shape(leaves: int, fan_out: int, spare: int) -> None:
    needed, size = 0, leaves
    while True:
        needed += size
        if size <= fan_out:
            break
        size = math.ceil(size / fan_out)
    r = roster(needed + spare)
    plan = r.plan_tree(leaves, fan_out)
    r.check_plan(plan)
    assert plan.root == "da-root" and len(plan.leaves) == leaves
    assert len(plan.members) == needed + 1 and len(set(plan.members)) == len(plan.members)
    assert all(len(plan.children(m)) <= fan_out for m in plan.members)
    # As shallow as the fan-out allows: depth = 1 + ceil(log_fanout(leaves)) layers, root included.
    depth = 1
    while fan_out ** (depth - 1) < leaves:
        depth += 1
    assert len(plan.layers()) == max(depth, 2)
    # Every leaf is at the bottom layer: partials all travel the same number of hops.
    assert set(plan.layers()[0]) == set(plan.leaves)
    with pytest.raises(DispersError) as info:
        roster(needed - 1).plan_tree(leaves, fan_out)
    assert info.value.code is ErrorCode.MALFORMED and f"need {needed} aggregators" in info.value.message
