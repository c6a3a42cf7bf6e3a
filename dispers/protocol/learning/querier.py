"""Q's side of a training round: seal and sign it; open the root's released average update.

Q drives the rounds: it holds the global model, applies the server optimizer to each released
(noised) average (post-processing) and evaluates on its own held-out set.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dispers.core.codec import dumps
from dispers.core.codec import field as get_field
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.expression import compile_named
from dispers.core.ids import Role, new_query_id
from dispers.core.messages import QueryEnvelope, request_signing_bytes
from dispers.crypto import ActorKeys, Opener, seal
from dispers.protocol.common import open_sealed_signed, seal_padded
from dispers.protocol.learning.messages import (
    EVAL_FIELDS,
    TASKS,
    RoundResult,
    TrainingRequest,
    TrainingRound,
    TrainingSpec,
    check_cohort,
    check_local_work,
    encode_model,
    model_digest,
    round_frame_bytes,
)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class RoundPlan:
    """What Q asks of one round (everything but the weights is the same every round)."""

    run_id: str
    round: int
    target: str
    k: int
    model: str
    dataset: str
    weights: FloatArray
    epochs: int
    batch_size: int
    lr: float
    clip: float | None
    weighting: str
    record_noise: float | None
    record_clip: float
    seed: int
    cohort: int
    noise_multiplier: float | None
    delta: float
    accountant: str
    round_time_s: float | None = None  # when every host answers; None: the cluster's round_time_s
    task: str = "train"  # or "evaluate": the weights evaluated on each instance's own records
    max_examples: int = 0  # evaluate: each instance's records evaluated, at most


def build_round(keys: ActorKeys, roster: Roster, settings: ClusterSettings, plan: RoundPlan) -> TrainingRound:
    """Seal every part of a round to its reader, padded to fixed sizes, and sign it."""
    concepts, expression = compile_named(plan.target)
    vocabulary = set(settings.vocabulary)
    if any(c not in vocabulary for c in concepts):
        raise DispersError(ErrorCode.UNKNOWN_CONCEPT, "training target: a concept is not in the vocabulary")
    if plan.k < settings.k_min:
        raise malformed(f"training: k={plan.k} is below the cluster minimum {settings.k_min}")
    check_cohort(plan.cohort, plan.k, "training")
    round_time = settings.round_time_s if plan.round_time_s is None else float(plan.round_time_s)
    check_local_work(plan.epochs, plan.batch_size, round_time, settings, plan.max_examples)
    da_plan = roster.da_plan()
    qid = new_query_id()
    weights = np.asarray(plan.weights, dtype=np.float64)
    request = TrainingRequest(
        query_id=qid, run_id=plan.run_id, round=plan.round, model=plan.model, dataset=plan.dataset,
        n_params=len(weights), model_digest=model_digest(weights), epochs=plan.epochs,
        batch_size=plan.batch_size, lr=plan.lr, clip=plan.clip, weighting=plan.weighting,
        record_noise=plan.record_noise, record_clip=plan.record_clip, seed=plan.seed, cohort=plan.cohort,
        aggregators=da_plan.leaves, issued_at=time.time(), round_time_s=round_time, task=plan.task,
        max_examples=plan.max_examples,
    )  # fmt: skip
    request_bytes = dumps(request.to_obj())
    signature = keys.signing.sign(request_signing_bytes(request_bytes))
    spec = TrainingSpec(
        query_id=qid, k=plan.k, run_id=plan.run_id, round=plan.round, n_params=len(weights),
        clip=plan.clip, weighting=plan.weighting, cohort=plan.cohort,
        noise_multiplier=plan.noise_multiplier, delta=plan.delta, accountant=plan.accountant,
        task=plan.task, max_examples=plan.max_examples,
    )  # fmt: skip
    unsigned = QueryEnvelope(
        query_id=qid,
        querier=keys.name,
        created_at=time.time(),
        k=plan.k,
        sealed_concepts=seal_padded(
            roster.one(Role.CONCEPT_INDEXOR).sealing_key,
            {"query_id": qid, "concepts": list(concepts)},
            settings.concepts_bytes,
            "training target's concept list",
        ),  # fmt: skip
        sealed_expression=seal_padded(
            roster.one(Role.TARGET_FINDER).sealing_key,
            {"query_id": qid, "expression": expression},
            settings.expression_bytes,
            "training target expression",
        ),  # fmt: skip
        sealed_request=seal_padded(
            roster.one(Role.TARGET).sealing_key,
            {"request": base64.b64encode(request_bytes).decode(), "signature": signature.hex()},
            settings.request_bytes,
            "training request",
        ),  # fmt: skip
        sealed_specs=tuple(
            (da, seal_padded(roster.get(da).sealing_key, spec.to_obj(), settings.spec_bytes, "training spec"))
            for da in da_plan.members
        ),
        plan=da_plan,
        querier_sealing_key=keys.sealing.public,
        querier_verify_key=keys.signing.verify_key,
        cohort=plan.cohort,
    )
    envelope = dataclasses.replace(unsigned, signature=keys.signing.sign(unsigned.signing_bytes()))
    frame = encode_model(qid, weights)
    models = tuple((h.name, seal(h.sealing_key, frame)) for h in roster.by_role(Role.PERSONAL_CLOUD))
    return TrainingRound(envelope, models)


def open_round_result(
    opener: Opener, roster: Roster, settings: ClusterSettings, query_id: str, sealed: bytes, n_params: int
) -> RoundResult:
    """Open the root's sealed round result and check the root signed it for this round."""
    root = roster.da_plan().root
    what = "round result"
    body = open_sealed_signed(
        opener, sealed, round_frame_bytes(n_params), root, roster.get(root).verify_key, what
    )
    if body.get("query_id") != query_id:
        raise malformed(f"{what} belongs to another query")
    raw = base64.b64decode(get_field(body, "average", str, what))
    task = body.get("task", "train")
    if task not in TASKS:
        raise malformed(f"{what}: unknown task")
    if len(raw) != 8 * (EVAL_FIELDS if task == "evaluate" else n_params):
        raise malformed(f"{what}: the average has the wrong length")

    def opt_int(key: str) -> int | None:
        v = body.get(key)
        return v if isinstance(v, int) else None

    left = body.get("budget_left")
    return RoundResult(
        query_id=query_id,
        run_id=get_field(body, "run_id", str, what),
        round=get_field(body, "round", int, what),
        average=np.frombuffer(raw, dtype="<f8").astype(np.float64),
        asked=get_field(body, "asked", int, what),
        contributed=opt_int("contributed"),
        declined=opt_int("declined"),
        dropped=opt_int("dropped"),
        epsilon_charged=float(get_field(body, "epsilon_charged", (int, float), what)),
        epsilon_run=float(get_field(body, "epsilon_run", (int, float), what)),
        budget_left=float(left) if isinstance(left, int | float) else None,
        cut=opt_int("cut"),
        task=str(task),
    )
