"""DESIGN.md "Lengths are public, so they carry nothing" and invariant 7, through the real actors.

For every kind of sealed payload, inputs that differ only in values, concepts, groups or a
decision (contribute or decline, subscribe or unsubscribe) give ciphertexts of one length, and
that length is the formula of the cluster's public parameters (so a change that breaks the
padding shows here, not only a change that makes two lengths differ).

One in-process cluster per module, reused by every test: its host pc-1 holds a seeded
population plus a pool of hand-made instances that differ in every way a subscription can
(age bracket or none, sex, heart rate or not, consent, declared cohorts, id length).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.codec import dumps
from dispers.core.config import ClusterConfig, ClusterSettings
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import new_query_id
from dispers.core.messages import ContributionRequest, SubscriptionOp, request_signing_bytes
from dispers.core.spec import MAX_BOUND, MAX_BOUND_RATIO, DataRequest, GroupBy, QuerySpec
from dispers.core.vocabulary import DEFAULT_VOCABULARY
from dispers.core.wire import ContributionLayout, padded_size
from dispers.crypto import Opener, seal
from dispers.crypto.box import sealed_size
from dispers.crypto.keyfiles import read_key_file
from dispers.crypto.keys import ActorKeys, SigningKeyPair
from dispers.protocol.common import sign_payload, signed_tokens_bytes, tokens_bytes
from dispers.protocol.instance.concepts import derive_concepts
from dispers.protocol.querier import run_query
from dispers.protocol.target_finder import ATTESTATION_BYTES, PSEUDONYM_FRAME
from dispers.simulation.population import PopulationSpec, generate
from dispers.state.documents import DocumentStore, epoch_day
from dispers.transport.local import LocalCluster
from tests.integration.world import AS_OF, heart_rate_spec

FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Declared cohorts of very different lengths (the last is the longest a concept may be: 64).
COHORTS = ("cohort:a", "cohort:runners", "trial:x-42", "cohort:" + "m" * 57)
# Fifteen more 64-character cohorts: pc-2 holds instances that declare all of them.
LONG_COHORTS = tuple(f"cohort:{c * 57}" for c in "bcdefghijklnopq")
AGES = (5, 20, 30, 60, 120, 160)  # 160: in no age bracket
ID_LENGTHS = (1, 3, 12, 60, 130, 190)  # 190: about the longest an address frame holds
POOL_SIZE = 36
QUERY_CONCEPTS = (*DEFAULT_VOCABULARY, *COHORTS)


def _birth_day(age: int) -> int:
    return epoch_day(AS_OF) - int((age + 0.5) * 365.25)


@dataclass
class World:
    config: ClusterConfig
    cluster: LocalCluster
    pool: list[str]  # hand-made instances of pc-1, all subscribed

    def __repr__(self) -> str:  # keeps hypothesis' falsifying examples readable
        return f"World({self.config.path})"

    @property
    def settings(self) -> ClusterSettings:
        return self.config.settings

    def keys(self, name: str) -> ActorKeys:
        key_file = self.config.local_for(name).key_file
        assert key_file is not None
        return read_key_file(key_file)


def _write_pool(store: DocumentStore) -> list[str]:
    """Instances that differ in every way a subscription or a contribution can."""
    rng = random.Random(20261101)
    ids: list[str] = []
    for i in range(POOL_SIZE):
        base = f"{i:x}" if i < 16 else f"v{i:02d}"
        iid = base + "x" * max(0, ID_LENGTHS[i % len(ID_LENGTHS)] - len(base))
        age = AGES[(i // 2) % len(AGES)]
        store.add_instances([iid], [_birth_day(age)], ["F" if i % 3 else "M"], [i % 7 != 6])
        kind = i % 4  # recent heart rate, only an old one, none, a dense recent history
        if kind in (0, 3):
            n = 3 if kind == 0 else 25
            days = [epoch_day(AS_OF) - rng.randrange(0, 28) for _ in range(n)]
            store.add_heart_rates([iid] * n, days, [rng.uniform(45, 140) for _ in range(n)])
        elif kind == 1:
            store.add_heart_rates([iid], [epoch_day(AS_OF) - 200], [66.0])
        declared = rng.sample(COHORTS, rng.randrange(0, len(COHORTS) + 1))
        if declared:
            store.declare_concepts([iid] * len(declared), declared)
        ids.append(iid)
    return ids


def _write_long_cohort_instances(store: DocumentStore) -> None:
    """pc-2: two instances declaring fifteen 64-character cohorts; only their own data differ.

    "fits" is 30, measured, in an age bracket; "overflow" is 160 (no bracket) and has no heart
    rate, so its concept list holds one more long cohort instead of two short concepts.
    """
    store.add_instances(["fits", "overflow"], [_birth_day(30), _birth_day(160)], ["F", "F"], [True, True])
    store.add_heart_rates(["fits"], [epoch_day(AS_OF) - 3], [70.0])
    for iid in ("fits", "overflow"):
        store.declare_concepts([iid] * len(LONG_COHORTS), list(LONG_COHORTS))


def _make_world(directory: Path, *, n: int, seed: int) -> World:
    config = write_cluster(
        directory,
        ClusterLayout(
            hosts=("pc-1", "pc-2"), k_min=5, batch_size=128, host_as_of=AS_OF,
            cohorts=(*COHORTS, *LONG_COHORTS), dp=False,
        ),
    )  # fmt: skip
    documents = {h: config.local_for(h).documents for h in ("pc-1", "pc-2")}
    assert all(d is not None for d in documents.values())
    with DocumentStore(documents["pc-1"]) as store:  # type: ignore[arg-type]
        generate(PopulationSpec(n_instances=n, seed=seed, as_of=AS_OF)).write(store)
        pool = _write_pool(store)
    with DocumentStore(documents["pc-2"]) as store:  # type: ignore[arg-type]
        _write_long_cohort_instances(store)
    cluster = LocalCluster.from_config(config)
    assert cluster.host_admin("pc-1").subscribe_all(SubscriptionOp.SUBSCRIBE) == n + POOL_SIZE
    return World(config, cluster, pool)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = _make_world(Path(tmp_path_factory.mktemp("lengths")), n=300, seed=11)
    yield w
    w.cluster.close()


@pytest.fixture(scope="module")
def other_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Another population (another seed and size): other values, other group sizes."""
    w = _make_world(Path(tmp_path_factory.mktemp("lengths-other")), n=120, seed=3)
    yield w
    w.cluster.close()


