"""gRPC clients implementing each actor's API, and GrpcPeers: one cached channel per endpoint.

Channels use mutual TLS when given a TlsIdentity: the client shows its actor certificate and
checks that the server's certificate names the roster actor it meant to reach. Without one
(a cluster with `insecure = true`) channels are plain and carry the caller's claimed name in
the `dispers-caller` metadata, which nothing authenticates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from dispers.core.config import ClusterConfig, Roster
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.messages import (
    BatchHeader,
    CollectReport,
    ContributionBatch,
    ContributionRequest,
    FoundTargets,
    QueryEnvelope,
    Receipt,
    SignedItems,
    SubscriptionBatch,
    SubscriptionOp,
)
from dispers.core.spec import QuerySpec
from dispers.crypto.tls import TlsIdentity
from dispers.proto import (
    common_pb2,
    concept_indexor_pb2,
    concept_indexor_pb2_grpc,
    conductor_pb2,
    conductor_pb2_grpc,
    data_aggregator_pb2,
    data_aggregator_pb2_grpc,
    health_pb2,
    health_pb2_grpc,
    personal_cloud_pb2,
    personal_cloud_pb2_grpc,
    querier_pb2,
    querier_pb2_grpc,
    target_finder_pb2,
    target_finder_pb2_grpc,
    target_pb2,
    target_pb2_grpc,
)
from dispers.protocol.api import QueryOutcome
from dispers.protocol.health import HealthInfo
from dispers.state.budget import BudgetStatus, Spend
from dispers.state.queries import QueryRecord
from dispers.transport import convert, grpc_training
from dispers.transport.grpc_errors import error_from_rpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
SHORT_DEADLINE_S = 60.0
"""Deadline of a call that does one actor's own work on one batch."""
LONG_DEADLINE_S = 600.0
"""Deadline of a call that fans out to other actors (subscribe, submit), and the base of those
whose work grows with the instances they touch (see work_deadline)."""
PER_INSTANCE_DEADLINE_S = 0.005
"""What each instance a call touches adds to its deadline (collect, contribute, subscribe_all):
about 50 times what its boxes cost, so a million instances get 5,600 s, not a fixed 600 s."""


def work_deadline(instances: int) -> float:
    """The deadline of a call whose work grows with the number of instances it touches."""
    return LONG_DEADLINE_S + PER_INSTANCE_DEADLINE_S * max(0, instances)


CALLER_METADATA_KEY = "dispers-caller"
"""Metadata naming the caller on a plain channel (insecure clusters only; not authenticated)."""


