"""Training messages <-> protobuf (beside transport/convert.py, which holds the query's)."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import numpy as np

from dispers.core.errors import malformed
from dispers.proto import training_pb2 as tpb
from dispers.protocol.learning.messages import RoundRequest, RoundResult, TrainingRound
from dispers.protocol.learning.querier import RoundPlan
from dispers.transport import convert


def training_round_to_proto(r: TrainingRound) -> tpb.TrainingRound:
    """A round as Q submits it."""
    return tpb.TrainingRound(
        envelope=convert.envelope_to_proto(r.envelope),
        sealed_models=[tpb.SealedModel(host=h, ciphertext=c) for h, c in r.sealed_models],
    )


def training_round_from_proto(msg: tpb.TrainingRound) -> TrainingRound:
    """Inverse of training_round_to_proto."""
    return TrainingRound(
        convert.envelope_from_proto(msg.envelope),
        tuple((m.host, bytes(m.ciphertext)) for m in msg.sealed_models),
    )


def round_request_to_proto(r: RoundRequest) -> tpb.RoundRequest:
    """T -> host."""
    return tpb.RoundRequest(
        query_id=r.query_id, querier=r.querier, request=r.request, request_signature=r.request_signature,
        sealed_model=r.sealed_model, instance_ids=list(r.instance_ids), aggregators=list(r.aggregators),
    )  # fmt: skip


def round_request_from_proto(msg: tpb.RoundRequest) -> RoundRequest:
    """Inverse of round_request_to_proto."""
    return RoundRequest(
        query_id=msg.query_id, querier=msg.querier, request=bytes(msg.request),
        request_signature=bytes(msg.request_signature), sealed_model=bytes(msg.sealed_model),
        instance_ids=tuple(msg.instance_ids), aggregators=tuple(msg.aggregators),
    )  # fmt: skip


def plan_to_proto(plan: RoundPlan) -> tpb.QuerierSubmitRoundRequest:
    """The operator's round plan: its fields as JSON, its weights as float64 bytes."""
    fields = {k: v for k, v in dataclasses.asdict(plan).items() if k != "weights"}
    weights = np.asarray(plan.weights, dtype="<f8").tobytes()
    return tpb.QuerierSubmitRoundRequest(plan_json=json.dumps(fields), weights=weights)


def plan_from_proto(msg: tpb.QuerierSubmitRoundRequest) -> RoundPlan:
    """Inverse of plan_to_proto (a bad plan is MALFORMED)."""
    try:
        fields: dict[str, Any] = json.loads(msg.plan_json)
        weights = np.frombuffer(msg.weights, dtype="<f8").astype(np.float64)
        return RoundPlan(weights=weights, **fields)
    except (ValueError, TypeError):
        raise malformed("round plan is malformed") from None


def round_result_to_json(r: RoundResult) -> str:
    """The opened round result, for the operator's client."""
    body = dataclasses.asdict(r)
    body["average"] = base64.b64encode(np.asarray(r.average, dtype="<f8").tobytes()).decode()
    return json.dumps(body)


def round_result_from_json(text: str) -> RoundResult:
    """Inverse of round_result_to_json."""
    try:
        body = json.loads(text)
        body["average"] = np.frombuffer(base64.b64decode(body["average"]), dtype="<f8").astype(np.float64)
        return RoundResult(**body)
    except (ValueError, TypeError, KeyError):
        raise malformed("round result is malformed") from None