# --- the expected lengths: formulas of public parameters only ---------------------------------


def concepts_len(s: ClusterSettings) -> int:
    return sealed_size(padded_size(s.concepts_bytes))


def address_len(s: ClusterSettings) -> int:
    return sealed_size(padded_size(s.address_bytes))


def tokens_len(s: ClusterSettings) -> int:
    return sealed_size(padded_size(tokens_bytes(s)))


def signed_tokens_len(s: ClusterSettings) -> int:
    return sealed_size(padded_size(signed_tokens_bytes(s)))


def pseudonym_len() -> int:
    return sealed_size(padded_size(PSEUDONYM_FRAME))


def contribution_len(n_fields: int = 1) -> int:
    return sealed_size(ContributionLayout(n_fields).size)


def partial_len(s: ClusterSettings) -> int:
    return sealed_size(padded_size(s.partial_bytes))


def result_len(s: ClusterSettings) -> int:
    return sealed_size(padded_size(s.result_bytes))


def attestation_len() -> int:
    return sealed_size(padded_size(ATTESTATION_BYTES))


def test_the_formulas_are_what_the_defaults_give(world: World) -> None:
    """Pinned numbers, so a change of layout or frame is a deliberate one."""
    s = world.settings
    assert (s.concepts_bytes, s.address_bytes, s.expression_bytes) == (2048, 512, 1024)
    assert (s.request_bytes, s.spec_bytes, s.partial_bytes, s.result_bytes) == (4096, 4096, 196608, 2097152)
    assert concepts_len(s) == 2048 + 5 + 48
    assert address_len(s) == 512 + 5 + 48
    assert tokens_len(s) == 70 * s.max_concepts + 128 + 5 + 48
    assert pseudonym_len() == 160 + 5 + 48
    assert contribution_len() == 22 + 8 + 48
    assert attestation_len() == 512 + 5 + 48


# --- subscriptions ----------------------------------------------------------------------------


def test_the_pool_differs_in_every_way_a_subscription_can(world: World) -> None:
    host = world.cluster.hosts["pc-1"]
    rows = derive_concepts(host._store, world.pool, AS_OF)
    sets = {tuple(r) for r in rows}
    assert len(sets) >= 12
    assert {len(r) for r in rows} >= {2, 3, 4, 5, 6, 7}
    assert any(not any(c.startswith("age:") for c in r) for r in rows)  # no age bracket
    assert any("has:heart_rate" in r for r in rows) and any("has:heart_rate" not in r for r in rows)
    assert {len(i) for i in world.pool} >= set(ID_LENGTHS) - {1}