class _CallerMetadata(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Adds `dispers-caller: <name>` to every unary call of a plain channel."""

    def __init__(self, caller: str) -> None:
        self._caller = caller

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        metadata = [
            *(client_call_details.metadata or ()),
            (CALLER_METADATA_KEY, self._caller),
        ]
        return continuation(client_call_details._replace(metadata=metadata), request)


def open_channel(
    endpoint: str,
    *,
    identity: TlsIdentity | None = None,
    server_name: str | None = None,
    caller: str | None = None,
) -> grpc.Channel:
    """A channel to host:port with dispers' message-size limits.

    With `identity`, mutual TLS: the client presents identity's certificate, trusts only the
    cluster CA, and requires the server's certificate to name `server_name` (the peer's
    roster name, which is required then). Without it, a plain channel that sends `caller` (if
    given) as `dispers-caller` metadata on every call.
    """
    if identity is None:
        channel = grpc.insecure_channel(endpoint, options=CHANNEL_OPTIONS)
        if caller:
            channel = grpc.intercept_channel(channel, _CallerMetadata(caller))
        return channel
    if not server_name:
        raise DispersError(ErrorCode.CONFIG, f"a TLS channel to {endpoint} needs the peer's roster name")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=identity.ca_pem,
        private_key=identity.key_pem,
        certificate_chain=identity.cert_pem,
    )
    options = (*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", server_name))
    return grpc.secure_channel(endpoint, credentials, options=options)


class _Client:
    """A channel (owned when made from an endpoint) and a call helper that maps errors.

    Each service's client names its generated stub class in `_stub_type`.
    """

    _stub_type: Callable[[grpc.Channel], Any]

    def __init__(
        self,
        target: str | grpc.Channel,
        peer: str | None = None,
        *,
        identity: TlsIdentity | None = None,
        server_name: str | None = None,
        caller: str | None = None,
    ) -> None:
        self._owned = isinstance(target, str)
        if isinstance(target, str):
            name = server_name if server_name is not None else peer
            self._channel = open_channel(target, identity=identity, server_name=name, caller=caller)
        else:
            self._channel = target
        self.peer = peer if peer is not None else (target if isinstance(target, str) else "peer")
        self._stub = type(self)._stub_type(self._channel)

    def _call(self, method: str, fn: Callable[..., Any], request: Any, timeout_s: float | None) -> Any:
        """Call one unary RPC; a failure becomes the DispersError the peer raised."""
        try:
            return fn(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, self.peer, method) from None

    def close(self) -> None:
        """Close the channel if this client opened it."""
        if self._owned:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ConductorClient(_Client, grpc_training.ConductorTraining):
    """ConductorAPI over gRPC."""

    _stub_type = conductor_pb2_grpc.ConductorStub

    def get_roster(self) -> Roster:
        """The cluster's public roster."""
        response: conductor_pb2.GetRosterResponse = self._call(
            "GetRoster", self._stub.GetRoster, conductor_pb2.GetRosterRequest(), SHORT_DEADLINE_S
        )
        return convert.roster_from_proto(response.roster)

    def get_vocabulary(self) -> tuple[str, ...]:
        """The cluster's public concept vocabulary."""
        response: conductor_pb2.GetVocabularyResponse = self._call(
            "GetVocabulary", self._stub.GetVocabulary, conductor_pb2.GetVocabularyRequest(), SHORT_DEADLINE_S
        )
        return tuple(response.concepts)

    def subscribe(self, batch: SubscriptionBatch) -> int:
        """Relay a host's signed batch of subscriptions; returns how many were applied."""
        request = conductor_pb2.SubscribeRequest(batch=convert.subscription_batch_to_proto(batch))
        response: conductor_pb2.SubscribeResponse = self._call(
            "Subscribe", self._stub.Subscribe, request, LONG_DEADLINE_S
        )
        return response.changed

    def submit(self, envelope: QueryEnvelope) -> str:
        """Submit a query; returns its id."""
        request = conductor_pb2.ConductorSubmitRequest(envelope=convert.envelope_to_proto(envelope))
        response: conductor_pb2.ConductorSubmitResponse = self._call(
            "Submit", self._stub.Submit, request, LONG_DEADLINE_S
        )
        return response.query_id

    def status(self, query_id: str, wait_s: float = 0.0) -> QueryRecord:
        """A query's record, waiting up to wait_s for it to finish."""
        request = conductor_pb2.StatusRequest(query_id=query_id, wait_s=wait_s)
        response: conductor_pb2.StatusResponse = self._call(
            "Status", self._stub.Status, request, max(wait_s, 0.0) + SHORT_DEADLINE_S
        )
        return convert.query_record_from_proto(response.record)


class ConceptIndexorClient(_Client):
    """ConceptIndexorAPI over gRPC."""

    _stub_type = concept_indexor_pb2_grpc.ConceptIndexorStub

    def tokenize_subscriptions(
        self, batch_id: str, op: SubscriptionOp, sealed_concepts: Sequence[bytes]
    ) -> SignedItems:
        """seal_CI(concepts, nonce) -> seal_TF(tokens, nonce), in order, signed by CI."""
        request = concept_indexor_pb2.TokenizeSubscriptionsRequest(
            batch_id=batch_id, op=convert.op_to_proto(op), sealed_concepts=list(sealed_concepts)
        )
        response: concept_indexor_pb2.TokenizeSubscriptionsResponse = self._call(
            "TokenizeSubscriptions", self._stub.TokenizeSubscriptions, request, SHORT_DEADLINE_S
        )
        return convert.signed_items_from_proto(response.tokens)

    def settle(self, batch_id: str, commit: bool, receipt: bytes = b"") -> None:
        """Commit (against TF's receipt) or drop a staged subscription batch."""
        request = common_pb2.SettleRequest(batch_id=batch_id, commit=commit, receipt=receipt)
        self._call("Settle", self._stub.Settle, request, SHORT_DEADLINE_S)

    def tokenize_query(self, envelope: QueryEnvelope) -> bytes:
        """A query's concepts -> seal_TF(tokens)."""
        request = concept_indexor_pb2.TokenizeQueryRequest(envelope=convert.envelope_to_proto(envelope))
        response: concept_indexor_pb2.TokenizeQueryResponse = self._call(
            "TokenizeQuery", self._stub.TokenizeQuery, request, SHORT_DEADLINE_S
        )
        return response.sealed_tokens


