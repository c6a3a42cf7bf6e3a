"""A host's training op: each instance of the cohort trains on its own records and seals its update.

One model object per round at a host, never one per instance: the cohort members a
host serves are trained together (`dispers.learn.local.train_batched`, torch.func over
instances) from the global weights Q sealed to this host. Every instance asked gets exactly one
record of the round's fixed length, sealed to its DA: a clipped, weighted update, or a decline
(not subscribed, no consent, no records, already answered) that T cannot tell apart.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from dispers.core.codec import loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role, check_query_id
from dispers.core.messages import ContributionBatch, request_signing_bytes
from dispers.crypto import ActorKeys, Opener, seal
from dispers.protocol.common import CLOCK_SKEW_S
from dispers.protocol.learning.messages import (
    DECLINE_CUT,
    RoundRequest,
    TrainingRequest,
    check_local_work,
    decode_model,
    model_digest,
)
from dispers.state.documents import Documents, DocumentStore

if TYPE_CHECKING:  # torch is imported only when a host trains
    from torch import nn

    from dispers.learn.data import FederatedData
    from dispers.learn.local import Stop

log = logging.getLogger(__name__)
STORE_DATASETS = ("health", "digits")  # datasets a host reads from its own documents
Claim = Callable[[str, list[str], npt.NDArray[np.bool_]], list[int]]


@dataclass(frozen=True)
class InstanceRecords:
    """The records a host's instances hold for one dataset: rows of `data` by instance id."""

    rows: dict[str, int]
    data: FederatedData


