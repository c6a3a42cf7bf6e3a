"""DESIGN.md "Keys, identities, who may call what" and invariant 8: one table says which role may
call which operation, and every operation checks its caller against it before anything else.

The table is checked as a table (every operation x every role, plus outsiders), then through
the real in-process actors: a forbidden caller gets UNAUTHORIZED whatever garbage it sends
(arguments that blow up when touched), so authorization is provably the first thing each
operation does. The table and the actor classes are checked against each other both ways.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import ClusterConfig, Roster
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.messages import SubscriptionOp
from dispers.protocol import authz
from dispers.protocol.authz import ANY_MEMBER, AUTHORIZATION, SELF, authorize
from dispers.protocol.concept_indexor import ConceptIndexor
from dispers.protocol.conductor import Conductor
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.health import Health
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.protocol.querier import Querier, run_query
from dispers.protocol.target import Target
from dispers.protocol.target_finder import TargetFinder
from dispers.transport.local import LocalCluster
from tests.integration.world import AS_OF, heart_rate_spec

# The operation prefix is the role of the actor that serves it.
CLASSES: dict[str, type] = {
    Role.CONDUCTOR.value: Conductor,
    Role.CONCEPT_INDEXOR.value: ConceptIndexor,
    Role.TARGET_FINDER.value: TargetFinder,
    Role.TARGET.value: Target,
    Role.DATA_AGGREGATOR.value: DataAggregator,
    Role.PERSONAL_CLOUD.value: PersonalCloudHost,
    Role.QUERIER.value: Querier,
    "health": Health,  # every actor's server answers it
}

# DESIGN.md's policy, written out independently of the code: loosening the table fails here.
C, CI, TF, T, DA, PC, Q = (
    Role.CONDUCTOR,
    Role.CONCEPT_INDEXOR,
    Role.TARGET_FINDER,
    Role.TARGET,
    Role.DATA_AGGREGATOR,
    Role.PERSONAL_CLOUD,
    Role.QUERIER,
)
EXPECTED: dict[str, frozenset[Role] | str] = {
    "conductor.get_roster": frozenset(Role),
    "conductor.get_vocabulary": frozenset(Role),
    "conductor.subscribe": frozenset({PC}),  # only a host subscribes (and only its own instances)
    "conductor.submit": frozenset({Q}),
    "conductor.status": frozenset({Q}),  # and only the querier who submitted the query
    "concept_indexor.tokenize_subscriptions": frozenset({C}),
    "concept_indexor.tokenize_query": frozenset({C}),
    "concept_indexor.settle": frozenset({C}),
    "target_finder.apply_subscriptions": frozenset({C}),
    "target_finder.find_targets": frozenset({C}),
    "target.pseudonymize": frozenset({C}),
    "target.collect": frozenset({C}),
    "target.settle": frozenset({C}),
    "data_aggregator.prepare": frozenset({C}),  # only C prepares
    "data_aggregator.ingest": frozenset({T}),  # only T ingests contributions
    "data_aggregator.end_ingest": frozenset({T}),  # only T closes the stream of items
    "data_aggregator.budget": frozenset({Q}),  # a querier, for its own budget only
    "data_aggregator.absorb": frozenset({C}),
    "data_aggregator.finalize": frozenset({C}),  # only C finalizes
    "data_aggregator.abort": frozenset({C}),
    "personal_cloud.contribute": frozenset({T}),
    "personal_cloud.subscribe_all": SELF,  # the host's own operator, under its identity
    "querier.submit": SELF,
    "querier.outcome": SELF,
    "health.check": ANY_MEMBER,
    # federated training: a round takes the query's path, each actor with its own op
    "conductor.submit_round": frozenset({Q}),
    "target.collect_round": frozenset({C}),
    "data_aggregator.prepare_round": frozenset({C}),
    "data_aggregator.ingest_round": frozenset({T}),  # only T ingests updates
    "data_aggregator.end_round_ingest": frozenset({T}),
    "data_aggregator.absorb_round": frozenset({C}),
    "data_aggregator.finalize_round": frozenset({C}),
    "data_aggregator.abort_round": frozenset({C}),
    "personal_cloud.train": frozenset({T}),  # only T asks a host to train
    "querier.submit_round": SELF,
    "querier.round_outcome": SELF,
}

# Whom each operation is called on in the test cluster (an actor of the operation's role).
CALLEE = {
    "conductor": "conductor",
    "concept_indexor": "ci",
    "target_finder": "tf",
    "target": "t",
    "data_aggregator": "da-1",
    "personal_cloud": "pc-1",
    "querier": "researcher",
    "health": "conductor",
}
# Two hosts and two queriers, so that SELF is told apart from "an actor of the same role".
HOSTS = ("pc-1", "pc-2")
QUERIERS = ("researcher", "analyst")
OUTSIDERS = ("", "intruder", "Conductor", "conductor ", "t" * 200, "pc-1/inst")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> ClusterConfig:
    layout = ClusterLayout(
        hosts=HOSTS, queriers=QUERIERS, k_min=5, batch_size=128, host_as_of=AS_OF, dp=False
    )
    return write_cluster(Path(tmp_path_factory.mktemp("authz")), layout)


@pytest.fixture(scope="module")
def cluster(config: ClusterConfig) -> Iterator[LocalCluster]:
    c = LocalCluster.from_config(config)
    yield c
    c.close()


def _roster_names() -> list[str]:
    return ["researcher", "analyst", "conductor", "ci", "tf", "t", "da-root", "da-1", "da-2", *HOSTS]


def _split(operation: str) -> tuple[str, str]:
    prefix, _, method = operation.partition(".")
    return prefix, method


# --- the table as a table ---------------------------------------------------------------------


def test_the_table_is_the_designs() -> None:
    assert dict(AUTHORIZATION) == EXPECTED
    assert frozenset(Role) == ANY_MEMBER


def test_the_table_cannot_be_changed_at_run_time() -> None:
    with pytest.raises(TypeError):
        AUTHORIZATION["data_aggregator.ingest"] = ANY_MEMBER  # type: ignore[index]


@pytest.mark.parametrize("operation", sorted(AUTHORIZATION))
def test_authorize_accepts_exactly_the_allowed_roles(config: ClusterConfig, operation: str) -> None:
    roster: Roster = config.roster
    allowed = AUTHORIZATION[operation]
    callee = CALLEE[_split(operation)[0]]
    assert {e.role for e in roster} == set(Role)  # every role is tried
    for entry in roster:
        ok = entry.name == callee if allowed == SELF else entry.role in allowed
        if ok:
            assert authorize(roster, entry.name, operation, callee=callee) == entry
        else:
            with pytest.raises(DispersError) as info:
                authorize(roster, entry.name, operation, callee=callee)
            assert info.value.code is ErrorCode.UNAUTHORIZED, (operation, entry.name)
            assert operation in info.value.message
    for outsider in OUTSIDERS:
        with pytest.raises(DispersError) as info:
            authorize(roster, outsider, operation, callee=callee)
        assert info.value.code is ErrorCode.UNAUTHORIZED, (operation, outsider)
        assert len(info.value.message) < 160  # never echoes more than a bounded part of the name


@pytest.mark.parametrize("operation", sorted(op for op, a in AUTHORIZATION.items() if a == SELF))
def test_self_operations_accept_only_the_callee_itself(config: ClusterConfig, operation: str) -> None:
    roster = config.roster
    role = Role(_split(operation)[0])
    same_role = [e.name for e in roster.by_role(role)]
    assert len(same_role) >= 2
    for callee in same_role:
        assert authorize(roster, callee, operation, callee=callee).name == callee
        for other in same_role:
            if other != callee:
                with pytest.raises(DispersError) as info:
                    authorize(roster, other, operation, callee=callee)
                assert info.value.code is ErrorCode.UNAUTHORIZED


@pytest.mark.parametrize("caller", [None, 7, b"conductor", ["conductor"]])
def test_a_caller_that_is_not_a_name_is_unauthorized(config: ClusterConfig, caller: Any) -> None:
    with pytest.raises(DispersError) as info:
        authorize(config.roster, caller, "conductor.get_roster", callee="conductor")
    assert info.value.code is ErrorCode.UNAUTHORIZED


def test_an_operation_without_a_row_is_an_internal_error(config: ClusterConfig) -> None:
    with pytest.raises(DispersError) as info:
        authorize(config.roster, "conductor", "data_aggregator.exfiltrate", callee="da-1")
    assert info.value.code is ErrorCode.INTERNAL


# --- the table against the actor classes, both ways -------------------------------------------


@pytest.mark.parametrize("operation", sorted(AUTHORIZATION))
def test_every_row_is_a_real_operation_taking_the_caller_first(operation: str) -> None:
    prefix, method = _split(operation)
    assert prefix in CLASSES, f"{operation}: no actor class serves role {prefix!r}"
    fn = getattr(CLASSES[prefix], method, None)
    assert callable(fn), f"{operation}: {CLASSES[prefix].__name__} has no method {method!r}"
    params = list(inspect.signature(fn).parameters)
    assert params[:2] == ["self", "caller"], f"{operation}: parameters {params}"


def _operations_of(cls: type) -> list[str]:
    out = []
    for name, fn in inspect.getmembers(cls, inspect.isfunction):
        if name.startswith("_"):
            continue
        params = list(inspect.signature(fn).parameters)
        if "caller" in params:
            assert params.index("caller") == 1, f"{cls.__name__}.{name}: caller is not first"
            out.append(name)
    return out


@pytest.mark.parametrize("prefix", sorted(CLASSES))
def test_every_operation_of_every_actor_has_a_row(prefix: str) -> None:
    ops = _operations_of(CLASSES[prefix])
    assert ops, f"{CLASSES[prefix].__name__} has no operation"
    missing = [f"{prefix}.{m}" for m in ops if f"{prefix}.{m}" not in AUTHORIZATION]
    assert not missing, f"operations without an authorization rule: {missing}"


# --- through the real actors ------------------------------------------------------------------


class Poison:
    """An argument that fails the test the moment anything looks at it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"an argument was used ({name}) before the caller was authorized")

    def _touched(self, *_: Any, **__: Any) -> Any:
        raise AssertionError("an argument was used before the caller was authorized")

    __len__ = __iter__ = __eq__ = __hash__ = __bool__ = __getitem__ = __str__ = __index__ = _touched
    __lt__ = __gt__ = __le__ = __ge__ = __contains__ = __float__ = __int__ = _touched


