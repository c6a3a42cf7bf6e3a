"""Adversarial tests over the real gRPC services: DESIGN.md's threat model, attack by attack.

Each test plays one attacker named in its docstring — an outsider on the network, a roster member
calling what it may not, a malicious Conductor, a malicious host, a curious querier — and checks
the exact refusal, that nothing changed where nothing should, and that honest results still
equal the ground truth computed directly from the population (invariants 6-10).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import math
import os
import secrets
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.codec import dumps, loads_object
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role, new_query_id
from dispers.core.messages import (
    ContributionBatch,
    ContributionRequest,
    SignedItems,
    SubscriptionBatch,
    SubscriptionItem,
    SubscriptionOp,
    receipt_bytes,
)
from dispers.core.spec import DataRequest, QueryResult, QuerySpec
from dispers.core.wire import ContributionLayout
from dispers.crypto import Opener, seal
from dispers.crypto.box import sealed_size
from dispers.crypto.tls import TlsIdentity, issue_cert, make_ca
from dispers.proto import conductor_pb2, data_aggregator_pb2, personal_cloud_pb2
from dispers.protocol.api import QueryOutcome
from dispers.protocol.common import seal_padded, seal_signed
from dispers.protocol.instance.concepts import derive_concepts
from dispers.protocol.querier import run_query
from dispers.protocol.target_finder import ATTESTATION_BYTES
from dispers.simulation.ground_truth import GroupTruth, mean_heart_rate_by_age
from dispers.simulation.population import PopulationSpec, generate
from dispers.state.documents import DocumentStore, epoch_day
from dispers.transport import convert
from dispers.transport.grpc_client import (
    ConductorClient,
    PersonalCloudClient,
    QuerierClient,
    client_for,
    open_channel,
)
from tests.integration.conftest import World, grpc_world
from tests.integration.test_bad_input import _contribution_request, signed_batch
from tests.integration.world import AS_OF, Canaries, Setup, heart_rate_spec, make_setup

Contribute = Callable[[str, ContributionRequest], ContributionBatch]
EDGES = (12, 25, 50, 100)
BOUNDS = (30.0, 220.0)
STATS = ("count", "sum", "mean", "var", "std", "min", "max")
FINAL = ("done", "refused", "failed")
SERVICE = {
    Role.CONDUCTOR: "Conductor",
    Role.CONCEPT_INDEXOR: "ConceptIndexor",
    Role.TARGET_FINDER: "TargetFinder",
    Role.TARGET: "Target",
    Role.DATA_AGGREGATOR: "DataAggregator",
    Role.PERSONAL_CLOUD: "PersonalCloud",
    Role.QUERIER: "Querier",
}


# --- worlds ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """One subscribed cluster for the tests that leave no lasting state behind (monkeypatches
    are undone at each test's teardown; every query gets its own id)."""
    w = grpc_world(make_setup(Path(tmp_path_factory.mktemp("attacks")), n=300))
    try:
        assert w.subscribe() == 300
        yield w
    finally:
        w.close()


@contextlib.contextmanager
def fresh_world(directory: Path, **kwargs: Any) -> Iterator[World]:
    """A cluster of its own, for a test that changes memberships or the directory."""
    w = grpc_world(make_setup(directory, **kwargs))
    try:
        yield w
    finally:
        w.close()


def two_querier_setup(directory: Path, *, n: int) -> Setup:
    """make_setup's cluster with a second, rival querier on the roster."""
    config = write_cluster(
        directory,
        ClusterLayout(
            k_min=5,
            backend="sqlite",
            host_as_of=AS_OF,
            batch_size=128,
            queriers=("researcher", "rival"),
            dp=False,
        ),
    )
    pop = generate(PopulationSpec(n_instances=n, seed=11, as_of=AS_OF))
    documents = config.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        pop.write(store)
    return Setup(directory, config, pop, None)


# --- ground truth -----------------------------------------------------------------------------------


def truth(
    world: World,
    *,
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
    edges: Sequence[float] = EDGES,
) -> dict[str, GroupTruth]:
    """The exact per-group statistics over the honest instances (excluded ones as if they declined)."""
    pop = world.setup.population
    ids = np.asarray(pop.instance_ids, dtype=object)
    keep = ~np.isin(ids, np.asarray(list(exclude), dtype=object))
    if only is not None:
        keep &= np.isin(ids, np.asarray(list(only), dtype=object))
    honest = dataclasses.replace(pop, consent=pop.consent & keep)
    return mean_heart_rate_by_age(honest, edges=edges, window_days=30, as_of=AS_OF, bounds=BOUNDS)


def assert_equals_truth(result: QueryResult, expected: dict[str, GroupTruth]) -> None:
    """Released groups equal the ground truth exactly; groups under k are suppressed, no numbers."""
    assert {g.label for g in result.groups} == set(expected)
    for g in result.groups:
        t = expected[g.label]
        if t.count < result.k:
            assert g.suppressed and dict(g.values) == {}, g
            continue
        assert not g.suppressed, g
        assert g.values["count"] == t.count, (g.label, g.values["count"], t.count)
        for stat in STATS[1:]:
            value = g.values[stat]
            assert value is not None
            assert math.isclose(value, getattr(t, stat), rel_tol=1e-9, abs_tol=1e-9), (g.label, stat)
    released = sum(t.count for t in expected.values() if t.count >= result.k)
    assert result.contributions == released


def wait_outcome(world: World, query_id: str, timeout_s: float = 120.0) -> QueryOutcome:
    """Poll the querier until the query ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = world.querier.outcome(query_id, wait_s=min(30.0, max(0.0, deadline - time.monotonic())))
        if outcome.record.state in FINAL or time.monotonic() >= deadline:
            return outcome
        time.sleep(0.05)


def honest_query(world: World, spec: QuerySpec | None = None, **truth_kwargs: Any) -> QueryOutcome:
    """The heart-rate query, run as the researcher: done, and equal to the ground truth."""
    outcome = run_query(world.querier, spec or heart_rate_spec(), timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    assert outcome.result is not None
    edges = spec.group_by.edges if spec is not None and spec.group_by else EDGES
    assert_equals_truth(outcome.result, truth(world, edges=edges, **truth_kwargs))
    return outcome


def eligible_ids(world: World) -> list[str]:
    """Instances that would contribute to the heart-rate query: consent and a value in the window."""
    pop = world.setup.population
    end = epoch_day(AS_OF)
    recent = (pop.hr_day > end - 30) & (pop.hr_day <= end)
    has = np.bincount(pop.hr_owner[recent], minlength=pop.n_instances) > 0
    return [i for i, ok in zip(pop.instance_ids, (pop.consent & has).tolist(), strict=True) if ok]


# --- calls with any identity -------------------------------------------------------------------------


def raw(
    world: World,
    actor: str,
    method: str,
    request: bytes,
    *,
    caller: str | None = None,
    identity: TlsIdentity | None = None,
    timeout_s: float = 30.0,
) -> tuple[grpc.StatusCode, str, bytes]:
    """Call `actor`'s `method` with raw request bytes, under a roster member's certificate
    (`caller`) or any other TLS identity; returns (status, details, response bytes)."""
    entry = world.setup.config.roster.get(actor)
    ident = identity if identity is not None else world.setup.config.tls_identity(caller or "")
    with open_channel(entry.endpoint, identity=ident, server_name=actor) as channel:
        call = channel.unary_unary(f"/dispers.proto.{SERVICE[entry.role]}/{method}")
        try:
            response = call(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            return exc.code(), str(exc.details()), b""
    return grpc.StatusCode.OK, "", bytes(response)


def ingest_request(query_id: str, ciphertexts: Sequence[bytes]) -> bytes:
    return data_aggregator_pb2.IngestRequest(
        query_id=query_id, ciphertexts=list(ciphertexts)
    ).SerializeToString()


def refused(fn: Callable[..., object], *args: Any) -> DispersError:
    """The DispersError `fn(*args)` raised (it must raise one)."""
    with pytest.raises(DispersError) as info:
        fn(*args)
    return info.value


def ca_key(world: World) -> bytes:
    return (world.setup.directory / "keys" / "ca.tls.key").read_bytes()


def ca_pem(world: World) -> bytes:
    identity = world.setup.config.tls_identity("researcher")
    assert identity is not None
    return identity.ca_pem


# --- a host held in the middle of a query -----------------------------------------------------------


class HeldHost:
    """Blocks the host's Contribute until released: the query stays running, DAs prepared."""

    def __init__(self, world: World, host: str = "pc-1") -> None:
        self._host = world.actors[host]
        self._original: Contribute = self._host.contribute
        self.entered = threading.Event()
        self._release = threading.Event()

    def __enter__(self) -> HeldHost:
        original, entered, release = self._original, self.entered, self._release

        def held(caller: str, request: ContributionRequest) -> ContributionBatch:
            entered.set()
            release.wait(timeout=90)
            return original(caller, request)

        self._host.contribute = held
        return self

    def wait_entered(self) -> None:
        assert self.entered.wait(timeout=30), "the query never reached the host"

    def release(self) -> None:
        self._release.set()

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._host.contribute = self._original


def membership(world: World) -> tuple[frozenset[bytes], int]:
    """TF's universe and the size of T's directory."""
    return world.actors["tf"]._sets.universe(), len(world.actors["t"]._directory)


def pseudonym_of(world: World, instance_id: str) -> bytes:
    pseudonym: bytes = world.actors["t"].pseudonym(world.actors["pc-1"].address(instance_id))
    return pseudonym


def item(world: World, concepts: list[str], address: str) -> SubscriptionItem:
    """One subscription item sealed by hand, padded as a host pads it."""
    roster, settings = world.setup.config.roster, world.setup.config.settings
    nonce = secrets.token_hex(16)
    return SubscriptionItem(
        sealed_concepts=seal_padded(
            roster.one(Role.CONCEPT_INDEXOR).sealing_key,
            {"concepts": concepts, "nonce": nonce},
            settings.concepts_bytes,
            "concepts",
        ),
        sealed_address=seal_padded(
            roster.one(Role.TARGET).sealing_key,
            {"address": address, "nonce": nonce},
            settings.address_bytes,
            "address",
        ),
    )


# --- 1. forged ingest ---------------------------------------------------------------------------------


def test_forged_ingest_cannot_reach_a_data_aggregator(world: World) -> None:
    """Attack (outsider, then roster members that are not T): the original attack sealed 1,000
    low values to da-1 — anyone can, its key is public — and called Ingest during a running
    query to drag the mean down. Without a cluster certificate the connection fails; with
    another CA's certificate too; a real-CA certificate naming no actor, the researcher's and
    the host's are refused with UNAUTHORIZED. The released mean equals the ground truth."""
    config = world.setup.config
    da1 = config.roster.get("da-1")
    spec = heart_rate_spec()
    with HeldHost(world) as held:
        query_id = world.querier.submit(spec)
        held.wait_entered()
        layout = ContributionLayout(1)
        forged = [seal(da1.sealing_key, layout.encode(query_id, i % 3, [31.0])) for i in range(1000)]
        size = config.settings.batch_size
        chunks = [forged[i : i + size] for i in range(0, len(forged), size)]

        # No client certificate at all (plain TCP, then TLS without a certificate).
        with grpc.insecure_channel(da1.endpoint) as channel, pytest.raises(grpc.RpcError) as plain:
            channel.unary_unary("/dispers.proto.DataAggregator/Ingest")(
                ingest_request(query_id, chunks[0]), timeout=10
            )
        assert plain.value.code() is grpc.StatusCode.UNAVAILABLE
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem(world))
        with (
            grpc.secure_channel(
                da1.endpoint, credentials, options=(("grpc.ssl_target_name_override", "da-1"),)
            ) as channel,
            pytest.raises(grpc.RpcError) as no_cert,
        ):
            channel.unary_unary("/dispers.proto.DataAggregator/Ingest")(
                ingest_request(query_id, chunks[0]), timeout=10
            )
        assert no_cert.value.code() is grpc.StatusCode.UNAVAILABLE

        # A certificate naming T, issued by another CA: the TLS handshake fails.
        cert, key = issue_cert(*make_ca("impostor"), "t")
        impostor = TlsIdentity("t", cert, key, ca_pem(world))
        code, _, _ = raw(world, "da-1", "Ingest", ingest_request(query_id, chunks[0]), identity=impostor)
        assert code is grpc.StatusCode.UNAVAILABLE

        # A certificate of the real CA for a name outside the roster.
        cert, key = issue_cert(ca_pem(world), ca_key(world), "mallory")
        mallory = TlsIdentity("mallory", cert, key, ca_pem(world))
        code, details, _ = raw(world, "da-1", "Ingest", ingest_request(query_id, chunks[0]), identity=mallory)
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert (
            details == "UNAUTHORIZED: the caller's certificate names 'mallory', not an actor of this cluster"
        )

        # Roster members that are not T: every chunk of the 1,000 forged items is refused.
        for caller in ("researcher", "pc-1"):
            for chunk in chunks:
                code, details, _ = raw(
                    world, "da-1", "Ingest", ingest_request(query_id, chunk), caller=caller
                )
                assert code is grpc.StatusCode.PERMISSION_DENIED
                assert details == f"UNAUTHORIZED: '{caller}' may not call data_aggregator.ingest"
        held.release()
    outcome = wait_outcome(world, query_id)
    assert outcome.record.state == "done", outcome.record
    assert outcome.result is not None
    assert all(v is None for v in outcome.result.dropped.values())  # nothing forged arrived
    assert_equals_truth(outcome.result, truth(world))