class HostTrainer:
    """The training half of a personal-cloud host."""

    def __init__(
        self,
        name: str,
        keys: ActorKeys,
        roster: Roster,
        settings: ClusterSettings,
        store: Documents,
        as_of: dt.date | None = None,
        started: float | None = None,
        *,
        wait_out_round: bool = True,
    ) -> None:
        self.name = name
        self._wait_out_round = wait_out_round  # False: a simulation's clock (see the host's)
        # Trainings run beside their answers' clocks, on threads kept between rounds (started
        # only as concurrent rounds need them).
        self._training = ThreadPoolExecutor(max_workers=64, thread_name_prefix=f"train-{name}")
        self._opener = Opener(name, keys.sealing)
        self._roster = roster
        self._settings = settings
        self._store = store
        self._as_of = as_of
        # Requests issued before the host started may have been answered already (as queries).
        self._started = time.time() if started is None else started
        self._data: dict[str, InstanceRecords] = {}
        self._random = secrets.SystemRandom()

    def serve(self, dataset: str, ids: Sequence[str], data: FederatedData) -> None:
        """Hold `data`'s records for the instances `ids` (row i belongs to ids[i])."""
        if len(ids) != data.n_instances:
            raise malformed("one instance id per instance of the dataset")
        self._data[dataset] = InstanceRecords({i: k for k, i in enumerate(ids)}, data)

    def answer(self, request: RoundRequest, claim: Claim) -> ContributionBatch:
        """Check Q's signed request and the sealed model; train the fresh eligible instances.

        The answer leaves `round_time_s` (signed by Q, capped by the cluster) after the request
        came, whatever the host did: training runs beside the answer's clock and is stopped
        between batches when the time is up, and then every instance asked declines, so neither
        the answer's time nor its length depends on anyone's data.
        """
        from dispers.learn.data import DIGITS_SHAPE, HEALTH_COEF
        from dispers.learn.models import ModelShape, build_model, n_params

        received = time.monotonic()
        check_query_id(request.query_id)
        n = len(request.instance_ids)
        if n != len(request.aggregators):
            raise malformed("instance_ids and aggregators differ in length")
        if n > self._settings.batch_size:
            raise malformed(f"a training request asks at most {self._settings.batch_size} instances")
        querier = self._roster.require(request.querier, Role.QUERIER)
        querier.verify_key.verify(
            request_signing_bytes(request.request), request.request_signature, "training request"
        )
        tr = TrainingRequest.from_obj(loads_object(request.request, "training request"))
        if tr.query_id != request.query_id:
            raise malformed("the training request belongs to another round")
        age = time.time() - tr.issued_at
        if age > self._settings.max_query_age_s or age < -CLOCK_SKEW_S or tr.issued_at < self._started:
            raise DispersError(ErrorCode.EXPIRED, "the training request is stale or dated in the future")
        check_local_work(tr.epochs, tr.batch_size, tr.round_time_s, self._settings, tr.max_examples)
        da_keys = {}
        for da in set(request.aggregators):
            if da not in tr.aggregators:
                raise DispersError(
                    ErrorCode.UNAUTHORIZED, "an instance was told to seal to a DA Q did not name"
                )
            da_keys[da] = self._roster.require(da, Role.DATA_AGGREGATOR).sealing_key
        weights = decode_model(
            self._opener.open(request.sealed_model, "global model"), tr.query_id, tr.n_params
        )
        if model_digest(weights) != tr.model_digest:
            raise DispersError(ErrorCode.UNAUTHORIZED, "the global model is not the one the querier signed")
        answer_at = received + tr.round_time_s

        ids = list(request.instance_ids)
        held = self._data.get(tr.dataset)
        # Without records attached (a simulation's), read from the documents themselves: the
        # health task's measurements, or the digits records `dispers import --dataset` wrote.
        from_store = held is None and tr.dataset in STORE_DATASETS
        model = None
        if held is not None or from_store:
            # The model is checked against the registry before anyone's eligibility is looked
            # at, so whether this host fails never depends on its instances' data. One model
            # object per round: torch.func cannot share one between concurrent rounds.
            if held is not None:
                shape = ModelShape(held.data.n_features, held.data.n_classes)
            elif tr.dataset == "digits":
                shape = ModelShape(*DIGITS_SHAPE)
            else:
                shape = ModelShape(len(HEALTH_COEF), 2)  # health_from_store's records
            model = build_model(tr.model, shape)
            if n_params(model) != tr.n_params:
                raise malformed("the training request's model size does not match the registry's model")
        rows = np.array([held.rows.get(i, -1) if held else -1 for i in ids], dtype=np.int64)
        eligible = np.zeros(n, dtype=bool)
        if n and (held is not None or from_store):
            known = self._store.known(ids) & self._store.subscribed(ids)
            if held is not None:
                sizes = held.data.sizes()
                known &= np.where(rows >= 0, sizes[np.maximum(rows, 0)], 0) > 0
            if known.any():
                consent = self._store.identity([i for i, k in zip(ids, known, strict=True) if k])[2]
                eligible[np.flatnonzero(known)] = consent
        fresh = claim(tr.query_id, ids, eligible)
        layout = tr.layout
        keys = [da_keys[a] for a in request.aggregators]
        # What is sent if the training does not finish in time: a decline for every instance
        # asked, sealed now. Only where the cluster's policy releases exact counts does a
        # stopped instance's decline say so (under DP it is a decline like any other).
        reason = 0 if self._settings.dp else DECLINE_CUT
        fallback = [layout.decline(tr.query_id)] * n
        for j in fresh:
            fallback[j] = layout.decline(tr.query_id, reason)

        def seal_declines() -> list[bytes]:
            return [seal(keys[j], fallback[j]) for j in range(n)]

        # A served host seals them before training, ready at the round time whatever happens; a
        # simulation's host (no one times it) only if it sends them: the same boxes, less work.
        declined = seal_declines() if self._wait_out_round else None
        sealed = declined
        if fresh and model is not None:
            job = _Training(
                lambda stop: self._train(tr, model, weights, held, [ids[j] for j in fresh],
                                         [int(rows[j]) for j in fresh], fresh, stop),
                # A trained instance's update, sealed; anyone else (no records after all) a plain
                # decline, whose length is the same.
                lambda updates: [seal(keys[j], updates[j]) if j in updates
                                 else seal(keys[j], layout.decline(tr.query_id)) for j in range(n)],
                tr.query_id,
                self._training,
            )  # fmt: skip
            sealed = job.result_by(answer_at) or declined
        if sealed is None:
            sealed = seal_declines()
        if self._wait_out_round:
            time.sleep(max(0.0, answer_at - time.monotonic()))
        order = list(range(n))
        self._random.shuffle(order)  # the host's own order: T cannot tie an item to a position
        return ContributionBatch(
            tuple(request.aggregators[j] for j in order), tuple(sealed[j] for j in order)
        )

    def _train(
        self,
        tr: TrainingRequest,
        model: nn.Module,
        weights: npt.NDArray[np.float64],
        held: InstanceRecords | None,
        ids: list[str],
        rows: list[int],
        positions: list[int],
        stop: Stop,
    ) -> dict[int, bytes]:
        """Train the fresh eligible instances `ids` together; each one's update record by its
        position in the request (those without records are left out: they decline)."""
        from dispers.learn.aggregate import encode_update
        from dispers.learn.data import digits_from_store, health_from_store
        from dispers.learn.local import LocalSettings, train_batched

        if held is None:
            if not isinstance(self._store, DocumentStore):
                # Measurement series and training records are kept by the SQLite store only.
                raise DispersError(
                    ErrorCode.FAILED_PRECONDITION, "this host's store holds no measurement series"
                )
            if tr.dataset == "digits":
                data = digits_from_store(self._store, ids)
            else:
                data = health_from_store(self._store, ids, self._as_of or dt.date.today())
            chosen = list(range(len(ids)))
            # Each instance's batches are drawn from its own id: the same in every round order.
            seeds = [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=4).digest(), "big") for i in ids]
        else:
            data = held.data
            chosen = seeds = rows
        settings = LocalSettings(
            epochs=tr.epochs, batch_size=tr.batch_size, lr=tr.lr, clip=tr.clip,
            record_noise=tr.record_noise, record_clip=tr.record_clip,
        )  # fmt: skip
        sizes = data.sizes()
        trained = [k for k, r in enumerate(chosen) if sizes[r] > 0]  # no records: a decline
        if tr.task == "evaluate":
            return self._evaluate(tr, model, weights, data, [chosen[k] for k in trained],
                                  [positions[k] for k in trained], stop)  # fmt: skip
        result = train_batched(
            model, weights, [data.records(chosen[k]) for k in trained], [seeds[k] for k in trained],
            settings, seed=tr.seed, round_=tr.round, stop=stop,
        )  # fmt: skip
        out = {}
        for m, k in enumerate(trained):
            w = float(result.examples[m]) if tr.weighting == "examples" else 1.0
            out[positions[k]] = encode_update(tr.layout, tr.query_id, result.updates[m], w)
        return out

    def _evaluate(
        self,
        tr: TrainingRequest,
        model: nn.Module,
        weights: npt.NDArray[np.float64],
        data: FederatedData,
        rows: list[int],
        positions: list[int],
        stop: Stop,
    ) -> dict[int, bytes]:
        """Each instance's evaluation of the global model on its own first max_examples records."""
        from dispers.learn.evaluation import evaluation_record
        from dispers.learn.local import Stopped
        from dispers.learn.models import set_flat

        set_flat(model, weights)
        model.eval()
        out = {}
        for row, position in zip(rows, positions, strict=True):
            if stop():
                raise Stopped
            x, y = data.records(row)
            values = evaluation_record(model, x, y, tr.max_examples)
            out[position] = tr.layout.encode(tr.query_id, 0, values)
        return out


