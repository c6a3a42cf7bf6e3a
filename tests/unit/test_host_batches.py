"""T asks the hosts in turn: a batch of each, then the next of each, every item once."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dispers.protocol.target import host_batches


@given(
    st.dictionaries(st.sampled_from(["pc-0", "pc-1", "pc-2", "pc-3"]), st.integers(0, 40)), st.integers(1, 7)
)
def test_every_item_once_in_batches_the_hosts_taking_turns(sizes: dict[str, int], size: int) -> None:
    by_host = {host: [(host, i) for i in range(n)] for host, n in sizes.items()}
    jobs = host_batches(by_host, size)
    # Every item exactly once, with its own host, in batches of at most `size`.
    assert sorted(item for _, batch in jobs for item in batch) == sorted(
        x for v in by_host.values() for x in v
    )
    assert all(batch and len(batch) <= size and {h for h, _ in batch} == {host} for host, batch in jobs)
    # Turns: the k-th batch of every host comes before the (k+1)-th batch of any host.
    turn: dict[str, int] = {}
    order = []
    for host, _ in jobs:
        order.append(turn.get(host, 0))
        turn[host] = turn.get(host, 0) + 1
    assert order == sorted(order)
    # Within a host, its batches keep its order.
    for host, items in by_host.items():
        assert [x for h, b in jobs if h == host for x in b] == items
