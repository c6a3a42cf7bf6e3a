"""A personal-cloud host: many instances behind one server, each sealing its own contribution."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from dispers.core.codec import dumps, loads_object
from dispers.core.config import ClusterSettings, Roster
from dispers.core.errors import DispersError, ErrorCode, malformed
from dispers.core.ids import Role, check_query_id
from dispers.core.messages import (
    ContributionBatch,
    ContributionRequest,
    SubscriptionItem,
    SubscriptionOp,
    request_signing_bytes,
)
from dispers.core.spec import DataRequest
from dispers.crypto import ActorKeys, seal
from dispers.protocol.api import ConductorAPI
from dispers.protocol.common import CLOCK_SKEW_S
from dispers.protocol.data_aggregator import encode_contribution
from dispers.protocol.instance.concepts import derive_concepts
from dispers.protocol.instance.functions import compute_contributions
from dispers.state.documents import DocumentStore

log = logging.getLogger(__name__)


class PersonalCloudHost:
    """Serves every instance in one document store; no process or object per instance."""

    def __init__(
        self,
        name: str,
        keys: ActorKeys,
        roster: Roster,
        settings: ClusterSettings,
        store: DocumentStore,
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
        self._memory_s = 2 * settings.max_query_age_s
        self._ci_key = roster.one(Role.CONCEPT_INDEXOR).sealing_key
        self._t_key = roster.one(Role.TARGET).sealing_key
        # Per query, the instances that already answered: an instance answers a query once.
        self._answered: OrderedDict[str, tuple[float, set[str]]] = OrderedDict()
        self._lock = threading.Lock()

    def address(self, instance_id: str) -> str:
        """The address T stores for an instance of this host."""
        return f"{self.name}/{instance_id}"

    def subscription_items(self, ids: Sequence[str]) -> list[SubscriptionItem]:
        """Each instance seals its concepts to CI and its address to T."""
        as_of = self._as_of or dt.date.today()
        concepts = derive_concepts(self._store, ids, as_of)
        return [
            SubscriptionItem(
                sealed_concepts=seal(self._ci_key, dumps(c)),
                sealed_address=seal(self._t_key, self.address(i).encode()),
            )
            for i, c in zip(ids, concepts, strict=True)
        ]

    def subscribe_all(self, op: SubscriptionOp) -> int:
        """(Un)subscribe every instance this host serves, in batches; returns how many."""
        ids = self._store.instance_ids()
        size = self._settings.batch_size
        changed = 0
        for start in range(0, len(ids), size):
            changed += self._conductor.subscribe(op, self.subscription_items(ids[start : start + size]))
        log.info("%s: %s %d instances", self.name, op.value, len(ids))
        return changed

    def contribute(self, request: ContributionRequest) -> ContributionBatch:
        """Verify Q's signed data request, compute each instance's value, seal it to its DA."""
        check_query_id(request.query_id)
        if len(request.instance_ids) != len(request.aggregators):
            raise malformed("instance_ids and aggregators differ in length")
        querier = self._roster.require(request.querier, Role.QUERIER)
        querier.verify_key.verify(
            request_signing_bytes(request.request), request.request_signature, "data request"
        )
        data = DataRequest.from_obj(loads_object(request.request, "data request"))
        if data.query_id != request.query_id:
            raise malformed("the data request belongs to another query")
        age = time.time() - data.issued_at
        if age > self._settings.max_query_age_s or age < -CLOCK_SKEW_S:
            # Older requests could outlive the memory of which instances already answered.
            raise DispersError(ErrorCode.EXPIRED, "the data request is stale or dated in the future")
        da_keys = {}
        for name in set(request.aggregators):
            if name not in data.aggregators:
                raise DispersError(
                    ErrorCode.UNAUTHORIZED,
                    "an instance was told to seal to a DA the querier did not name",
                )
            da_keys[name] = self._roster.require(name, Role.DATA_AGGREGATOR).sealing_key

        known = self._store.known(request.instance_ids).tolist()
        with self._lock:
            now = time.monotonic()
            while self._answered and now - next(iter(self._answered.values()))[0] > self._memory_s:
                self._answered.popitem(last=False)
            _, answered = self._answered.setdefault(request.query_id, (now, set()))
            fresh = [j for j, i in enumerate(request.instance_ids) if known[j] and i not in answered]
            answered.update(request.instance_ids[j] for j in fresh)
        ids = [request.instance_ids[j] for j in fresh]
        local = compute_contributions(
            self._store,
            ids,
            function=data.function,
            params=data.params,
            as_of=data.as_of,
            group_field=data.group_by.field if data.group_by else None,
            edges=data.group_by.edges if data.group_by else None,
        )
        aggregators: list[str] = []
        ciphertexts: list[bytes] = []
        for k in np.flatnonzero(local.ok).tolist():
            da = request.aggregators[fresh[k]]
            plaintext = encode_contribution(request.query_id, int(local.groups[k]), float(local.values[k]))
            aggregators.append(da)
            ciphertexts.append(seal(da_keys[da], plaintext))
        declined = len(request.instance_ids) - len(ciphertexts)
        return ContributionBatch(tuple(aggregators), tuple(ciphertexts), declined)