pool_ids = st.integers(min_value=0, max_value=POOL_SIZE - 1)
ops = st.sampled_from(SubscriptionOp)


@FEW
@given(picks=st.lists(pool_ids, min_size=1, max_size=6), op=ops, other_op=ops)
def test_subscription_items_have_one_length(world: World, picks: list[int], op: Any, other_op: Any) -> None:
    host = world.cluster.hosts["pc-1"]
    ids = [world.pool[i] for i in picks]
    items = [
        *host.subscription_batch(op, ids).items,
        *host.subscription_batch(other_op, list(reversed(ids))).items,
    ]
    s = world.settings
    assert {len(i.sealed_concepts) for i in items} == {concepts_len(s)}
    assert {len(i.sealed_address) for i in items} == {address_len(s)}


def _drop(world: World, batch_id: str) -> None:
    world.cluster.ci.settle("conductor", batch_id, False)  # type: ignore[union-attr]
    world.cluster.t.settle("conductor", batch_id, False)  # type: ignore[union-attr]


@FEW
@given(picks=st.lists(pool_ids, min_size=1, max_size=6), op=ops)
def test_ci_token_items_and_t_pseudonym_items_have_one_length(
    world: World, picks: list[int], op: Any
) -> None:
    host, ci, t = world.cluster.hosts["pc-1"], world.cluster.ci, world.cluster.t
    assert ci is not None and t is not None
    batch = host.subscription_batch(op, [world.pool[i] for i in picks])
    try:
        tokens = ci.tokenize_subscriptions(
            "conductor", batch.header.batch_id, batch.header.op, [i.sealed_concepts for i in batch.items]
        )
        pseudonyms = t.pseudonymize("conductor", batch.header, [i.sealed_address for i in batch.items])
    finally:
        _drop(world, batch.header.batch_id)
    assert {len(x) for x in tokens.items} == {tokens_len(world.settings)}
    assert {len(x) for x in pseudonyms.items} == {pseudonym_len()}


def test_token_items_of_no_concepts_and_of_many_have_one_length(world: World) -> None:
    """Unsubscribing (no concepts) and the richest instance of the pool alike."""
    host, ci = world.cluster.hosts["pc-1"], world.cluster.ci
    assert ci is not None
    rows = derive_concepts(host._store, world.pool, AS_OF)
    richest = max(range(POOL_SIZE), key=lambda i: len(rows[i]))
    lengths = set()
    for op in SubscriptionOp:
        batch = host.subscription_batch(op, [world.pool[richest]])
        try:
            signed = ci.tokenize_subscriptions(
                "conductor", batch.header.batch_id, batch.header.op, [batch.items[0].sealed_concepts]
            )
        finally:
            _drop(world, batch.header.batch_id)
        lengths |= {len(x) for x in signed.items}
    assert lengths == {tokens_len(world.settings)}


def test_every_instance_concept_list_fits_its_frame(world: World) -> None:
    """Whether an instance can subscribe at all must not depend on its own data either.

    Both pc-2 instances declare the same fifteen 64-character cohorts of the vocabulary; they
    differ only in age and in having a heart rate. The host keeps at most max_concepts of them,
    but nothing ensures max_concepts concepts of the longest allowed length fit concepts_bytes:
    the first gets its fixed-length box, the second (no age bracket, no heart rate) is refused
    MALFORMED, and with it the whole batch of its host.
    """
    host = world.cluster.hosts["pc-2"]
    lengths = {}
    for iid in ("fits", "overflow"):
        try:
            lengths[iid] = len(
                host.subscription_batch(SubscriptionOp.SUBSCRIBE, [iid]).items[0].sealed_concepts
            )
        except DispersError as exc:
            lengths[iid] = f"{exc.code.value}: {exc.message}"  # type: ignore[assignment]
    assert lengths == {"fits": concepts_len(world.settings), "overflow": concepts_len(world.settings)}


# --- queries ----------------------------------------------------------------------------------