class _Training:
    """A host's local training beside the answer's clock: `result_by(t)` gives the sealed
    records if training (and sealing) finished by monotonic time t, else stops it between
    batches and gives None (the caller sends its declines, at the same time)."""

    def __init__(
        self,
        train: Callable[[Stop], dict[int, bytes]],
        seal_all: Callable[[dict[int, bytes]], list[bytes]],
        query_id: str,
        pool: ThreadPoolExecutor,
    ) -> None:
        self._stop = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._late = False
        self._result: list[bytes] | None = None

        def run() -> None:
            from dispers.learn.local import Stopped

            try:
                sealed = seal_all(train(self._stop.is_set))
            except Stopped:
                log.info("round %s: the round time ran out; the instances asked decline", query_id[:8])
                self._done.set()
                return
            except Exception:  # noqa: BLE001  (torch's, or a document's): every instance declines
                log.warning("round %s: local training failed; the instances asked decline", query_id[:8])
                # Plain declines (not the round time's): sealing nothing but declines.
                try:
                    sealed = seal_all({})
                except Exception:  # noqa: BLE001
                    self._done.set()
                    return
            with self._lock:
                if not self._late:
                    self._result = sealed
            self._done.set()

        pool.submit(run)

    def result_by(self, deadline: float) -> list[bytes] | None:
        """The sealed records if ready by `deadline`; else None, and the training stops."""
        self._done.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._late = self._result is None
            self._stop.set()
            return self._result