class TargetFinderClient(_Client):
    """TargetFinderAPI over gRPC."""

    _stub_type = target_finder_pb2_grpc.TargetFinderStub

    def apply_subscriptions(
        self, op: SubscriptionOp, batch_id: str, tokens: SignedItems, pseudonyms: SignedItems
    ) -> Receipt:
        """Apply one signed, nonce-paired batch; returns how many it held and TF's receipt."""
        request = target_finder_pb2.ApplySubscriptionsRequest(
            op=convert.op_to_proto(op),
            batch_id=batch_id,
            tokens=convert.signed_items_to_proto(tokens),
            pseudonyms=convert.signed_items_to_proto(pseudonyms),
        )
        response: target_finder_pb2.ApplySubscriptionsResponse = self._call(
            "ApplySubscriptions", self._stub.ApplySubscriptions, request, SHORT_DEADLINE_S
        )
        return Receipt(max(0, response.changed), response.receipt)

    def find_targets(self, envelope: QueryEnvelope, sealed_tokens: bytes) -> FoundTargets:
        """Evaluate a query's expression."""
        request = target_finder_pb2.FindTargetsRequest(
            envelope=convert.envelope_to_proto(envelope), sealed_tokens=sealed_tokens
        )
        response: target_finder_pb2.FindTargetsResponse = self._call(
            "FindTargets", self._stub.FindTargets, request, SHORT_DEADLINE_S
        )
        return convert.found_targets_from_proto(response.found)