def _expressions() -> st.SearchStrategy[str]:
    leaf = st.sampled_from(QUERY_CONCEPTS)
    return st.recursive(
        leaf,
        lambda inner: st.one_of(
            st.tuples(inner, inner).map(lambda ab: f"({ab[0]} AND {ab[1]})"),
            st.tuples(inner, inner).map(lambda ab: f"({ab[0]} OR {ab[1]})"),
            inner.map(lambda a: f"NOT {a}"),
        ),
        max_leaves=12,
    )


@st.composite
def query_specs(draw: st.DrawFn) -> QuerySpec:
    """Queries differing in target, function params, grouping, bounds, stats and k."""
    target = draw(
        st.one_of(
            st.sampled_from(["age:25-50", "age:25-50 AND (sex:F OR NOT has:heart_rate)"]), _expressions()
        )
    )
    edges = draw(st.lists(st.integers(min_value=0, max_value=150), min_size=2, max_size=30, unique=True))
    lo = draw(st.integers(min_value=0, max_value=100))
    return heart_rate_spec(
        query__target=target,
        query__k=draw(st.integers(min_value=5, max_value=1000)),
        data__params={"window_days": draw(st.integers(min_value=1, max_value=3650))},
        data__group_by={"field": "age", "edges": sorted(edges)},
        aggregate__bounds=[lo, lo + draw(st.integers(min_value=1, max_value=500))],
        aggregate__stats=draw(
            st.lists(st.sampled_from(["count", "sum", "mean", "var", "std"]), min_size=1, unique=True)
        ),
    )


def test_query_parts_of_the_simplest_and_a_rich_query_have_one_length(world: World) -> None:
    querier = world.cluster.querier_object()
    simple = heart_rate_spec(query__target="age:25-50", data__group_by={"field": "age", "edges": [0, 1]})
    rich = heart_rate_spec(
        query__target="age:25-50 AND (sex:F OR NOT has:heart_rate) AND NOT (cohort:a OR cohort:runners)",
        data__group_by={"field": "age", "edges": list(range(0, 150, 3))},
        aggregate__bounds=[30.25, 219.875],
    )
    a, b = querier.build(simple), querier.build(rich)
    assert len(simple.compiled()[0]) == 1 and len(rich.compiled()[0]) == 5
    for part in ("sealed_concepts", "sealed_expression", "sealed_request"):
        assert len(getattr(a, part)) == len(getattr(b, part)), part
    assert [len(ct) for _, ct in a.sealed_specs] == [len(ct) for _, ct in b.sealed_specs]


@FEW
@given(spec=query_specs())
def test_query_envelope_parts_have_one_length(world: World, spec: QuerySpec) -> None:
    s = world.settings
    envelope = world.cluster.querier_object().build(spec)
    assert len(envelope.sealed_concepts) == sealed_size(padded_size(s.concepts_bytes))
    assert len(envelope.sealed_expression) == sealed_size(padded_size(s.expression_bytes))
    assert len(envelope.sealed_request) == sealed_size(padded_size(s.request_bytes))
    assert [name for name, _ in envelope.sealed_specs] == list(envelope.plan.members)
    assert {len(ct) for _, ct in envelope.sealed_specs} == {sealed_size(padded_size(s.spec_bytes))}


@FEW
@given(target=_expressions())
def test_the_query_token_box_has_one_length(world: World, target: str) -> None:
    ci = world.cluster.ci
    assert ci is not None
    envelope = world.cluster.querier_object().build(heart_rate_spec(query__target=target, query__k=5))
    assert len(ci.tokenize_query("conductor", envelope)) == signed_tokens_len(world.settings)


def _pseudonyms_box_len(query_id: str, count: int) -> int:
    packed = base64.b64encode(bytes(32 * count)).decode()
    signed = sign_payload(SigningKeyPair.generate(), "tf", {"query_id": query_id, "pseudonyms": packed})
    return sealed_size(len(signed))


def _find(world: World, target: str) -> Any:
    ci, tf = world.cluster.ci, world.cluster.tf
    assert ci is not None and tf is not None
    envelope = world.cluster.querier_object().build(heart_rate_spec(query__target=target, query__k=5))
    return envelope, tf.find_targets("conductor", envelope, ci.tokenize_query("conductor", envelope))