def _actor(cluster: LocalCluster, prefix: str) -> Any:
    name = CALLEE[prefix]
    return {
        "conductor": cluster.conductor_actor,
        "concept_indexor": cluster.ci,
        "target_finder": cluster.tf,
        "target": cluster.t,
        "data_aggregator": cluster.das.get(name),
        "personal_cloud": cluster.hosts.get(name),
        "querier": cluster.queriers.get(name),
        "health": Health(cluster.config.roster, name, "test"),
    }[prefix]


def _garbage_call(actor: Any, method: str, caller: Any) -> Callable[[], Any]:
    fn = getattr(actor, method)
    params = [
        p for p in list(inspect.signature(fn).parameters.values())[1:] if p.default is inspect.Parameter.empty
    ]
    return lambda: fn(caller, *[Poison() for _ in params])


def _forbidden_callers(operation: str) -> list[str]:
    allowed = AUTHORIZATION[operation]
    callee = CALLEE[_split(operation)[0]]
    roles = {e: r for e, r in zip(_roster_names(), [Q, Q, C, CI, TF, T, DA, DA, DA, PC, PC], strict=True)}
    if allowed == SELF:
        named = [n for n in roles if n != callee]
    else:
        assert isinstance(allowed, frozenset)
        named = [n for n, r in roles.items() if r not in allowed]
    return [*named, *OUTSIDERS]


