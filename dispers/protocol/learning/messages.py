"""What a training round carries: Q's signed instructions, the DAs' spec, the sealed global model.

A round travels as a `QueryEnvelope` (its targeting, sizes and signature checked like any query's)
whose data request, sealed to T, is a `TrainingRequest` signed by Q, and whose aggregate specs are
`TrainingSpec`s; beside it, the global weights sealed by Q to every personal-cloud host of the
roster (`ModelFrame`, whose length depends only on the model's size): C and T relay them
unread, and a host checks them against the digest Q signed into the request.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dispers.core.codec import field as get_field
from dispers.core.config import ClusterSettings
from dispers.core.errors import malformed
from dispers.core.ids import check_query_id
from dispers.core.messages import QueryEnvelope
from dispers.core.wire import MAX_FIELDS, ContributionLayout, pad, unpad

FloatArray = npt.NDArray[np.float64]
WEIGHTINGS = ("examples", "uniform")
MAX_WEIGHT = 1_000_000.0  # records one instance may weigh its update by
DECLINE_CUT = 1  # a decline's reason: its training was stopped by the round time (exact policy only)
TASKS = ("train", "evaluate")
# An evaluation record: the instance's loss sum (each record's loss capped at MAX_LOSS, in units
# of MAX_LOSS), how many of its records the model got right, and how many it evaluated (at most
# the round's max_examples): each at most max_examples, so one person moves the sums by at most
# max_examples * sqrt(3) (L2), whatever their data.
EVAL_FIELDS = 3
MAX_LOSS = 10.0  # nats of cross-entropy one record may add (a sure wrong answer costs more)


def task_layout(task: str, n_params: int) -> ContributionLayout:
    """The fixed record of a round: an update (n_params values and the weight) or an evaluation."""
    return ContributionLayout(EVAL_FIELDS if task == "evaluate" else n_params + 1)


def eval_sensitivity(max_examples: int) -> float:
    """L2 bound on one instance's evaluation record (loss in MAX_LOSS units, correct, count)."""
    return max_examples * math.sqrt(EVAL_FIELDS)


def round_frame_bytes(n_params: int) -> int:
    """The fixed frame of a round's partial sum (to a parent DA) and result (to Q): a vector of
    n_params float64 in base64, and a few counts and names (a function of the model's size)."""
    return 4 * (8 * n_params + 2) // 3 + 2048


def model_digest(weights: FloatArray) -> str:
    """The digest Q signs into the request: hosts train only from these exact weights."""
    return hashlib.blake2b(np.asarray(weights, dtype="<f8").tobytes(), digest_size=32).hexdigest()


def model_frame_size(n_params: int) -> int:
    """Bytes of a padded model frame: the query id, then n_params little-endian float64."""
    return 16 + 8 * n_params


def encode_model(query_id: str, weights: FloatArray) -> bytes:
    """The global weights of a round, framed to their fixed size."""
    raw = bytes.fromhex(query_id) + np.asarray(weights, dtype="<f8").tobytes()
    return pad(raw, model_frame_size(len(weights)), "global model")


def decode_model(frame: bytes, query_id: str, n_params: int) -> FloatArray:
    """Inverse of encode_model, checking it belongs to the round."""
    raw = unpad(frame, model_frame_size(n_params), "global model")
    if len(raw) != model_frame_size(n_params) or raw[:16] != bytes.fromhex(query_id):
        raise malformed("the global model belongs to another round")
    v = np.frombuffer(raw[16:], dtype="<f8").astype(np.float64)
    if not np.isfinite(v).all():
        raise malformed("the global model holds non-finite values")
    return v


def check_cohort(cohort: int, k: int, what: str) -> None:
    """A round's cohort is at least k (Q, T and every DA check it): a smaller one could release
    one person's update, exact where the cluster's policy turns DP off."""
    if cohort < k:
        raise malformed(f"{what}: a cohort of {cohort} is below the round's k={k}")


def check_task(task: str, max_examples: int, what: str) -> None:
    """A round trains, or evaluates at most max_examples (>= 1) records per instance."""
    if task not in TASKS:
        raise malformed(f"{what}: task must be 'train' or 'evaluate'")
    if task == "evaluate" and max_examples < 1:
        raise malformed(f"{what}: an evaluation needs max_examples >= 1")


