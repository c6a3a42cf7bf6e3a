"""The training servicers: convert, call the actor's training op, map errors (one per role)."""

from __future__ import annotations

from typing import Any

import grpc

from dispers.proto import training_pb2 as tpb
from dispers.proto import training_pb2_grpc as tgrpc
from dispers.protocol.conductor import Conductor
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.protocol.querier import Querier
from dispers.protocol.target import Target
from dispers.services.base import CallerOf
from dispers.transport import convert, convert_training
from dispers.transport.grpc_errors import rpc


class ConductorTrainingServicer(tgrpc.ConductorTrainingServicer):
    """C's training RPC."""

    def __init__(self, actor: Conductor, caller_of: CallerOf) -> None:
        self._actor, self._caller_of = actor, caller_of

    @rpc
    def SubmitRound(self, request: tpb.SubmitRoundRequest, context: Any) -> tpb.SubmitRoundResponse:
        """Record and run a round."""
        r = convert_training.training_round_from_proto(request.round)
        return tpb.SubmitRoundResponse(query_id=self._actor.submit_round(self._caller_of(context), r))


class TargetTrainingServicer(tgrpc.TargetTrainingServicer):
    """T's training RPC."""

    def __init__(self, actor: Target, caller_of: CallerOf) -> None:
        self._actor, self._caller_of = actor, caller_of

    @rpc
    def CollectRound(self, request: tpb.CollectRoundRequest, context: Any) -> tpb.CollectRoundResponse:
        """Cohort, training, forwarding."""
        r = convert_training.training_round_from_proto(request.round)
        report = self._actor.collect_round(self._caller_of(context), r, bytes(request.sealed_pseudonyms))
        return tpb.CollectRoundResponse(report=convert.collect_report_to_proto(report))


class DataAggregatorTrainingServicer(tgrpc.DataAggregatorTrainingServicer):
    """A DA's training RPCs."""

    def __init__(self, actor: DataAggregator, caller_of: CallerOf) -> None:
        self._actor, self._caller_of = actor, caller_of

    @rpc
    def PrepareRound(self, request: tpb.PrepareRoundRequest, context: Any) -> tpb.RoundAck:
        """Open the training spec."""
        envelope = convert.envelope_from_proto(request.envelope)
        self._actor.prepare_round(self._caller_of(context), envelope, bytes(request.attestation))
        return tpb.RoundAck()

    @rpc
    def IngestRound(self, request: tpb.IngestRoundRequest, context: Any) -> tpb.IngestRoundResponse:
        """Sum a batch of updates."""
        n = self._actor.ingest_round(
            self._caller_of(context), request.query_id, [bytes(c) for c in request.ciphertexts]
        )
        return tpb.IngestRoundResponse(accepted=n)

    @rpc
    def EndRoundIngest(self, request: tpb.EndRoundIngestRequest, context: Any) -> tpb.RoundAck:
        """Close the stream of updates."""
        self._actor.end_round_ingest(self._caller_of(context), request.query_id, int(request.forwarded))
        return tpb.RoundAck()

    @rpc
    def AbsorbRound(self, request: tpb.AbsorbRoundRequest, context: Any) -> tpb.RoundAck:
        """Merge a child's sum."""
        self._actor.absorb_round(
            self._caller_of(context), request.query_id, request.child, bytes(request.sealed_partial)
        )
        return tpb.RoundAck()

    @rpc
    def FinalizeRound(self, request: tpb.FinalizeRoundRequest, context: Any) -> tpb.FinalizeRoundResponse:
        """Seal the sum up, or the average to Q."""
        return tpb.FinalizeRoundResponse(
            sealed=self._actor.finalize_round(self._caller_of(context), request.query_id)
        )

    @rpc
    def AbortRound(self, request: tpb.AbortRoundRequest, context: Any) -> tpb.RoundAck:
        """Forget a round."""
        self._actor.abort_round(self._caller_of(context), request.query_id)
        return tpb.RoundAck()


class PersonalCloudTrainingServicer(tgrpc.PersonalCloudTrainingServicer):
    """A host's training RPC."""

    def __init__(self, actor: PersonalCloudHost, caller_of: CallerOf) -> None:
        self._actor, self._caller_of = actor, caller_of

    @rpc
    def Train(self, request: tpb.TrainRequest, context: Any) -> tpb.TrainResponse:
        """One sealed item per instance asked."""
        batch = self._actor.train(
            self._caller_of(context), convert_training.round_request_from_proto(request.request)
        )
        return tpb.TrainResponse(batch=convert.contribution_batch_to_proto(batch))


class QuerierTrainingServicer(tgrpc.QuerierTrainingServicer):
    """The Querier's training RPCs (its own operator only)."""

    def __init__(self, actor: Querier, caller_of: CallerOf) -> None:
        self._actor, self._caller_of = actor, caller_of

    @rpc
    def SubmitRound(
        self, request: tpb.QuerierSubmitRoundRequest, context: Any
    ) -> tpb.QuerierSubmitRoundResponse:
        """Build, seal, sign and submit a round."""
        plan = convert_training.plan_from_proto(request)
        return tpb.QuerierSubmitRoundResponse(
            query_id=self._actor.submit_round(self._caller_of(context), plan)
        )

    @rpc
    def RoundOutcome(self, request: tpb.RoundOutcomeRequest, context: Any) -> tpb.RoundOutcomeResponse:
        """C's record and, once done, the opened round result."""
        record, result = self._actor.round_outcome(
            self._caller_of(context), request.query_id, int(request.n_params), request.wait_s
        )
        response = tpb.RoundOutcomeResponse(record=convert.query_record_to_proto(record))
        if result is not None:
            response.result_json = convert_training.round_result_to_json(result)
        return response


def register_training(server: grpc.Server, actor: object, caller_of: CallerOf) -> None:
    """Add the training servicer of the actor's role (CI and TF have none)."""
    if isinstance(actor, Conductor):
        tgrpc.add_ConductorTrainingServicer_to_server(ConductorTrainingServicer(actor, caller_of), server)
    elif isinstance(actor, Target):
        tgrpc.add_TargetTrainingServicer_to_server(TargetTrainingServicer(actor, caller_of), server)
    elif isinstance(actor, DataAggregator):
        tgrpc.add_DataAggregatorTrainingServicer_to_server(
            DataAggregatorTrainingServicer(actor, caller_of), server
        )
    elif isinstance(actor, PersonalCloudHost):
        tgrpc.add_PersonalCloudTrainingServicer_to_server(
            PersonalCloudTrainingServicer(actor, caller_of), server
        )
    elif isinstance(actor, Querier):
        tgrpc.add_QuerierTrainingServicer_to_server(QuerierTrainingServicer(actor, caller_of), server)
