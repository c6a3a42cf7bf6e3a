"""A personal-cloud host: many instances behind one server, each sealing its own contribution."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from dispers.core.codec import loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role, check_query_id
from dispers.core.messages import (
    NONCE_BYTES,
    ContributionBatch,
    ContributionRequest,
    SubscriptionBatch,
    SubscriptionItem,
    SubscriptionOp,
    request_signing_bytes,
)
from dispers.core.spec import DataRequest
from dispers.crypto import ActorKeys, seal
from dispers.crypto.permute import secure_permutation
from dispers.protocol.api import ConductorAPI
from dispers.protocol.authz import authorize
from dispers.protocol.common import CLOCK_SKEW_S, replay_memory_s, seal_padded_strings
from dispers.protocol.instance.concepts import derive_concepts
from dispers.protocol.instance.functions import compute_contributions, group_index
from dispers.state.documents import Documents

if TYPE_CHECKING:
    from dispers.learn.data import FederatedData
    from dispers.protocol.learning.instance import HostTrainer
    from dispers.protocol.learning.messages import RoundRequest

log = logging.getLogger(__name__)


class PersonalCloudHost:
    """Serves every instance in one document store; no process or object per instance."""

    _trainer_obj: HostTrainer | None = None  # the training half, made on first use (needs torch)
    # A simulation's host (every actor in one process, see `simulate_round_time`): answers a
    # training round as soon as it is done, the round counted as lasting its round time.
    _simulated_time = False

    def __init__(
        self,
        name: str,
        keys: ActorKeys,
        roster: Roster,
        settings: ClusterSettings,
        store: Documents,
        conductor: ConductorAPI,
        as_of: dt.date | None = None,
    ) -> None:
        self.name = name
        self._keys = keys
        self._roster = roster
        self._settings = settings
        self._store = store
        self._conductor = conductor
        self._as_of = as_of
        self._memory_s = replay_memory_s(settings)
        self._started = time.time()  # the memory of who answered does not reach back further
        self._ci_key = roster.one(Role.CONCEPT_INDEXOR).sealing_key
        self._t_key = roster.one(Role.TARGET).sealing_key
        # Per query, the instances that already answered: an instance answers a query once.
        self._answered: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()
        self._lock = threading.Lock()

    def address(self, instance_id: str) -> str:
        """The address T stores for an instance of this host."""
        return f"{self.name}/{instance_id}"

    def subscription_batch(self, op: SubscriptionOp, ids: Sequence[str]) -> SubscriptionBatch:
        """Each instance seals its concepts to CI and its address to T, both with one fresh
        nonce and padded to the cluster's fixed sizes; the host signs the batch.

        Concepts outside the cluster's public vocabulary are left out: nobody could ask for
        them. On unsubscribe the concept list is empty: TF removes the instance from every set.
        """
        as_of = self._as_of or dt.date.today()
        settings = self._settings
        if op is SubscriptionOp.SUBSCRIBE:
            vocabulary = set(settings.vocabulary)
            concepts = [
                [c for c in row if c in vocabulary] for row in derive_concepts(self._store, ids, as_of)
            ]
        else:
            concepts = [[] for _ in ids]
        items = []
        for instance_id, row in zip(ids, concepts, strict=True):
            nonce = secrets.token_bytes(NONCE_BYTES).hex()
            items.append(
                SubscriptionItem(
                    sealed_concepts=seal_padded_strings(
                        self._ci_key,
                        {"concepts": row[: settings.max_concepts], "nonce": nonce},
                        settings.concepts_bytes,
                        "concept list",
                    ),
                    sealed_address=seal_padded_strings(
                        self._t_key,
                        {"address": self.address(instance_id), "nonce": nonce},
                        settings.address_bytes,
                        "address",
                    ),
                )  # fmt: skip
            )
        batch = SubscriptionBatch.build(self.name, op, time.time(), tuple(items))
        header = dataclasses.replace(
            batch.header, signature=self._keys.signing.sign(batch.header.signing_bytes())
        )
        return SubscriptionBatch(header, batch.items)

    def subscribe_all(self, caller: str, op: SubscriptionOp) -> int:
        """(Un)subscribe every instance this host serves, in batches; returns how many.

        Only the host itself (its operator, under its identity) may ask. An instance counts
        as subscribed, and answers data requests, once its batch is applied.
        """
        authorize(self._roster, caller, "personal_cloud.subscribe_all", callee=self.name)
        ids = self._store.instance_ids()
        size = self._settings.batch_size
        changed = 0
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            if op is SubscriptionOp.UNSUBSCRIBE:  # stop answering first, whatever happens next
                self._store.set_subscribed(chunk, False)
            changed += self._conductor.subscribe(self.subscription_batch(op, chunk))
            if op is SubscriptionOp.SUBSCRIBE:
                self._store.set_subscribed(chunk, True)
        log.info("%s: %s %d instances", self.name, op.value, len(ids))
        return changed

    def contribute(self, caller: str, request: ContributionRequest) -> ContributionBatch:
        """Answer a signed data request with exactly one item per instance asked, shuffled.

        An instance contributes when it is subscribed, consents, has a value, has not
        answered this query before, and appears for the first time in this request; every
        other position gets a decline of the same length, so T learns nothing from the answer.
        """
        authorize(self._roster, caller, "personal_cloud.contribute", callee=self.name)
        check_query_id(request.query_id)
        n = len(request.instance_ids)
        if n != len(request.aggregators):
            raise malformed("instance_ids and aggregators differ in length")
        if n > self._settings.batch_size:
            raise malformed(f"a contribution request asks at most {self._settings.batch_size} instances")
        querier = self._roster.require(request.querier, Role.QUERIER)
        querier.verify_key.verify(
            request_signing_bytes(request.request), request.request_signature, "data request"
        )
        data = DataRequest.from_obj(loads_object(request.request, "data request"))
        if data.query_id != request.query_id:
            raise malformed("the data request belongs to another query")
        if data.layout.n_fields > self._settings.max_fields:
            raise malformed("the data request asks more than the cluster's max_fields fields")
        age = time.time() - data.issued_at
        if age > self._settings.max_query_age_s or age < -CLOCK_SKEW_S:
            # Older requests could outlive the memory of which instances already answered.
            raise DispersError(ErrorCode.EXPIRED, "the data request is stale or dated in the future")
        if data.issued_at < self._started:
            raise DispersError(
                ErrorCode.EXPIRED,
                "the data request was issued before this host started: it may have answered it",
            )
        da_keys = {}
        for name in set(request.aggregators):
            if name not in data.aggregators:
                raise DispersError(
                    ErrorCode.UNAUTHORIZED,
                    "an instance was told to seal to a DA the querier did not name",
                )
            da_keys[name] = self._roster.require(name, Role.DATA_AGGREGATOR).sealing_key

        ids = list(request.instance_ids)
        eligible = self._store.known(ids) & self._store.subscribed(ids) if ids else np.zeros(0, dtype=bool)
        with self._lock:
            now = time.monotonic()
            while self._answered and now - next(iter(self._answered.values()))[0] > self._memory_s:
                self._answered.popitem(last=False)
            _, answered = self._answered.setdefault(request.query_id, (now, set()))
            fresh: list[int] = []
            for j, instance_id in enumerate(ids):
                if eligible[j] and instance_id not in answered:  # also the first of repeated ids
                    answered.add(instance_id)
                    fresh.append(j)
        local = compute_contributions(
            self._store,
            [ids[j] for j in fresh],
            function=data.function,
            params=data.params,
            as_of=data.as_of,
            group_field=data.group_by.field if data.group_by else None,
            edges=data.group_by.edges if data.group_by else None,
        )
        groups, ok = local.groups, local.ok
        columns = [local.values]
        for function, params in data.extra_fields:  # more fields: an instance lacking any declines
            more = compute_contributions(
                self._store, [ids[j] for j in fresh], function=function, params=params,
                as_of=data.as_of, group_field=None, edges=None,
            )  # fmt: skip
            ok = ok & more.ok
            columns.append(more.values)
        values = np.column_stack(columns)
        then = data.group_by.then if data.group_by else None
        if then is not None:  # a second field: the group is every (first, second) pair
            second = group_index(self._store, [ids[j] for j in fresh], then.field, then.edges, data.as_of)
            ok = ok & (second >= 0)
            groups = np.where(ok, groups * (len(then.edges) - 1) + second, -1)
        layout = data.layout
        records = [layout.decline(request.query_id)] * n
        for k in np.flatnonzero(ok).tolist():
            records[fresh[k]] = layout.encode(request.query_id, int(groups[k]), values[k])
        order = secure_permutation(n).tolist()  # the host's own order: T cannot tie an item to a position
        aggregators = tuple(request.aggregators[j] for j in order)
        ciphertexts = tuple(seal(da_keys[request.aggregators[j]], records[j]) for j in order)
        return ContributionBatch(aggregators, ciphertexts)

    # --- federated training (dispers.protocol.learning.instance) ---------------------------------

    def serve_training_data(self, dataset: str, ids: Sequence[str], data: FederatedData) -> None:
        """Hold training records for instances of this host (the simulation attaches them)."""
        self._trainer().serve(dataset, ids, data)

    def train(self, caller: str, request: RoundRequest) -> ContributionBatch:
        """Answer a training round: exactly one fixed-length sealed update or decline per instance."""
        authorize(self._roster, caller, "personal_cloud.train", callee=self.name)
        return self._trainer().answer(request, self._claim)

    def simulate_round_time(self) -> None:
        """Answer training rounds on a simulated clock: as soon as the work is done, not at the
        round's fixed time. Only for a cluster whose every actor is one experimenter's objects in
        one process (the local training engine's), where no other party times the answer; a
        served host (`dispers serve`) always waits the round time out. Training is still cut
        when the round time runs out on the real clock, so what is trained does not change."""
        with self._lock:
            if self._trainer_obj is not None:
                raise RuntimeError("simulate_round_time comes before the host's first training round")
            self._simulated_time = True

    def _trainer(self) -> HostTrainer:
        from dispers.protocol.learning.instance import HostTrainer

        with self._lock:
            if self._trainer_obj is None:
                self._trainer_obj = HostTrainer(
                    self.name,
                    self._keys,
                    self._roster,
                    self._settings,
                    self._store,
                    self._as_of,
                    self._started,
                    wait_out_round=not self._simulated_time,
                )
            return self._trainer_obj

    def _claim(self, query_id: str, ids: list[str], eligible: npt.NDArray[np.bool_]) -> list[int]:
        """Positions of `ids` that answer `query_id` now: eligible, first time, first occurrence."""
        with self._lock:
            now = time.monotonic()
            while self._answered and now - next(iter(self._answered.values()))[0] > self._memory_s:
                self._answered.popitem(last=False)
            _, answered = self._answered.setdefault(query_id, (now, set()))
            fresh: list[int] = []
            for j, instance_id in enumerate(ids):
                if eligible[j] and instance_id not in answered:
                    answered.add(instance_id)
                    fresh.append(j)
            return fresh