def check_local_work(
    epochs: int, batch_size: int, round_time_s: float, settings: ClusterSettings, max_examples: int = 0
) -> None:
    """The local work asked of a host is within the cluster's caps (Q checks, T and each host
    refuse): epochs and batch size bound a host's time and memory, the round time how long T
    waits for each host (and a host holds its answer)."""
    if not math.isfinite(round_time_s) or round_time_s <= 0:
        raise malformed("training: round_time_s must be a positive number")
    if max_examples > settings.max_local_batch:
        most = settings.max_local_batch
        raise malformed(f"evaluation: max_examples={max_examples} is above max_local_batch={most}")
    if round_time_s > settings.max_round_time_s:
        cap = settings.max_round_time_s
        raise malformed(f"training: round_time_s={round_time_s:g} is above max_round_time_s={cap:g}")
    if epochs > settings.max_local_epochs:
        raise malformed(f"training: epochs={epochs} is above max_local_epochs={settings.max_local_epochs}")
    if batch_size > settings.max_local_batch:
        cap = settings.max_local_batch
        raise malformed(f"training: batch_size={batch_size} is above max_local_batch={cap}")


def _num(obj: dict[str, Any], key: str, what: str, *, optional: bool = False) -> float | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    v = float(get_field(obj, key, (int, float), what))
    if not math.isfinite(v) or v <= 0:
        raise malformed(f"{what}: {key} must be a positive number")
    return v


def _int(obj: dict[str, Any], key: str, what: str, low: int = 0) -> int:
    v = get_field(obj, key, int, what)
    assert isinstance(v, int)
    if v < low:
        raise malformed(f"{what}: {key} must be at least {low}")
    return v


@dataclass(frozen=True)
class TrainingRequest:
    """Q's signed instructions to each instance of a round's cohort (sealed to T, relayed to hosts)."""

    query_id: str
    run_id: str
    round: int
    model: str
    dataset: str
    n_params: int
    model_digest: str
    epochs: int
    batch_size: int
    lr: float
    clip: float | None
    weighting: str
    record_noise: float | None
    record_clip: float
    seed: int
    cohort: int
    aggregators: tuple[str, ...]
    issued_at: float
    round_time_s: float  # every host answers this long after the request, whatever it did
    task: str = "train"  # or "evaluate": the global model on each instance's own records
    max_examples: int = 0  # evaluate: records of each instance evaluated, at most

    def __post_init__(self) -> None:
        check_query_id(self.query_id)
        if self.weighting not in WEIGHTINGS:
            raise malformed("training request: weighting must be 'examples' or 'uniform'")
        if not 1 <= self.n_params < MAX_FIELDS:
            raise malformed("training request: the model does not fit a contribution record")
        check_task(self.task, self.max_examples, "training request")

    @property
    def layout(self) -> ContributionLayout:
        """The fixed record of the round: an update (n_params weighted values, then the weight),
        or an evaluation (EVAL_FIELDS values)."""
        return task_layout(self.task, self.n_params)

    def to_obj(self) -> dict[str, Any]:
        """JSON form (what Q signs)."""
        return {"kind": "train", **{k: getattr(self, k) for k in self.__dataclass_fields__},
                "aggregators": list(self.aggregators)}  # fmt: skip

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> TrainingRequest:
        """Validate a decoded request."""
        what = "training request"
        if obj.get("kind") != "train":
            raise malformed(f"{what}: not a training request")
        aggs = get_field(obj, "aggregators", list, what)
        if not aggs or not all(isinstance(a, str) for a in aggs):
            raise malformed(f"{what}: aggregators must be names")
        return cls(
            query_id=get_field(obj, "query_id", str, what),
            run_id=get_field(obj, "run_id", str, what)[:64],
            round=_int(obj, "round", what),
            model=get_field(obj, "model", str, what)[:32],
            dataset=get_field(obj, "dataset", str, what)[:32],
            n_params=_int(obj, "n_params", what, 1),
            model_digest=get_field(obj, "model_digest", str, what),
            epochs=_int(obj, "epochs", what, 1),
            batch_size=_int(obj, "batch_size", what, 1),
            lr=float(_num(obj, "lr", what) or 0.0),
            clip=_num(obj, "clip", what, optional=True),
            weighting=get_field(obj, "weighting", str, what),
            record_noise=_num(obj, "record_noise", what, optional=True),
            record_clip=float(_num(obj, "record_clip", what) or 1.0),
            seed=_int(obj, "seed", what),
            cohort=_int(obj, "cohort", what, 1),
            aggregators=tuple(aggs),
            issued_at=float(get_field(obj, "issued_at", (int, float), what)),
            round_time_s=float(_num(obj, "round_time_s", what) or 0.0),
            task=get_field(obj, "task", str, what),
            max_examples=_int(obj, "max_examples", what),
        )