# --- 2. subscriptions from anyone but the host --------------------------------------------------------


def test_subscribe_and_subscribe_all_only_by_the_host_itself(world: World) -> None:
    """Attack (roster members and a host lying about itself): relay a host's genuine signed
    unsubscription from another certificate, have pc-1 send a batch naming another host, sign
    a batch with the wrong key or alter it after signing, smuggle another host's address, or
    ask a host to unsubscribe all its instances. Each is refused; TF's sets, T's directory
    and the host's own record of what is subscribed are unchanged."""
    host = world.actors["pc-1"]
    all_ids = host._store.instance_ids()
    before = membership(world)
    genuine = host.subscription_batch(SubscriptionOp.UNSUBSCRIBE, all_ids[:5])

    for caller in ("researcher", "t", "tf", "da-root"):
        err = refused(world.peers_as(caller).conductor().subscribe, genuine)
        assert err.code is ErrorCode.UNAUTHORIZED
        assert err.message == f"'{caller}' may not call conductor.subscribe"

    pc = world.peers_as("pc-1").conductor()
    items = tuple(genuine.items)
    # A header naming another host, signed by pc-1.
    other = signed_batch(world, list(items), host="pc-1")
    other = SubscriptionBatch(dataclasses.replace(other.header, host="pc-2"), other.items)
    err = refused(lambda: pc.subscribe(other))
    assert (err.code, err.message) == (ErrorCode.UNAUTHORIZED, "a host may subscribe only its own instances")

    # pc-1's header signed with someone else's key.
    unsigned = SubscriptionBatch.build("pc-1", SubscriptionOp.UNSUBSCRIBE, time.time(), items)
    for signer in ("researcher", "conductor"):
        sig = world.setup.keys(signer).signing.sign(unsigned.header.signing_bytes())
        wrong = SubscriptionBatch(dataclasses.replace(unsigned.header, signature=sig), items)
        err = refused(pc.subscribe, wrong)
        assert (err.code, err.message) == (
            ErrorCode.BAD_SIGNATURE,
            "subscription batch: signature does not verify",
        )

    # A genuine subscription whose op the relay flips to unsubscribe after the host signed it.
    sub = host.subscription_batch(SubscriptionOp.SUBSCRIBE, all_ids[:5])
    flipped = SubscriptionBatch(dataclasses.replace(sub.header, op=SubscriptionOp.UNSUBSCRIBE), sub.items)
    err = refused(lambda: pc.subscribe(flipped))
    assert (err.code, err.message) == (
        ErrorCode.BAD_SIGNATURE,
        "subscription batch: signature does not verify",
    )

    # pc-1 signs a batch carrying an address of another host.
    smuggled = signed_batch(world, [item(world, ["sex:F"], "pc-1/new-one"), item(world, ["sex:F"], "pc-2/x")])
    err = refused(lambda: pc.subscribe(smuggled))
    assert err.code is ErrorCode.UNAUTHORIZED
    assert err.message == "subscription 1 address is not an instance of the signing host"

    # SubscribeAll (here: unsubscribe every instance) from anyone but pc-1 itself.
    for caller in ("conductor", "researcher", "t"):
        with client_for(world.setup.config, caller, "pc-1", PersonalCloudClient) as client:
            err = refused(client.subscribe_all, SubscriptionOp.UNSUBSCRIBE)
        assert err.code is ErrorCode.UNAUTHORIZED
        assert err.message == f"'{caller}' may not call personal_cloud.subscribe_all"

    assert membership(world) == before
    assert host._store.subscribed(all_ids).all()
    assert len(before[0]) == 300


