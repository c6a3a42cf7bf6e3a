"""The training operations of each gRPC client (mixed into the clients of transport/grpc_client.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import grpc

from dispers.core.messages import CollectReport, ContributionBatch, QueryEnvelope
from dispers.proto import training_pb2 as tpb
from dispers.proto import training_pb2_grpc as tgrpc
from dispers.protocol.learning.messages import RoundRequest, RoundResult, TrainingRound
from dispers.protocol.learning.querier import RoundPlan
from dispers.state.queries import QueryRecord
from dispers.transport import convert, convert_training

SHORT_S = 60.0
LONG_S = 600.0


class _Training:
    _channel: grpc.Channel
    _call: Callable[[str, Callable[..., Any], Any, float], Any]


class ConductorTraining(_Training):
    """C's training op."""

    def submit_round(self, training_round: TrainingRound) -> str:
        """Record and run a training round; returns its id."""
        stub = tgrpc.ConductorTrainingStub(self._channel)
        msg = tpb.SubmitRoundRequest(round=convert_training.training_round_to_proto(training_round))
        response: tpb.SubmitRoundResponse = self._call("SubmitRound", stub.SubmitRound, msg, LONG_S)
        return response.query_id


class TargetTraining(_Training):
    """T's training op."""

    def collect_round(self, training_round: TrainingRound, sealed_pseudonyms: bytes) -> CollectReport:
        """Draw the cohort, have the hosts train, forward the updates."""
        stub = tgrpc.TargetTrainingStub(self._channel)
        msg = tpb.CollectRoundRequest(
            round=convert_training.training_round_to_proto(training_round),
            sealed_pseudonyms=sealed_pseudonyms,
        )
        response: tpb.CollectRoundResponse = self._call("CollectRound", stub.CollectRound, msg, LONG_S)
        return convert.collect_report_from_proto(response.report)


class DataAggregatorTraining(_Training):
    """A DA's training ops."""

    def _training_stub(self) -> tgrpc.DataAggregatorTrainingStub:
        return tgrpc.DataAggregatorTrainingStub(self._channel)

    def prepare_round(self, envelope: QueryEnvelope, attestation: bytes = b"") -> None:
        """Open this DA's training spec."""
        stub = self._training_stub()
        msg = tpb.PrepareRoundRequest(envelope=convert.envelope_to_proto(envelope), attestation=attestation)
        self._call("PrepareRound", stub.PrepareRound, msg, SHORT_S)

    def ingest_round(self, query_id: str, ciphertexts: Sequence[bytes]) -> int:
        """Open, check and sum a batch of sealed updates."""
        stub = self._training_stub()
        msg = tpb.IngestRoundRequest(query_id=query_id, ciphertexts=list(ciphertexts))
        response: tpb.IngestRoundResponse = self._call("IngestRound", stub.IngestRound, msg, SHORT_S)
        return response.accepted

    def end_round_ingest(self, query_id: str, forwarded: int) -> None:
        """T's word that every update of the round was forwarded."""
        stub = self._training_stub()
        msg = tpb.EndRoundIngestRequest(query_id=query_id, forwarded=forwarded)
        self._call("EndRoundIngest", stub.EndRoundIngest, msg, SHORT_S)

    def absorb_round(self, query_id: str, child: str, sealed_partial: bytes) -> None:
        """Merge a child DA's sum of updates."""
        stub = self._training_stub()
        msg = tpb.AbsorbRoundRequest(query_id=query_id, child=child, sealed_partial=sealed_partial)
        self._call("AbsorbRound", stub.AbsorbRound, msg, SHORT_S)

    def finalize_round(self, query_id: str) -> bytes:
        """Seal the sum to the parent, or the round's average to Q."""
        stub = self._training_stub()
        msg = tpb.FinalizeRoundRequest(query_id=query_id)
        response: tpb.FinalizeRoundResponse = self._call("FinalizeRound", stub.FinalizeRound, msg, SHORT_S)
        return bytes(response.sealed)

    def abort_round(self, query_id: str) -> None:
        """Forget a round."""
        stub = self._training_stub()
        self._call("AbortRound", stub.AbortRound, tpb.AbortRoundRequest(query_id=query_id), SHORT_S)


class PersonalCloudTraining(_Training):
    """A host's training op."""

    def train(self, request: RoundRequest) -> ContributionBatch:
        """Train the instances asked; one sealed item per instance."""
        stub = tgrpc.PersonalCloudTrainingStub(self._channel)
        msg = tpb.TrainRequest(request=convert_training.round_request_to_proto(request))
        response: tpb.TrainResponse = self._call("Train", stub.Train, msg, LONG_S)
        return convert.contribution_batch_from_proto(response.batch)


class QuerierTraining(_Training):
    """The Querier service's training ops (its own operator only)."""

    def submit_round(self, plan: RoundPlan) -> str:
        """Build, seal, sign and submit a round; returns its id."""
        stub = tgrpc.QuerierTrainingStub(self._channel)
        msg = convert_training.plan_to_proto(plan)
        response: tpb.QuerierSubmitRoundResponse = self._call("SubmitRound", stub.SubmitRound, msg, LONG_S)
        return response.query_id

    def round_outcome(
        self, query_id: str, n_params: int, wait_s: float = 0.0
    ) -> tuple[QueryRecord, RoundResult | None]:
        """C's record of a round and, once done, the opened average update."""
        stub = tgrpc.QuerierTrainingStub(self._channel)
        msg = tpb.RoundOutcomeRequest(query_id=query_id, n_params=n_params, wait_s=wait_s)
        response: tpb.RoundOutcomeResponse = self._call(
            "RoundOutcome", stub.RoundOutcome, msg, LONG_S + max(0.0, wait_s)
        )
        result = None
        if response.HasField("result_json"):
            result = convert_training.round_result_from_json(response.result_json)
        return convert.query_record_from_proto(response.record), result