@FEW
@given(target=_expressions())
def test_tf_attestation_has_one_length_whatever_the_target_count(world: World, target: str) -> None:
    try:
        envelope, found = _find(world, target)
    except DispersError as exc:
        assert exc.code is ErrorCode.TOO_FEW_TARGETS
        return
    assert len(found.sealed_attestation) == attestation_len()
    # The pseudonym box to T is not padded: its length is a function of the target count
    # alone, a number the Conductor is told anyway (FoundTargets.count), never of who.
    assert len(found.sealed_pseudonyms) == _pseudonyms_box_len(envelope.query_id, found.count)


def test_attestations_of_very_different_target_counts_have_one_length(world: World) -> None:
    counts, lengths = set(), set()
    for target in (
        "age:12-25",
        "age:50-100",
        "sex:F",
        "NOT age:0-12",
        "has:heart_rate OR NOT has:heart_rate",
    ):
        _, found = _find(world, target)
        counts.add(found.count)
        lengths.add(len(found.sealed_attestation))
    assert len(counts) == 5 and lengths == {attestation_len()}


# --- contributions and declines ---------------------------------------------------------------


def _contribution_request(
    world: World, ids: list[str], aggregators: list[str], edges: list[int], window: int
) -> ContributionRequest:
    data = DataRequest(
        query_id=new_query_id(),
        function="mean_heart_rate",
        params={"window_days": window},
        as_of=AS_OF,
        group_by=GroupBy("age", tuple(float(e) for e in edges)),
        aggregators=("da-1", "da-2"),
        issued_at=time.time(),
    )
    raw = dumps(data.to_obj())
    return ContributionRequest(
        query_id=data.query_id,
        querier="researcher",
        request=raw,
        request_signature=world.keys("researcher").signing.sign(request_signing_bytes(raw)),
        instance_ids=tuple(ids),
        aggregators=tuple(aggregators),
    )


@FEW
@given(
    picks=st.lists(st.one_of(pool_ids, st.integers(min_value=100, max_value=399)), min_size=1, max_size=40),
    leaves=st.data(),
    edges=st.lists(st.integers(min_value=0, max_value=150), min_size=2, max_size=12, unique=True),
    window=st.integers(min_value=1, max_value=3650),
)
def test_contributions_and_declines_have_one_length(
    world: World, picks: list[int], leaves: st.DataObject, edges: list[int], window: int
) -> None:
    """Pool instances (contributing, not consenting, no value, outside every group), generated
    ones, repeats (the second answer is a decline): every item is one fixed-length box."""
    generated = [i for i in world.cluster.hosts["pc-1"]._store.instance_ids() if i.startswith("pc-1-i")]
    ids = [world.pool[i] if i < POOL_SIZE else generated[i - 100] for i in picks]
    aggregators = leaves.draw(
        st.lists(st.sampled_from(["da-1", "da-2"]), min_size=len(ids), max_size=len(ids))
    )
    request = _contribution_request(world, ids, aggregators, sorted(edges), window)
    batch = world.cluster.hosts["pc-1"].contribute("t", request)
    assert len(batch.ciphertexts) == len(ids)
    assert sorted(batch.aggregators) == sorted(aggregators)
    assert {len(ct) for ct in batch.ciphertexts} == {contribution_len()}


def test_one_batch_holds_contributions_and_declines_of_one_length(world: World) -> None:
    """The property above is not vacuous: a batch mixes both, and only the DA tells them apart."""
    ids = [*world.pool, world.pool[0], world.pool[3]]  # two repeats: declines
    request = _contribution_request(world, ids, ["da-1"] * len(ids), [0, 50, 100, 150], 30)
    batch = world.cluster.hosts["pc-1"].contribute("t", request)
    opener = Opener("da-1", world.keys("da-1").sealing)
    layout = ContributionLayout(1)
    records = [layout.decode(opener.open(ct, "contribution")) for ct in batch.ciphertexts]
    declined = sum(r.declined for r in records)
    assert 0 < declined < len(records)
    assert len({r.group for r in records if not r.declined}) >= 2
    assert {len(ct) for ct in batch.ciphertexts} == {contribution_len()}


# --- partials and results ---------------------------------------------------------------------


def _run_capturing(w: World, spec: QuerySpec) -> tuple[Any, dict[str, list[bytes]]]:
    """Run a real query; keep what every DA's finalize sealed (leaf partials, the root's result)."""
    captured: dict[str, list[bytes]] = {}
    for name, da in w.cluster.das.items():

        def wrapper(
            caller: str, query_id: str, _orig: Callable[..., bytes] = da.finalize, _n: str = name
        ) -> bytes:
            out = _orig(caller, query_id)
            captured.setdefault(_n, []).append(out)
            return out

        da.finalize = wrapper  # type: ignore[method-assign]
    try:
        outcome = run_query(w.cluster.querier(), spec, timeout_s=60)
    finally:
        for da in w.cluster.das.values():
            del da.finalize
    return outcome, captured