class TargetClient(_Client, grpc_training.TargetTraining):
    """TargetAPI over gRPC."""

    _stub_type = target_pb2_grpc.TargetStub

    def pseudonymize(self, header: BatchHeader, sealed_addresses: Sequence[bytes]) -> SignedItems:
        """seal_T(address, nonce) -> seal_TF(pseudonym, nonce), in order, signed by T."""
        request = target_pb2.PseudonymizeRequest(
            header=convert.batch_header_to_proto(header), sealed_addresses=list(sealed_addresses)
        )
        response: target_pb2.PseudonymizeResponse = self._call(
            "Pseudonymize", self._stub.Pseudonymize, request, SHORT_DEADLINE_S
        )
        return convert.signed_items_from_proto(response.pseudonyms)

    def settle(self, batch_id: str, commit: bool, receipt: bytes = b"") -> None:
        """Commit (against TF's receipt) or drop a staged subscription batch."""
        request = common_pb2.SettleRequest(batch_id=batch_id, commit=commit, receipt=receipt)
        self._call("Settle", self._stub.Settle, request, SHORT_DEADLINE_S)

    def collect(self, envelope: QueryEnvelope, sealed_pseudonyms: bytes) -> CollectReport:
        """Collect the targets' contributions and forward them to the DAs."""
        request = target_pb2.CollectRequest(
            envelope=convert.envelope_to_proto(envelope), sealed_pseudonyms=sealed_pseudonyms
        )
        # The sealed list holds 32 bytes per target in base64 (43 characters): its length, public
        # anyway, tells how many targets T will ask.
        response: target_pb2.CollectResponse = self._call(
            "Collect", self._stub.Collect, request, work_deadline(len(sealed_pseudonyms) // 43)
        )
        return convert.collect_report_from_proto(response.report)


class DataAggregatorClient(_Client, grpc_training.DataAggregatorTraining):
    """DataAggregatorAPI over gRPC."""

    _stub_type = data_aggregator_pb2_grpc.DataAggregatorStub

    def prepare(self, envelope: QueryEnvelope, attestation: bytes = b"") -> None:
        """Get ready for a query (the root also gets TF's sealed target count)."""
        request = data_aggregator_pb2.PrepareRequest(
            envelope=convert.envelope_to_proto(envelope), attestation=attestation
        )
        self._call("Prepare", self._stub.Prepare, request, SHORT_DEADLINE_S)

    def ingest(self, query_id: str, ciphertexts: Sequence[bytes]) -> int:
        """Fold a batch of sealed contributions; returns how many were accepted."""
        request = data_aggregator_pb2.IngestRequest(query_id=query_id, ciphertexts=list(ciphertexts))
        response: data_aggregator_pb2.IngestResponse = self._call(
            "Ingest", self._stub.Ingest, request, SHORT_DEADLINE_S
        )
        return response.accepted

    def end_ingest(self, query_id: str, forwarded: int) -> None:
        """Close the query's stream of items to this leaf."""
        request = data_aggregator_pb2.EndIngestRequest(query_id=query_id, forwarded=forwarded)
        self._call("EndIngest", self._stub.EndIngest, request, SHORT_DEADLINE_S)

    def absorb(self, query_id: str, child: str, sealed_partial: bytes) -> None:
        """Merge a child's sealed partial."""
        request = data_aggregator_pb2.AbsorbRequest(
            query_id=query_id, child=child, sealed_partial=sealed_partial
        )
        self._call("Absorb", self._stub.Absorb, request, SHORT_DEADLINE_S)

    def finalize(self, query_id: str) -> bytes:
        """The sealed partial (or, at the root, the sealed result)."""
        request = data_aggregator_pb2.FinalizeRequest(query_id=query_id)
        response: data_aggregator_pb2.FinalizeResponse = self._call(
            "Finalize", self._stub.Finalize, request, SHORT_DEADLINE_S
        )
        return response.sealed

    def budget(self, querier: str) -> BudgetStatus:
        """A querier's privacy budget, from the root DA's ledger (ask as that querier)."""
        request = data_aggregator_pb2.BudgetRequest(querier=querier)
        r: data_aggregator_pb2.BudgetResponse = self._call(
            "Budget", self._stub.Budget, request, SHORT_DEADLINE_S
        )
        return BudgetStatus(
            querier, Spend(r.epsilon_total, r.delta_total), Spend(r.epsilon_spent, r.delta_spent), r.queries
        )

    def abort(self, query_id: str) -> None:
        """Forget a query."""
        request = data_aggregator_pb2.AbortRequest(query_id=query_id)
        self._call("Abort", self._stub.Abort, request, SHORT_DEADLINE_S)


class PersonalCloudClient(_Client, grpc_training.PersonalCloudTraining):
    """PersonalCloudAPI and PersonalCloudAdminAPI over gRPC."""

    _stub_type = personal_cloud_pb2_grpc.PersonalCloudStub

    def contribute(self, request: ContributionRequest) -> ContributionBatch:
        """Compute and seal the contributions of a batch of instances."""
        message = personal_cloud_pb2.ContributeRequest(request=convert.contribution_request_to_proto(request))
        response: personal_cloud_pb2.ContributeResponse = self._call(
            "Contribute", self._stub.Contribute, message, work_deadline(len(request.instance_ids))
        )
        return convert.contribution_batch_from_proto(response.batch)

    def subscribe_all(self, op: SubscriptionOp, instances: int | None = None) -> int:
        """(Un)subscribe every instance the host serves. The deadline grows with `instances`
        (how many the host serves, when the caller knows); without it there is none: the
        host works through its batches and logs its progress."""
        request = personal_cloud_pb2.SubscribeAllRequest(op=convert.op_to_proto(op))
        deadline = None if instances is None else work_deadline(instances)
        response: personal_cloud_pb2.SubscribeAllResponse = self._call(
            "SubscribeAll", self._stub.SubscribeAll, request, deadline
        )
        return response.changed


class QuerierClient(_Client, grpc_training.QuerierTraining):
    """QuerierAPI over gRPC."""

    _stub_type = querier_pb2_grpc.QuerierStub

    def submit(self, spec: QuerySpec) -> str:
        """Build, sign and submit a query; returns its id."""
        request = querier_pb2.QuerierSubmitRequest(spec_json=convert.spec_to_json(spec))
        response: querier_pb2.QuerierSubmitResponse = self._call(
            "Submit", self._stub.Submit, request, LONG_DEADLINE_S
        )
        return response.query_id

    def outcome(self, query_id: str, wait_s: float = 0.0) -> QueryOutcome:
        """C's record of a query and, once released, the opened result."""
        request = querier_pb2.OutcomeRequest(query_id=query_id, wait_s=wait_s)
        response: querier_pb2.OutcomeResponse = self._call(
            "Outcome", self._stub.Outcome, request, max(wait_s, 0.0) + SHORT_DEADLINE_S
        )
        return convert.outcome_from_proto(response)


class HealthClient(_Client):
    """Any actor's Health service: which actor serves on its port."""

    _stub_type = health_pb2_grpc.HealthStub

    def check(self, timeout_s: float = 5.0) -> HealthInfo:
        """Ask who serves here; UNAVAILABLE when nothing answers within `timeout_s`."""
        response: health_pb2.HealthCheckResponse = self._call(
            "Check", self._stub.Check, health_pb2.HealthCheckRequest(), timeout_s
        )
        return HealthInfo(response.name, Role.parse(response.role), response.serving, response.version)


ClientT = TypeVar("ClientT", bound=_Client)


def client_for(config: ClusterConfig, as_name: str, peer_name: str, client_type: type[ClientT]) -> ClientT:
    """A client of actor `peer_name`, calling as actor `as_name` (its certificate, unless insecure).

    The client owns its channel: close it (or use it as a context manager) when done.
    """
    return client_type(
        config.roster.get(peer_name).endpoint,
        peer_name,
        identity=config.tls_identity(as_name),
        server_name=peer_name,
        caller=as_name,
    )


class GrpcPeers:
    """Peers over gRPC: clients of the roster's actors, sharing one channel per endpoint.

    With `identity` every channel is mutual TLS and checks that the server is the roster
    actor it is named after; without it channels are plain and carry `caller` as metadata.
    """

    def __init__(
        self, roster: Roster, identity: TlsIdentity | None = None, caller: str | None = None
    ) -> None:
        self._roster = roster
        self._identity = identity
        self._caller = caller if caller is not None else (identity.name if identity else None)
        self._lock = threading.Lock()
        self._channels: dict[tuple[str, str | None], grpc.Channel] = {}
        self._closed = False

    @classmethod
    def for_config(cls, config: ClusterConfig, name: str) -> GrpcPeers:
        """Peers as actor `name` of `config` reaches them (its TLS identity unless insecure)."""
        return cls(config.roster, identity=config.tls_identity(name), caller=name)

    def channel(self, endpoint: str, server_name: str | None = None) -> grpc.Channel:
        """The shared channel to `endpoint` (its certificate must name `server_name`), opened lazily."""
        with self._lock:
            if self._closed:
                raise DispersError(ErrorCode.UNAVAILABLE, "the peer connections are closed")
            key = (endpoint, server_name)
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = open_channel(
                    endpoint, identity=self._identity, server_name=server_name, caller=self._caller
                )
            return channel

    def _endpoint(self, name: str) -> tuple[grpc.Channel, str]:
        return self.channel(self._roster.get(name).endpoint, name), name

    def conductor(self) -> ConductorClient:
        """The Conductor."""
        return ConductorClient(*self._endpoint(self._roster.one(Role.CONDUCTOR).name))

    def concept_indexor(self) -> ConceptIndexorClient:
        """The Concept Indexor."""
        return ConceptIndexorClient(*self._endpoint(self._roster.one(Role.CONCEPT_INDEXOR).name))

    def target_finder(self) -> TargetFinderClient:
        """The Target Finder."""
        return TargetFinderClient(*self._endpoint(self._roster.one(Role.TARGET_FINDER).name))

    def target(self) -> TargetClient:
        """The Target."""
        return TargetClient(*self._endpoint(self._roster.one(Role.TARGET).name))

    def data_aggregator(self, name: str) -> DataAggregatorClient:
        """A Data Aggregator by name (NOT_FOUND if the roster has none by that name)."""
        if name not in {e.name for e in self._roster.by_role(Role.DATA_AGGREGATOR)}:
            raise DispersError(ErrorCode.NOT_FOUND, f"no data aggregator {name!r}")
        return DataAggregatorClient(*self._endpoint(name))

    def personal_cloud(self, name: str) -> PersonalCloudClient:
        """A personal-cloud host by name (UNAVAILABLE if the roster has none by that name)."""
        if name not in {e.name for e in self._roster.by_role(Role.PERSONAL_CLOUD)}:
            raise DispersError(ErrorCode.UNAVAILABLE, f"no personal-cloud host {name!r}")
        return PersonalCloudClient(*self._endpoint(name))

    def querier(self, name: str) -> QuerierClient:
        """A Querier service by name (NOT_FOUND if the roster has none by that name)."""
        if name not in {e.name for e in self._roster.by_role(Role.QUERIER)}:
            raise DispersError(ErrorCode.NOT_FOUND, f"no querier {name!r}")
        return QuerierClient(*self._endpoint(name))

    def close(self) -> None:
        """Close every channel; later calls fail with UNAVAILABLE."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
            self._closed = True
        for channel in channels:
            channel.close()