@dataclass(frozen=True)
class TrainingSpec:
    """What each DA of the plan is told about a round (sealed to it by Q)."""

    query_id: str
    k: int
    run_id: str
    round: int
    n_params: int
    clip: float | None
    weighting: str
    cohort: int
    noise_multiplier: float | None  # user-level DP-FedAvg noise at the root, or None
    delta: float
    accountant: str
    task: str = "train"
    max_examples: int = 0

    @property
    def layout(self) -> ContributionLayout:
        """The record of this round (an update, or an evaluation)."""
        return task_layout(self.task, self.n_params)

    @property
    def sum_size(self) -> int:
        """Values summed per record besides the weight: the update, or (loss, correct)."""
        return EVAL_FIELDS - 1 if self.task == "evaluate" else self.n_params

    @property
    def max_weight(self) -> float:
        """The largest weight one record may carry (an evaluation's: its example count)."""
        if self.task == "evaluate":
            return float(self.max_examples)
        return 1.0 if self.weighting == "uniform" else MAX_WEIGHT

    def to_obj(self) -> dict[str, Any]:
        """JSON form."""
        return {"kind": "train", **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_obj(cls, obj: dict[str, Any]) -> TrainingSpec:
        """Validate a decoded spec."""
        what = "training spec"
        if obj.get("kind") != "train":
            raise malformed(f"{what}: not a training spec")
        weighting = get_field(obj, "weighting", str, what)
        if weighting not in WEIGHTINGS:
            raise malformed(f"{what}: weighting must be 'examples' or 'uniform'")
        accountant = get_field(obj, "accountant", str, what)
        if accountant not in ("rdp", "prv"):
            raise malformed(f"{what}: accountant must be 'rdp' or 'prv'")
        delta = float(get_field(obj, "delta", (int, float), what))
        if not 0 <= delta < 1:
            raise malformed(f"{what}: delta must be in [0, 1)")
        spec = cls(
            query_id=get_field(obj, "query_id", str, what),
            k=_int(obj, "k", what, 1),
            run_id=get_field(obj, "run_id", str, what)[:64],
            round=_int(obj, "round", what),
            n_params=_int(obj, "n_params", what, 1),
            clip=_num(obj, "clip", what, optional=True),
            weighting=weighting,
            cohort=_int(obj, "cohort", what, 1),
            noise_multiplier=_num(obj, "noise_multiplier", what, optional=True),
            delta=delta,
            accountant=accountant,
            task=get_field(obj, "task", str, what),
            max_examples=_int(obj, "max_examples", what),
        )
        check_query_id(spec.query_id)
        check_task(spec.task, spec.max_examples, what)
        if spec.n_params >= MAX_FIELDS:
            raise malformed(f"{what}: the model does not fit a contribution record")
        if spec.noise_multiplier is not None and delta <= 0:
            raise malformed(f"{what}: user-level noise needs delta > 0")
        if (
            spec.noise_multiplier is not None
            and spec.task == "train"
            and (spec.clip is None or weighting != "uniform")
        ):
            raise malformed(f"{what}: user-level noise needs a clip norm, uniform weighting and delta > 0")
        return spec


@dataclass(frozen=True)
class TrainingRound:
    """A round as Q submits it: the envelope and the global model sealed to each host."""

    envelope: QueryEnvelope
    sealed_models: tuple[tuple[str, bytes], ...]  # (host, model frame sealed to it)

    def model_for(self, host: str) -> bytes:
        """The model sealed to `host`."""
        for name, ciphertext in self.sealed_models:
            if name == host:
                return ciphertext
        raise malformed(f"the round carries no model for host {host!r}")


@dataclass(frozen=True)
class RoundRequest:
    """T -> host: train these instances; like a ContributionRequest, plus the sealed model."""

    query_id: str
    querier: str
    request: bytes  # the TrainingRequest's canonical bytes, as Q signed them
    request_signature: bytes
    sealed_model: bytes
    instance_ids: tuple[str, ...]
    aggregators: tuple[str, ...]


@dataclass(frozen=True)
class RoundResult:
    """What the root DA releases to Q for a round (sealed and signed)."""

    query_id: str
    run_id: str
    round: int
    average: FloatArray
    asked: int
    contributed: int | None  # exact counts only where the cluster's policy is not DP
    declined: int | None
    dropped: int | None
    epsilon_charged: float
    epsilon_run: float
    budget_left: float | None
    cut: int | None = None  # declines of instances stopped by the round time (exact policy only)
    task: str = "train"  # "evaluate": average holds the (noised) sums of loss, correct, examples