RUNS: list[dict[str, Any]] = [
    {},  # every group released
    {"query__k": 40},  # the youngest group suppressed
    {"query__k": 60, "data__group_by": {"field": "age", "edges": [0, 12, 25, 50, 100, 150]}},
    {"aggregate__bounds": [60, 80]},  # values dropped out of bounds
    {"data__params": {"window_days": 3}, "query__target": "sex:F"},  # few values, most declines
    {
        "data__params": {"window_days": 365},
        "data__group_by": {"field": "age", "edges": list(range(0, 101, 5))},
    },
]


@pytest.mark.parametrize("which", ["world", "other_world"])
def test_partials_and_results_of_real_queries_have_one_length(
    which: str, request: pytest.FixtureRequest
) -> None:
    w: World = request.getfixturevalue(which)
    s = w.settings
    conductor = w.cluster.conductor_actor
    assert conductor is not None
    suppressed, released = 0, 0
    for overrides in RUNS:
        outcome, captured = _run_capturing(w, heart_rate_spec(**overrides))
        assert outcome.record.state == "done", (overrides, outcome.record)
        assert outcome.result is not None
        suppressed += sum(g.suppressed for g in outcome.result.groups)
        released += sum(not g.suppressed for g in outcome.result.groups)
        leaves = w.config.roster.da_plan().leaves
        assert sorted(captured) == sorted([*leaves, "da-root"])
        assert {len(p) for leaf in leaves for p in captured[leaf]} == {partial_len(s)}, overrides
        assert [len(r) for r in captured["da-root"]] == [result_len(s)], overrides
        sealed_result = conductor.record(outcome.record.query_id).sealed_result
        assert sealed_result is not None and sealed_result == captured["da-root"][0]
    assert suppressed > 0 and released > 0  # both kinds of group were exercised


def test_the_two_populations_differ(world: World, other_world: World) -> None:
    a, _ = _run_capturing(world, heart_rate_spec())
    b, _ = _run_capturing(other_world, heart_rate_spec())
    assert a.result is not None and b.result is not None
    assert [dict(g.values) for g in a.result.groups] != [dict(g.values) for g in b.result.groups]


@FEW
@given(spec=query_specs())
def test_partials_and_results_of_random_queries_have_one_length(world: World, spec: QuerySpec) -> None:
    outcome, captured = _run_capturing(world, spec)
    if outcome.record.state == "refused":  # fewer than k targets: nothing was sealed
        assert not captured
        return
    assert outcome.record.state == "done", outcome.record
    s = world.settings
    for name, sealed in captured.items():
        want = result_len(s) if name == "da-root" else partial_len(s)
        assert {len(x) for x in sealed} == {want}, name


def _leaf_partial(w: World, spec: QuerySpec, contributions: list[tuple[int, float]]) -> bytes:
    """Prepare da-1 for a real query, ingest these (group, value) items as T would, finalize."""
    da = w.cluster.das["da-1"]
    envelope = w.cluster.querier_object().build(spec)
    qid = envelope.query_id
    da.prepare("conductor", envelope)
    try:
        key = w.config.roster.get("da-1").sealing_key
        layout = ContributionLayout(1)
        da.ingest("t", qid, [seal(key, layout.encode(qid, g, [v])) for g, v in contributions])
        da.end_ingest("t", qid, len(contributions))
        return da.finalize("conductor", qid)
    finally:
        da.abort("conductor", qid)


@st.composite
def bounded_contributions(draw: st.DrawFn) -> tuple[tuple[float, float], list[tuple[int, float]]]:
    # Every bound a query may declare (a spec is refused beyond ±MAX_BOUND).
    finite = st.floats(min_value=-MAX_BOUND, max_value=MAX_BOUND)
    landmarks = st.sampled_from([-MAX_BOUND, -1e12, -1.0, 0.0, 30.0, 220.0, 1e12, MAX_BOUND])
    lo, hi = sorted(draw(st.lists(st.one_of(landmarks, finite), min_size=2, max_size=2, unique=True)))
    # Bounds too narrow for their magnitude are refused (float rounding would beat the noise).
    assume(max(abs(lo), abs(hi)) <= MAX_BOUND_RATIO * (hi - lo))
    value = st.one_of(st.sampled_from([lo, hi]), st.floats(min_value=lo, max_value=hi))
    items = draw(st.lists(st.tuples(st.integers(min_value=0, max_value=1), value), min_size=0, max_size=20))
    return (lo, hi), items