# --- 3. replayed and re-paired batches at TF ----------------------------------------------------------


def _halves(batch: SubscriptionBatch) -> tuple[list[bytes], list[bytes]]:
    return [i.sealed_concepts for i in batch.items], [i.sealed_address for i in batch.items]


def test_conductor_cannot_replay_or_repair_subscription_batches(tmp_path: Path) -> None:
    """Attack (malicious Conductor): apply a genuine batch twice, give its signed halves another
    batch id or op, re-pair items (hand CI and T the halves in different orders, or swap T's
    signed items), replay a host's batch through Conductor.Subscribe, and replay an old
    subscription after its instances unsubscribed. TF refuses each (REPLAY, nonce mismatch,
    BAD_SIGNATURE) and the memberships stay exactly what the host asked for."""
    with fresh_world(tmp_path / "replay", n=120) as w:
        host = w.actors["pc-1"]
        ids = host._store.instance_ids()
        c = w.peers_as("conductor")
        ci, t, tf = c.concept_indexor(), c.target(), c.target_finder()
        tf_sets = w.actors["tf"]._sets
        sub = SubscriptionOp.SUBSCRIBE

        # A genuine batch, relayed by hand: applied once, then refused as a replay.
        a_ids = ids[:60]
        batch_a = host.subscription_batch(sub, a_ids)
        concepts, addresses = _halves(batch_a)
        tokens = ci.tokenize_subscriptions(batch_a.header.batch_id, batch_a.header.op, concepts)
        pseudonyms = t.pseudonymize(batch_a.header, addresses)
        receipt = tf.apply_subscriptions(sub, batch_a.header.batch_id, tokens, pseudonyms)
        assert receipt.applied == 60
        ci.settle(batch_a.header.batch_id, True, receipt.signature)
        t.settle(batch_a.header.batch_id, True, receipt.signature)
        host._store.set_subscribed(a_ids, True)
        a_pseudonyms = frozenset(pseudonym_of(w, i) for i in a_ids)
        assert tf_sets.universe() == a_pseudonyms
        err = refused(lambda: tf.apply_subscriptions(sub, batch_a.header.batch_id, tokens, pseudonyms))
        assert (err.code, err.message) == (
            ErrorCode.REPLAY,
            "this subscription batch was applied before (replay)",
        )
        # The same signed halves under a fresh batch id, or as an unsubscription: signatures fail.
        err = refused(lambda: tf.apply_subscriptions(sub, secrets.token_hex(16), tokens, pseudonyms))
        assert (err.code, err.message) == (ErrorCode.BAD_SIGNATURE, "token list: signature does not verify")
        err = refused(
            lambda: tf.apply_subscriptions(
                SubscriptionOp.UNSUBSCRIBE, batch_a.header.batch_id, tokens, pseudonyms
            )
        )
        assert (err.code, err.message) == (ErrorCode.BAD_SIGNATURE, "token list: signature does not verify")
        # Replayed through the Conductor as the host: REPLAY too (and nothing staged stays).
        pc = w.peers_as("pc-1").conductor()
        err = refused(lambda: pc.subscribe(batch_a))
        assert err.code is ErrorCode.REPLAY
        assert tf_sets.universe() == a_pseudonyms and len(w.actors["t"]._directory) == 60

        # Re-pairing: CI gets the concepts in the host's order, T the addresses with 0 and 1 swapped.
        batch_b = host.subscription_batch(sub, ids[60:70])
        concepts, addresses = _halves(batch_b)
        swapped = [addresses[1], addresses[0], *addresses[2:]]
        tokens_b = ci.tokenize_subscriptions(batch_b.header.batch_id, batch_b.header.op, concepts)
        pseudonyms_b = t.pseudonymize(batch_b.header, swapped)
        err = refused(lambda: tf.apply_subscriptions(sub, batch_b.header.batch_id, tokens_b, pseudonyms_b))
        assert err.code is ErrorCode.MALFORMED
        assert err.message == "subscription 0: its tokens and pseudonym carry different nonces"
        # Swapping T's signed items back into line instead breaks T's signature.
        items = pseudonyms_b.items
        resorted = SignedItems((items[1], items[0], *items[2:]), pseudonyms_b.signature)
        err = refused(lambda: tf.apply_subscriptions(sub, batch_b.header.batch_id, tokens_b, resorted))
        assert (err.code, err.message) == (ErrorCode.BAD_SIGNATURE, "pseudonyms: signature does not verify")
        ci.settle(batch_b.header.batch_id, False)
        t.settle(batch_b.header.batch_id, False)
        assert tf_sets.universe() == a_pseudonyms and len(w.actors["t"]._directory) == 60

        # The host's own signed batch through Conductor.Subscribe: once, then REPLAY.
        d_ids = ids[70:80]
        batch_d = host.subscription_batch(sub, d_ids)
        assert pc.subscribe(batch_d) == 10
        host._store.set_subscribed(d_ids, True)
        err = refused(lambda: pc.subscribe(batch_d))
        # T (which committed it) refuses first; TF would too.
        assert err.code is ErrorCode.REPLAY and err.message.endswith("before (replay)")
        d_pseudonyms = frozenset(pseudonym_of(w, i) for i in d_ids)
        assert tf_sets.universe() == a_pseudonyms | d_pseudonyms

        # Unsubscribe D's instances; their old subscription replayed, by the host's path or by
        # the Conductor relaying it by hand, does not bring them back.
        host._store.set_subscribed(d_ids, False)
        assert pc.subscribe(host.subscription_batch(SubscriptionOp.UNSUBSCRIBE, d_ids)) == 10
        assert refused(lambda: pc.subscribe(batch_d)).code is ErrorCode.REPLAY
        concepts, addresses = _halves(batch_d)
        ci.tokenize_subscriptions(
            batch_d.header.batch_id, batch_d.header.op, concepts
        )  # CI stages; nothing commits it
        # T, which committed the batch once, refuses it; TF would too.
        assert refused(lambda: t.pseudonymize(batch_d.header, addresses)).code is ErrorCode.REPLAY
        ci.settle(batch_d.header.batch_id, False)
        t.settle(batch_d.header.batch_id, False)
        assert tf_sets.universe() == a_pseudonyms
        directory = w.actors["t"]._directory
        assert directory.lookup(sorted(d_pseudonyms)) == [None] * 10

        # Queries reach exactly A's instances, and their numbers are the ground truth.
        asked: list[str] = []
        original: Contribute = host.contribute

        def recording(caller: str, request: ContributionRequest) -> ContributionBatch:
            asked.extend(request.instance_ids)
            return original(caller, request)

        host.contribute = recording
        try:
            honest_query(w, heart_rate_spec(query__k=5), only=a_ids)
        finally:
            host.contribute = original
        assert asked and set(asked) <= set(a_ids)