def test_the_roster_is_the_one_the_tests_assume(config: ClusterConfig) -> None:
    assert sorted(e.name for e in config.roster) == sorted(_roster_names())
    roles = dict(zip(_roster_names(), [Q, Q, C, CI, TF, T, DA, DA, DA, PC, PC], strict=True))
    assert {e.name: e.role for e in config.roster} == roles


@pytest.mark.parametrize("operation", sorted(AUTHORIZATION))
def test_a_forbidden_caller_is_refused_before_anything_else(cluster: LocalCluster, operation: str) -> None:
    prefix, method = _split(operation)
    actor = _actor(cluster, prefix)
    forbidden = _forbidden_callers(operation)
    if AUTHORIZATION[operation] != SELF and len(AUTHORIZATION[operation]) == len(Role):
        assert forbidden == list(OUTSIDERS)  # open to every member: only outsiders are refused
    for caller in forbidden:
        with pytest.raises(DispersError) as info:
            _garbage_call(actor, method, caller)()
        assert info.value.code is ErrorCode.UNAUTHORIZED, (operation, caller, info.value)


@pytest.mark.parametrize("operation", sorted(AUTHORIZATION))
def test_each_operation_checks_its_own_row_first(
    cluster: LocalCluster, operation: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first thing each operation does is authorize(roster, caller, <its own name>, callee=<itself>)."""
    prefix, method = _split(operation)
    actor = _actor(cluster, prefix)
    module = inspect.getmodule(CLASSES[prefix])
    assert module is not None and getattr(module, "authorize", None) is authz.authorize
    calls: list[tuple[str, str, str]] = []

    class Stop(Exception):
        pass

    def spy(roster: Roster, caller: str, op: str, *, callee: str) -> Any:
        calls.append((caller, op, callee))
        raise Stop

    monkeypatch.setattr(module, "authorize", spy)
    with pytest.raises(Stop):
        _garbage_call(actor, method, "someone")()
    assert calls == [("someone", operation, actor.name)]


def test_an_allowed_caller_gets_past_authorization(cluster: LocalCluster) -> None:
    """Allowed callers with garbage reach the operation's own checks (the row is not a blanket no)."""
    for operation, allowed in AUTHORIZATION.items():
        prefix, method = _split(operation)
        actor = _actor(cluster, prefix)
        caller = (
            actor.name
            if allowed == SELF
            else next(e.name for e in cluster.config.roster if e.role in allowed)
        )
        try:
            _garbage_call(actor, method, caller)()
        except DispersError as exc:
            refused = exc.code is ErrorCode.UNAUTHORIZED and (
                "may not call" in exc.message or "is not an actor" in exc.message
            )
            assert not refused, (operation, caller, exc)
        except Exception:  # garbage blows up later, inside the operation: past authorization
            pass


def test_a_host_subscribes_only_its_own_instances(cluster: LocalCluster) -> None:
    """The Conductor takes a batch only from the host that signed it, and no host runs another's."""
    batch = cluster.hosts["pc-2"].subscription_batch(SubscriptionOp.UNSUBSCRIBE, ["x-1"])
    with pytest.raises(DispersError) as info:
        cluster.conductor_actor.subscribe("pc-1", batch)  # type: ignore[union-attr]
    assert info.value.code is ErrorCode.UNAUTHORIZED
    with pytest.raises(DispersError) as info:
        cluster.hosts["pc-1"].subscribe_all("pc-2", SubscriptionOp.SUBSCRIBE)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert cluster.hosts["pc-1"].subscribe_all("pc-1", SubscriptionOp.SUBSCRIBE) == 0  # an empty store


def test_only_the_querier_who_submitted_reads_the_status(cluster: LocalCluster) -> None:
    conductor = cluster.conductor_actor
    assert conductor is not None
    researcher = cluster.queriers["researcher"]
    envelope = researcher.build(heart_rate_spec(query__k=5))
    # A querier submits only its own queries...
    with pytest.raises(DispersError) as info:
        conductor.submit("analyst", envelope)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    query_id = conductor.submit("researcher", envelope)
    assert conductor.status("researcher", query_id).query_id == query_id
    # ...and another querier cannot even tell that the query exists.
    with pytest.raises(DispersError) as info:
        conductor.status("analyst", query_id)
    assert info.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(DispersError) as info:
        cluster.queriers["analyst"].outcome("analyst", query_id)
    assert info.value.code is ErrorCode.NOT_FOUND
    # Nor can the analyst's operator drive the researcher's Querier.
    with pytest.raises(DispersError) as info:
        researcher.outcome("analyst", query_id)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    # Its own Querier, through its own operator, is past authorization (the empty cluster has
    # no targets, so TF refuses the query).
    outcome = run_query(cluster.querier("analyst"), heart_rate_spec(query__k=5), timeout_s=5)
    assert outcome.record.state == "refused" and outcome.record.querier == "analyst"