@FEW
@example(case=((0.0, MAX_BOUND), [(0, 70.0), (0, MAX_BOUND)]))
@example(case=((-MAX_BOUND, MAX_BOUND), [(0, -MAX_BOUND), (0, MAX_BOUND), (1, MAX_BOUND)]))
@given(case=bounded_contributions())
def test_a_leaf_partial_has_its_fixed_length_for_any_values_within_the_bounds(
    world: World, case: tuple[tuple[float, float], list[tuple[int, float]]]
) -> None:
    """Any values the declared bounds admit give the leaf's partial, at its one length.

    Bounds are the querier's public choice and the DA checks every value against them; what is
    inside must not decide whether a partial can be sealed (a failure is seen by the Conductor,
    and one contribution must never fail a query: invariant 6).
    """
    (lo, hi), items = case
    spec = heart_rate_spec(aggregate__bounds=[lo, hi], data__group_by={"field": "age", "edges": [0, 50, 100]})
    assert len(_leaf_partial(world, spec, items)) == partial_len(world.settings)


@pytest.mark.parametrize("bounds", [[0, 1e300], [-1e16, 0]])
def test_bounds_whose_statistics_could_overflow_are_refused(bounds: list[float]) -> None:
    """Found by the property above: a value of 1e200 within bounds [0, 1e300] overflowed the
    partial's sum of squares (nan) and failed the whole query. Such bounds are now refused."""
    with pytest.raises(DispersError, match="bounds must lie within"):
        heart_rate_spec(aggregate__bounds=bounds)


def test_one_group_or_many_empty_or_full_the_partial_has_one_length(world: World) -> None:
    rng = np.random.default_rng(4)
    lengths = set()
    most = list(range(0, world.settings.max_groups + 1))  # max_groups groups
    for edges, n in (([0, 1], 0), ([0, 1], 50), (most, 0), (most, 120)):
        spec = heart_rate_spec(data__group_by={"field": "age", "edges": edges})
        groups = rng.integers(0, len(edges) - 1, n).tolist()
        values = rng.uniform(30, 220, n).tolist()
        lengths.add(len(_leaf_partial(world, spec, list(zip(groups, values, strict=True)))))
    assert lengths == {partial_len(world.settings)}


def test_the_clock_does_not_matter(world: World) -> None:
    """Ids, timestamps and nonces are fixed-width: a later query's parts are as long."""
    querier = world.cluster.querier_object()
    a = querier.build(heart_rate_spec())
    b = querier.build(dataclasses.replace(heart_rate_spec(), as_of=AS_OF + dt.timedelta(days=400)))
    assert len(a.sealed_request) == len(b.sealed_request)


def test_the_frames_hold_the_largest_partial_and_result_of_max_groups() -> None:
    """Found by review: with ~250 groups the result's size depended on how many groups were
    released (one more contributor could fail the query). Queries are capped at max_groups,
    and every actor checks at start that partial_bytes and result_bytes hold the worst case."""
    import dataclasses

    from dispers.core.config import ClusterSettings
    from dispers.core.errors import ErrorCode
    from dispers.core.spec import MAX_QUANTILES
    from dispers.protocol.aggregation.partial import worst_case_sizes
    from dispers.protocol.assemble import check_frames

    defaults = ClusterSettings()
    partial, result = worst_case_sizes(defaults.max_groups, defaults.max_bins, MAX_QUANTILES)
    assert partial <= defaults.partial_bytes and result <= defaults.result_bytes
    check_frames(defaults)
    with pytest.raises(DispersError) as info:
        check_frames(dataclasses.replace(defaults, max_groups=400))
    assert info.value.code is ErrorCode.CONFIG and "_bytes must be at least" in info.value.message


def test_a_query_of_more_than_max_groups_is_refused_before_it_is_sealed(world: World) -> None:
    querier = world.cluster.querier_object()
    edges = list(range(0, world.settings.max_groups + 2))
    with pytest.raises(DispersError, match="at most .* groups"):
        querier.build(heart_rate_spec(data__group_by={"field": "age", "edges": edges}))