@pytest.mark.parametrize("replayed", ["subscription_after_unsubscribe", "unsubscription_after_resubscribe"])
def test_replayed_batch_refused_by_tf_leaves_t_directory_alone(tmp_path: Path, replayed: str) -> None:
    """Attack (malicious Conductor): replay a host's still-fresh batch to CI and T, and when TF
    refuses it as a replay, tell T to commit anyway. T's directory must keep following what TF
    applied (DESIGN.md: "T deletes the address"; invariant 6: a replay leaves no half-written
    state): an unsubscribed address must not come back, and a re-subscribed one must not go."""
    with fresh_world(tmp_path / "t-replay", n=30) as w:
        host = w.actors["pc-1"]
        ids = host._store.instance_ids()[:5]
        pc = w.peers_as("pc-1").conductor()
        c = w.peers_as("conductor")
        ci, t, tf = c.concept_indexor(), c.target(), c.target_finder()
        directory = w.actors["t"]._directory
        pseudonyms = [pseudonym_of(w, i) for i in ids]

        subscription = host.subscription_batch(SubscriptionOp.SUBSCRIBE, ids)
        assert pc.subscribe(subscription) == 5
        unsubscription = host.subscription_batch(SubscriptionOp.UNSUBSCRIBE, ids)
        assert pc.subscribe(unsubscription) == 5
        if replayed == "subscription_after_unsubscribe":
            old, expected = subscription, [None] * 5
        else:
            assert pc.subscribe(host.subscription_batch(SubscriptionOp.SUBSCRIBE, ids)) == 5
            old, expected = unsubscription, [host.address(i) for i in ids]
        assert directory.lookup(pseudonyms) == expected

        # CI or T may refuse the replay outright, or T the commit: only the outcome matters.
        concepts, addresses = _halves(old)
        with contextlib.suppress(DispersError):
            tokens = ci.tokenize_subscriptions(old.header.batch_id, old.header.op, concepts)
            signed = t.pseudonymize(old.header, addresses)
            err = refused(tf.apply_subscriptions, old.header.op, old.header.batch_id, tokens, signed)
            assert err.code is ErrorCode.REPLAY
        # The Conductor even holds TF's genuine receipt for the old batch (from when it was
        # first applied): committing with it must change nothing either.
        old_receipt = w.setup.keys("tf").signing.sign(receipt_bytes(old.header.batch_id, old.header.op))
        for receipt in (b"", old_receipt):
            with contextlib.suppress(DispersError):
                ci.settle(old.header.batch_id, True, receipt)
            with contextlib.suppress(DispersError):
                t.settle(old.header.batch_id, True, receipt)
        universe = w.actors["tf"]._sets.universe()
        assert all((p in universe) == (e is not None) for p, e in zip(pseudonyms, expected, strict=True))
        assert directory.lookup(pseudonyms) == expected


# --- 4. one item per instance ------------------------------------------------------------------------


def _open_items(world: World, da: str, ciphertexts: Sequence[bytes]) -> list[Any]:
    opener = Opener(da, world.setup.keys(da).sealing)
    layout = ContributionLayout(1)
    return [layout.decode(opener.open(c, "item")) for c in ciphertexts]


def test_a_request_repeating_one_instance_gets_one_contribution(world: World) -> None:
    """Attack (T, or whoever holds its certificate, against a host): ask one instance 50 times
    in one request to have its value sealed 50 times. The host answers 50 items of one length,
    at most one of them a contribution; two instances 25 times each give two."""
    eligible = eligible_ids(world)
    one, two = eligible[0], eligible[1]
    for ids, expected in (([one] * 50, 1), ([one] * 25 + [two] * 25, 2)):
        request = _contribution_request(world, issued_at=0, ids=ids)
        code, details, raw_response = raw(world, "pc-1", "Contribute", request, caller="t")
        assert code is grpc.StatusCode.OK, details
        batch = personal_cloud_pb2.ContributeResponse.FromString(raw_response).batch
        assert len(batch.ciphertexts) == 50 and set(batch.aggregators) == {"da-1"}
        assert len({len(c) for c in batch.ciphertexts}) == 1
        query_id = personal_cloud_pb2.ContributeRequest.FromString(request).request.query_id
        records = _open_items(world, "da-1", list(batch.ciphertexts))
        assert {r.query_id for r in records} == {query_id}
        assert sum(not r.declined for r in records) == expected


def _stuffing_host(world: World, mode: str, lost: list[str]) -> Callable[..., ContributionBatch]:
    """A host that tampers with its first answer of a query; `lost` gets the instances whose
    items can no longer count."""
    host = world.actors["pc-1"]
    original: Contribute = host.contribute
    roster = world.setup.config.roster
    first = threading.Lock()

    def stuffing(caller: str, request: ContributionRequest) -> ContributionBatch:
        if not first.acquire(blocking=False):
            return original(caller, request)
        n = len(request.instance_ids)
        if mode == "sealed_to_another_da":
            # Labelled as T asked, but what T sends to da-2 is sealed to da-1.
            keep = [j for j in range(n) if request.aggregators[j] == "da-1"]
            moved = [j for j in range(n) if request.aggregators[j] == "da-2"]
            honest = original(caller, _subset(request, keep))
            rerouted = original(
                caller, dataclasses.replace(_subset(request, moved), aggregators=("da-1",) * len(moved))
            )
            lost.extend(request.instance_ids[j] for j in moved)
            return ContributionBatch(
                honest.aggregators + ("da-2",) * len(moved), honest.ciphertexts + rerouted.ciphertexts
            )
        lost.extend(request.instance_ids)
        if mode == "all_to_one_da":
            # Every item sealed to, and labelled for, da-1 whatever T assigned.
            return original(caller, dataclasses.replace(request, aggregators=("da-1",) * n))
        batch = original(caller, request)
        if mode == "extra_item":
            data = DataRequest.from_obj(loads_object(request.request, "data request"))
            extra = seal(roster.get("da-1").sealing_key, data.layout.encode(request.query_id, 0, [30.0]))
            return ContributionBatch(batch.aggregators + ("da-1",), batch.ciphertexts + (extra,))
        assert mode == "wrong_length"
        return ContributionBatch(batch.aggregators, (batch.ciphertexts[0][:-1], *batch.ciphertexts[1:]))

    return stuffing


def _subset(request: ContributionRequest, positions: Sequence[int]) -> ContributionRequest:
    return dataclasses.replace(
        request,
        instance_ids=tuple(request.instance_ids[j] for j in positions),
        aggregators=tuple(request.aggregators[j] for j in positions),
    )


@pytest.mark.parametrize("mode", ["extra_item", "all_to_one_da", "wrong_length", "sealed_to_another_da"])
def test_a_stuffing_host_loses_its_own_items_only(
    world: World, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """Attack (malicious host): answer a real query with an extra valid-looking contribution,
    with items sealed to a DA it was not told to use, with an item of the wrong length, or with
    items labelled as asked but sealed to the other leaf. T refuses the whole answer of a host
    that breaks the one-item-per-instance shape (counted unreachable); items sealed to the wrong
    DA are dropped there as unopenable. The query succeeds on everyone else's items, equal to
    the ground truth over them, and never rests on more items than targets."""
    lost: list[str] = []
    monkeypatch.setattr(world.actors["pc-1"], "contribute", _stuffing_host(world, mode, lost))
    spec = heart_rate_spec()
    outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    result = outcome.result
    assert result is not None and lost
    counts = world.actors["conductor"].record(outcome.record.query_id).counts
    assert counts["forwarded"] + counts["unreachable"] == counts["targets"]
    assert counts["forwarded"] <= counts["targets"]
    if mode == "sealed_to_another_da":
        assert counts["unreachable"] == 0
        assert result.dropped["unopenable"] == (len(lost) if len(lost) >= spec.k else None)
    else:
        assert counts["unreachable"] == len(lost) > 0
        assert all(v is None for v in result.dropped.values())
    assert_equals_truth(result, truth(world, exclude=lost))


# --- 5. unsubscribe after the concepts changed --------------------------------------------------------


def test_unsubscribe_removes_an_instance_whose_concepts_changed(tmp_path: Path) -> None:
    """Attack (stale state): an instance subscribes, then its documents change — one loses
    every measurement (so no longer derives has:heart_rate) and declares a cohort, another
    gains measurements and the cohort — and both unsubscribe. If unsubscribing removed only the
    concepts held today, the first would stay in has:heart_rate's set and keep being asked.
    Both pseudonyms are in no TF set, their addresses are gone from T's directory, and a query
    over their old concepts neither reaches them nor counts them."""
    canaries = Canaries.fresh(6)
    with fresh_world(tmp_path / "changed", n=200, canaries=canaries) as w:
        assert w.subscribe() == 206
        host = w.actors["pc-1"]
        store: DocumentStore = host._store
        pop = w.setup.population
        measured = np.bincount(pop.hr_owner, minlength=pop.n_instances) > 0
        eligible = set(eligible_ids(w))
        lose = next(
            i for i, m in zip(pop.instance_ids, measured.tolist(), strict=True) if m and i in eligible
        )
        gain = next(i for i, m in zip(pop.instance_ids, measured.tolist(), strict=True) if not m)
        ci, tf_sets = w.actors["ci"], w.actors["tf"]._sets
        has_hr = ci.token("has:heart_rate")
        p_lose, p_gain = pseudonym_of(w, lose), pseudonym_of(w, gain)
        assert p_lose in tf_sets.members(has_hr) and p_gain not in tf_sets.members(has_hr)
        before = derive_concepts(store, [lose, gain], AS_OF)

        with store._lock:
            store._conn.execute("DELETE FROM heart_rate WHERE instance_id = ?", (lose,))
        end = epoch_day(AS_OF)
        store.add_heart_rates([gain] * 3, [end - 1, end - 2, end - 3], [70.0, 72.0, 74.0])
        store.declare_concepts([lose, gain], [canaries.concept] * 2)
        after = derive_concepts(store, [lose, gain], AS_OF)
        assert "has:heart_rate" in before[0] and "has:heart_rate" not in after[0]
        assert "has:heart_rate" not in before[1] and "has:heart_rate" in after[1]
        assert canaries.concept in after[0] and canaries.concept in after[1]

        store.set_subscribed([lose, gain], False)
        batch = host.subscription_batch(SubscriptionOp.UNSUBSCRIBE, [lose, gain])
        assert w.peers_as("pc-1").conductor().subscribe(batch) == 2
        for concept in w.setup.config.settings.vocabulary:
            members = tf_sets.members(ci.token(concept))
            assert p_lose not in members and p_gain not in members, concept
        assert p_lose not in tf_sets.universe() and p_gain not in tf_sets.universe()
        directory = w.actors["t"]._directory
        assert directory.lookup([p_lose, p_gain]) == [None, None]
        assert len(directory) == 204

        asked: list[str] = []
        original: Contribute = host.contribute

        def recording(caller: str, request: ContributionRequest) -> ContributionBatch:
            asked.extend(request.instance_ids)
            return original(caller, request)

        host.contribute = recording
        try:
            spec = heart_rate_spec(query__target="has:heart_rate AND (age:12-25 OR age:25-50 OR age:50-100)")
            honest_query(w, spec, exclude=[lose, gain])
            cohort = heart_rate_spec(query__target=canaries.concept, query__k=5)
            outcome = run_query(w.querier, cohort, timeout_s=60)
            assert outcome.record.state == "done", outcome.record
        finally:
            host.contribute = original
        assert asked and lose not in asked and gain not in asked
        assert outcome.result is not None
        assert_equals_truth(outcome.result, truth(w, only=canaries.ids))


# --- 6. absurd contributions --------------------------------------------------------------------------

BAD_KINDS = (
    "inf",
    "nan",
    "huge",
    "minus_huge",
    "wrong_query",
    "group_out_of_range",
    "bad_layout",
    "random_bytes",
    "truncated_box",
    "duplicate",
)
PER_KIND = 5
EXPECTED_DROPS = {
    "malformed": 4 * PER_KIND,  # inf, nan, group out of range, unknown version or kind
    "out_of_bounds": 2 * PER_KIND,  # 1e308, -1e308
    "wrong_query": PER_KIND,
    "unopenable": 2 * PER_KIND,  # random bytes, a truncated box refilled to length
    "duplicate": PER_KIND,
}


def _absurd_host(world: World, bad: dict[str, str]) -> Callable[..., ContributionBatch]:
    """A host that answers for PER_KIND of its instances of each bad kind (`bad`: id -> kind)."""
    host = world.actors["pc-1"]
    original: Contribute = host.contribute
    roster = world.setup.config.roster
    quota = dict.fromkeys(BAD_KINDS, PER_KIND)
    by_da: dict[str, list[bytes]] = defaultdict(list)  # bad items already sealed, per DA
    lock = threading.Lock()

    def craft(kind: str, n: int, da: str, layout: ContributionLayout, query_id: str) -> bytes:
        key = roster.get(da).sealing_key
        if kind == "random_bytes":
            return os.urandom(sealed_size(layout.size))
        if kind == "truncated_box":
            box = seal(key, layout.encode(query_id, 0, [70.0]))
            return box[: len(box) // 2] + bytes(len(box) - len(box) // 2)
        if kind == "bad_layout":
            version, code = (9, 1) if n % 2 else (1, 7)  # unknown layout version, unknown kind
            record = struct.pack(">BB16sI", version, code, bytes.fromhex(query_id), 0) + struct.pack(
                ">d", 70.0
            )
            return seal(key, record)
        group, value, qid = 0, 70.0, query_id
        if kind in ("inf", "nan", "huge", "minus_huge"):
            value = {"inf": math.inf, "nan": math.nan, "huge": 1e308, "minus_huge": -1e308}[kind]
        elif kind == "wrong_query":
            qid = new_query_id()
        elif kind == "group_out_of_range":
            group = 3 if n % 2 else 2**32 - 1
        return seal(key, layout.encode(qid, group, [value]))

    def absurd(caller: str, request: ContributionRequest) -> ContributionBatch:
        data = DataRequest.from_obj(loads_object(request.request, "data request"))
        crafted: dict[int, bytes] = {}
        with lock:
            for j, (instance_id, da) in enumerate(
                zip(request.instance_ids, request.aggregators, strict=True)
            ):
                kind = next(
                    (k for k in BAD_KINDS if quota[k] and (k != "duplicate" or by_da[da])),
                    None,
                )
                if kind is None:
                    continue
                quota[kind] -= 1
                if kind == "duplicate":  # a second copy of a bad item already sealed to this DA
                    crafted[j] = by_da[da][0]
                else:
                    crafted[j] = craft(kind, quota[kind], da, data.layout, request.query_id)
                    by_da[da].append(crafted[j])
                bad[instance_id] = kind
        rest = [j for j in range(len(request.instance_ids)) if j not in crafted]
        honest = original(caller, _subset(request, rest))
        pairs = [*zip(honest.aggregators, honest.ciphertexts, strict=True)]
        pairs += [(request.aggregators[j], ct) for j, ct in crafted.items()]
        secrets.SystemRandom().shuffle(pairs)
        return ContributionBatch(tuple(a for a, _ in pairs), tuple(c for _, c in pairs))

    return absurd


def test_absurd_contributions_are_dropped_and_counted(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack (malicious host): for a few of its instances, seal records holding inf, nan,
    1e308, -1e308, another query's id, a group index out of range, an unknown layout version or
    kind, random bytes of the right length, a truncated box refilled to length, and a second
    copy of one of those. The query succeeds; every such item is dropped and counted under its
    reason (numbers, since each count reaches k), and the released statistics equal the ground
    truth over the honest instances."""
    bad: dict[str, str] = {}
    monkeypatch.setattr(world.actors["pc-1"], "contribute", _absurd_host(world, bad))
    spec = heart_rate_spec(query__k=5)
    outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    result = outcome.result
    assert result is not None
    assert sorted(bad.values()) == sorted(k for k in BAD_KINDS for _ in range(PER_KIND))
    assert dict(result.dropped) == EXPECTED_DROPS
    expected = truth(world, exclude=list(bad))
    assert_equals_truth(result, expected)
    counts = world.actors["conductor"].record(outcome.record.query_id).counts
    assert counts["unreachable"] == 0 and counts["forwarded"] == counts["targets"]
    declined = counts["targets"] - len(bad) - sum(t.count for t in expected.values())
    assert result.declined == (declined if declined >= spec.k else None)


# --- 7. long polls cannot starve the Conductor ---------------------------------------------------------


def test_long_polls_cannot_starve_the_conductor(world: World) -> None:
    """Attack (querier, or anyone able to open many calls): hold 16 Status long polls on a
    running query to occupy every worker of the Conductor's server. At most max_long_polls of
    them wait; GetRoster is still answered while they are outstanding; once the query ends
    every poll returns."""
    config = world.setup.config
    max_waiting = config.settings.max_long_polls
    records: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    with HeldHost(world) as held:
        query_id = world.querier.submit(heart_rate_spec())
        held.wait_entered()
        client = client_for(config, "researcher", "conductor", ConductorClient)

        def poll() -> None:
            try:
                record = client.status(query_id, wait_s=30)
            except BaseException as exc:  # reported below
                with lock:
                    errors.append(exc)
                return
            with lock:
                records.append(record)

        threads = [threading.Thread(target=poll, daemon=True) for _ in range(16)]
        try:
            for thread in threads:
                thread.start()
            # Those beyond the limit answer at once, with the query still running.
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                with lock:
                    if len(records) + len(errors) >= 16 - max_waiting:
                        break
                time.sleep(0.02)
            with lock:
                assert not errors, errors
                assert len(records) == 16 - max_waiting
                assert all(r.state == "running" for r in records)
            # The waiting polls are outstanding and the host still blocked: GetRoster answers.
            code, details, response = raw(world, "conductor", "GetRoster", b"", caller="pc-1", timeout_s=10)
            assert code is grpc.StatusCode.OK, details
            roster = convert.roster_from_proto(conductor_pb2.GetRosterResponse.FromString(response).roster)
            assert roster == config.roster
            with lock:
                assert len(records) == 16 - max_waiting and not errors  # the waiting ones still wait
            held.release()
            for thread in threads:
                thread.join(timeout=60)
            assert not any(t.is_alive() for t in threads)
        finally:
            held.release()
            client.close()
    assert not errors, errors
    assert len(records) == 16
    assert sum(r.state == "running" for r in records) == 16 - max_waiting
    assert all(r.counts == {} for r in records)
    outcome = wait_outcome(world, query_id)
    assert outcome.record.state == "done"


# --- 8. a querier reads only its own queries -----------------------------------------------------------


def test_only_the_submitting_querier_reads_a_query(tmp_path: Path) -> None:
    """Attack (another roster member, then a rival querier): read the researcher's query —
    its state, error and sealed result — by calling Conductor.Status with another certificate,
    or the researcher's own Querier service. A non-querier is UNAUTHORIZED; the rival querier
    gets NOT_FOUND, exactly as for a query that does not exist; only the researcher reads it."""
    w = grpc_world(two_querier_setup(tmp_path / "rival", n=150))
    try:
        w.subscribe()
        query_id = w.querier.submit(heart_rate_spec(query__k=5))
        config = w.setup.config
        for caller in ("pc-1", "t", "da-root", "conductor"):
            with client_for(config, caller, "conductor", ConductorClient) as client:
                err = refused(client.status, query_id)
            assert (err.code, err.message) == (
                ErrorCode.UNAUTHORIZED,
                f"'{caller}' may not call conductor.status",
            )
        with client_for(config, "rival", "conductor", ConductorClient) as client:
            err = refused(lambda: client.status(query_id, wait_s=5))
            unknown = refused(lambda: client.status(new_query_id()))
        assert (err.code, err.message) == (ErrorCode.NOT_FOUND, "no query with this id")
        assert (unknown.code, unknown.message) == (err.code, err.message)  # no existence oracle
        # The rival's own Querier service asks as the rival: the same refusal.
        with client_for(config, "rival", "rival", QuerierClient) as client:
            err = refused(lambda: client.outcome(query_id))
        assert err.code is ErrorCode.NOT_FOUND
        # The researcher's Querier service serves its own operator only.
        for caller in ("rival", "pc-1", "conductor"):
            with client_for(config, caller, "researcher", QuerierClient) as client:
                err = refused(client.outcome, query_id)
                assert (err.code, err.message) == (
                    ErrorCode.UNAUTHORIZED,
                    f"'{caller}' may not call querier.outcome",
                )
                err = refused(client.submit, heart_rate_spec(query__k=5))
                assert (err.code, err.message) == (
                    ErrorCode.UNAUTHORIZED,
                    f"'{caller}' may not call querier.submit",
                )
        outcome = wait_outcome(w, query_id)
        assert outcome.record.state == "done" and outcome.result is not None
        assert_equals_truth(outcome.result, truth(w))
    finally:
        w.close()


# --- 9. the attested target count ---------------------------------------------------------------------


def test_root_prepare_refuses_a_foreign_or_forged_attestation(world: World) -> None:
    """Attack (malicious Conductor): prepare the root DA with TF's attestation of another query,
    with no attestation, garbage, an unsigned count, or a count it signed itself in TF's name —
    each to raise the bound on the items the root accepts — or hand a leaf an attestation.
    Each Prepare is refused and no DA holds state; an honest query still equals the truth."""
    q = world.querier_object
    c = world.peers_as("conductor")
    config = world.setup.config
    plan = config.roster.da_plan()
    root_key = config.roster.get(plan.root).sealing_key
    spec = heart_rate_spec()
    genuine = q.build(spec)
    found = c.target_finder().find_targets(genuine, c.concept_indexor().tokenize_query(genuine))
    assert found.count > 0

    def forged_by_conductor(query_id: str) -> bytes:
        body = {"query_id": query_id, "targets": 10**6}
        return seal_signed(
            root_key, world.setup.keys("conductor").signing, "tf", body, ATTESTATION_BYTES, "x"
        )

    cases: list[tuple[Callable[[str], bytes], ErrorCode, str]] = [
        (lambda qid: found.sealed_attestation, ErrorCode.MALFORMED, "target count does not match the query"),
        (
            lambda qid: b"",
            ErrorCode.BAD_CIPHERTEXT,
            "target count: ciphertext is truncated (shorter than a sealed box)",
        ),
        (
            lambda qid: os.urandom(sealed_size(ATTESTATION_BYTES + 5)),
            ErrorCode.BAD_CIPHERTEXT,
            f"target count: ciphertext does not open with {plan.root}'s key "
            "(tampered, truncated or sealed to another actor)",
        ),
        (
            lambda qid: seal_padded(root_key, {"query_id": qid, "targets": 10**6}, ATTESTATION_BYTES, "x"),
            ErrorCode.BAD_SIGNATURE,
            "target count: not signed by the expected actor",
        ),
        (forged_by_conductor, ErrorCode.BAD_SIGNATURE, "target count: signature does not verify"),
    ]
    root = c.data_aggregator(plan.root)
    for make, code, message in cases:
        envelope = q.build(spec)
        err = refused(root.prepare, envelope, make(envelope.query_id))
        assert (err.code, err.message) == (code, message)
    leaf = c.data_aggregator(plan.leaves[0])
    err = refused(lambda: leaf.prepare(genuine, found.sealed_attestation))
    assert (err.code, err.message) == (ErrorCode.MALFORMED, "only the root aggregator takes the target count")
    assert all(da.active_queries == 0 for da in world.das.values())
    honest_query(world)


class _Copying:
    """A DA client through which T forwards the first item of every batch twice."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def ingest(self, query_id: str, ciphertexts: Sequence[bytes]) -> int:
        n: int = self._inner.ingest(query_id, ciphertexts)
        self._inner.ingest(query_id, list(ciphertexts[:1]))
        return n


@pytest.mark.parametrize("extra", ["declines_ingested_as_t", "t_forwards_copies"])
def test_root_refuses_more_items_than_attested(
    world: World, monkeypatch: pytest.MonkeyPatch, extra: str
) -> None:
    """Attack (items that no target sent): during a running query, well-formed declines are
    ingested into a leaf under T's certificate, or T forwards extra copies of items. The root
    finds more items than TF attested targets and releases nothing: the query fails with
    FAILED_PRECONDITION naming the attested count. The next honest query equals the truth."""
    config = world.setup.config
    if extra == "t_forwards_copies":
        peers = world.actors["t"]._peers
        real = peers.data_aggregator
        monkeypatch.setattr(peers, "data_aggregator", lambda name: _Copying(real(name)))
        query_id = world.querier.submit(heart_rate_spec())
    else:
        with HeldHost(world) as held:
            query_id = world.querier.submit(heart_rate_spec())
            held.wait_entered()
            key = config.roster.get("da-1").sealing_key
            declines = [seal(key, ContributionLayout(1).decline(query_id)) for _ in range(5)]
            code, details, _ = raw(world, "da-1", "Ingest", ingest_request(query_id, declines), caller="t")
            assert code is grpc.StatusCode.OK, details
            held.release()
    outcome = wait_outcome(world, query_id)
    assert outcome.record.state == "failed", outcome.record
    assert outcome.record.error_code == "FAILED_PRECONDITION"
    # Caught by the leaf (it holds more items than T says it forwarded) or, failing that, by
    # the root (more items than TF attested targets).
    message = str(outcome.record.error_message)
    assert "attested" in message or "other than the Target forwarded" in message, message
    assert outcome.result is None and outcome.record.sealed_result is None
    assert all(da.active_queries == 0 for da in world.das.values())
    monkeypatch.undo()
    honest_query(world)


# --- 10. no suppressed group's size for Q -------------------------------------------------------------


def test_querier_cannot_derive_a_suppressed_group_size(world: World) -> None:
    """Attack (curious querier): group so that one group (age 12-13) has fewer than k_min
    contributors, then combine everything Q receives — its record of the query and the result's
    released counts, contributions, drops and declines — to get that group's size. Q's record
    has no counts; the suppressed group has no number; what Q sees falls short of the target
    count exactly by the hidden group, and only the Conductor knows the target count."""
    edges = (12, 13, 50, 100)
    spec = heart_rate_spec(
        query__k=world.setup.config.settings.k_min, data__group_by={"field": "age", "edges": list(edges)}
    )
    expected = truth(world, edges=edges)
    hidden = expected["12-13"].count
    assert 0 < hidden < spec.k <= min(expected["13-50"].count, expected["50-100"].count)
    outcome = run_query(world.querier, spec, timeout_s=120)
    assert outcome.record.state == "done", outcome.record
    result = outcome.result
    assert result is not None
    assert outcome.record.counts == {}
    assert outcome.record.error_code is None and outcome.record.error_message is None
    small = result.group("12-13")
    assert small.suppressed and dict(small.values) == {}
    assert_equals_truth(result, expected)
    assert set(result.dropped) == set(EXPECTED_DROPS) and all(v is None for v in result.dropped.values())
    assert result.declined is not None
    visible = result.contributions + result.declined + sum(v or 0 for v in result.dropped.values())
    targets = world.actors["conductor"].record(outcome.record.query_id).counts["targets"]
    assert visible != targets
    assert targets - visible == hidden  # the one number that would give it away, Q never gets


# --- found by an adversarial review of the change ------------------------------------------------


class _ForgingPeers:
    """The Conductor's peers, with CI's token list (or TF's answer) replaced by a forgery."""

    def __init__(self, inner: Any, *, tokens: Any = None, pseudonyms: Any = None) -> None:
        self._inner, self._tokens, self._pseudonyms = inner, tokens, pseudonyms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def concept_indexor(self) -> Any:
        real, forge = self._inner.concept_indexor(), self._tokens
        if forge is None:
            return real

        class CI:
            def tokenize_query(self, envelope: Any) -> bytes:
                real.tokenize_query(envelope)  # the honest answer, thrown away
                return bytes(forge(envelope))

        return CI()

    def target_finder(self) -> Any:
        real, forge = self._inner.target_finder(), self._pseudonyms
        if forge is None:
            return real

        class TF:
            def find_targets(self, envelope: Any, sealed_tokens: bytes) -> Any:
                found = real.find_targets(envelope, sealed_tokens)
                return dataclasses.replace(found, sealed_pseudonyms=forge(envelope))

        return TF()


def test_conductor_cannot_forge_the_token_list_or_the_target_list(tmp_path: Path) -> None:
    """Attack (malicious Conductor): seal its own token list to TF (a random token is an empty
    set, so `NOT age:50-100` would become everyone, and TF's errors would probe the sealed
    expression's shape), or its own pseudonym list to T (emptying the query). Both lists are
    now signed (by CI, by TF) and the forgeries are refused."""
    from dispers.protocol.common import seal_padded, tokens_bytes
    from dispers.protocol.querier import run_query
    from tests.integration.conftest import local_world

    w = local_world(make_setup(tmp_path, n=300))
    try:
        assert w.subscribe() == 300
        conductor = w.actors["conductor"]
        settings, roster = w.setup.config.settings, w.setup.config.roster
        spec = heart_rate_spec(query__target="NOT age:50-100", query__k=5)
        honest = run_query(w.querier, spec, timeout_s=60)
        assert honest.result is not None and honest.result.group("50-100").suppressed

        def tokens(envelope: Any) -> bytes:
            body = {"query_id": envelope.query_id, "tokens": [secrets.token_bytes(32).hex()]}
            return seal_padded(roster.one(Role.TARGET_FINDER).sealing_key, body, tokens_bytes(settings), "t")

        def pseudonyms(envelope: Any) -> bytes:
            body = {"query_id": envelope.query_id, "pseudonyms": base64.b64encode(bytes(32 * 20)).decode()}
            return seal(roster.one(Role.TARGET).sealing_key, dumps(body))

        for forge in ({"tokens": tokens}, {"pseudonyms": pseudonyms}):
            conductor._peers = _ForgingPeers(conductor._peers, **forge)
            outcome = run_query(w.querier, spec, timeout_s=60)
            conductor._peers = conductor._peers._inner
            assert outcome.record.state == "failed" and outcome.result is None
            full = conductor.record(outcome.record.query_id)
            assert full.error_code in ("BAD_SIGNATURE", "MALFORMED"), full
            assert "position" not in str(full.error_message)  # no probe of the expression
        assert all(da.active_queries == 0 for da in w.das.values())
    finally:
        w.close()


def test_ci_is_not_told_which_host_a_subscription_batch_comes_from(tmp_path: Path) -> None:
    """Curious CI: with the host's name beside a batch of one (a self-hosted personal cloud),
    CI would learn who subscribed to what. CI now gets only the batch id, the op and the
    sealed concept lists."""
    from tests.integration.conftest import local_world

    w = local_world(make_setup(tmp_path, n=20))
    try:
        ci, host = w.actors["ci"], w.actors["pc-1"]
        received: list[Any] = []
        original = ci.tokenize_subscriptions

        def spy(*args: Any) -> Any:
            received.append(args)
            return original(*args)

        ci.tokenize_subscriptions = spy
        batch = host.subscription_batch(SubscriptionOp.SUBSCRIBE, host._store.instance_ids()[:1])
        assert w.peers_as("pc-1").conductor().subscribe(batch) == 1
        ((caller, batch_id, op, sealed),) = received
        assert (caller, batch_id, op) == ("conductor", batch.header.batch_id, SubscriptionOp.SUBSCRIBE)
        assert "pc-1" not in repr((batch_id, op)) and all(isinstance(c, bytes) for c in sealed)
    finally:
        w.close()


def test_conductor_cannot_finalize_a_leaf_before_the_target_closed_its_stream(tmp_path: Path) -> None:
    """Attack (malicious Conductor): finalize a leaf before T forwarded anything to it, then
    have the root release a signed result resting on part of the targets. A leaf now finalizes
    only once T closed its stream of items, holding exactly as many as T forwarded."""
    from tests.integration.conftest import local_world

    w = local_world(make_setup(tmp_path, n=300))
    try:
        assert w.subscribe() == 300
        p = w.peers  # as the Conductor
        envelope = w.querier_object.build(heart_rate_spec(query__k=5))
        tokens = p.concept_indexor().tokenize_query(envelope)
        found = p.target_finder().find_targets(envelope, tokens)
        for da in envelope.plan.members:
            p.data_aggregator(da).prepare(
                envelope, found.sealed_attestation if da == envelope.plan.root else b""
            )
        err = refused(lambda: p.data_aggregator("da-1").finalize(envelope.query_id))
        assert err.code is ErrorCode.FAILED_PRECONDITION and "closed" in err.message
        # Nor can it close the stream itself: only T may.
        err = refused(lambda: p.data_aggregator("da-1").end_ingest(envelope.query_id, 0))
        assert err.code is ErrorCode.UNAUTHORIZED
        for da in envelope.plan.members:
            p.data_aggregator(da).abort(envelope.query_id)
    finally:
        w.close()


def test_replay_memory_outlives_every_valid_query(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack (malicious Conductor, short max_query_age_s): the guards forgot a query id while
    an envelope dated ahead (clock skew) was still valid, so a DA could be prepared again for a
    query it had finalized. And a restarted actor, whose memory is empty, refuses envelopes
    made before it started."""
    import dispers.protocol.common as common
    import dispers.protocol.querier as querier_module
    from dispers.protocol.data_aggregator import DataAggregator
    from tests.integration.conftest import local_world

    w = local_world(make_setup(tmp_path, n=10))
    try:
        settings = dataclasses.replace(w.setup.config.settings, max_query_age_s=20.0)
        da = DataAggregator(w.setup.keys("da-1"), w.setup.config.roster, settings)
        real = time.time
        monkeypatch.setattr(querier_module.time, "time", lambda: real() + 55)  # Q's clock ahead
        envelope = w.querier_object.build(heart_rate_spec(query__k=5))
        monkeypatch.undo()
        da.prepare("conductor", envelope)
        da.abort("conductor", envelope.query_id)
        monkeypatch.setattr(common.time, "time", lambda: real() + 45)  # 45 s later
        assert refused(lambda: da.prepare("conductor", envelope)).code is ErrorCode.REPLAY
        monkeypatch.undo()
        restarted = DataAggregator(w.setup.keys("da-1"), w.setup.config.roster, w.setup.config.settings)
        earlier = w.querier_object.build(heart_rate_spec(query__k=5))
        earlier = dataclasses.replace(earlier, created_at=restarted._replays.started - 1)
        keys = w.setup.keys("researcher")
        earlier = dataclasses.replace(earlier, signature=keys.signing.sign(earlier.signing_bytes()))
        assert refused(lambda: restarted.prepare("conductor", earlier)).code is ErrorCode.EXPIRED
    finally:
        w.close()
