"""Training through the actors: each round is a query of the training kind, sealed end to end.

`ClusterEngine` builds a cluster in a temporary directory (keys, TLS certificates, cluster.toml,
one host whose instances hold the dataset's records) and runs every actor in this process:
`engine = "local"` over the in-process transport, `engine = "grpc"` each as a gRPC service on
loopback with mutual TLS. Either way the sealing and signatures are real. It subscribes the
instances and runs each round as the Querier: `submit_round`, then the root DA's sealed average
update, opened by Q only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from torch import nn

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.messages import SubscriptionOp
from dispers.learn.config import ExperimentConfig
from dispers.learn.data import FederatedData
from dispers.learn.engine import K_MIN, EvaluationOutput, RoundOutput
from dispers.learn.models import n_params
from dispers.protocol.data_aggregator import DataAggregator
from dispers.protocol.instance.host import PersonalCloudHost
from dispers.protocol.learning.messages import RoundResult
from dispers.protocol.learning.querier import RoundPlan
from dispers.state.documents import DocumentStore, epoch_day

FloatArray = npt.NDArray[np.float64]
TRAIN_CONCEPT = "cohort:train"
HEALTH_TARGET = "has:heart_rate"  # a running cluster's instances that measure their heart rate
# What a running cluster's hosts train on, by dataset: who is targeted. digits: the instances
# `dispers import --dataset digits` wrote, each in the cohort it declares.
CLUSTER_TARGETS = {"health": HEALTH_TARGET, "digits": "cohort:digits"}
HOST = "pc-1"
AS_OF = dt.date(2026, 11, 1)


def instance_ids(n: int) -> list[str]:
    """The instance ids the simulated host gives the dataset's instances."""
    return [f"inst-{i:07d}" for i in range(n)]


def write_training_cluster(
    directory: Path,
    data: FederatedData,
    *,
    dp: bool,
    k_min: int = K_MIN,
    leaf_aggregators: int = 2,
    extra_settings: dict[str, float] | None = None,
    insecure: bool = False,
    backend: str = "memory",
) -> ClusterConfig:
    """Keys, cluster.toml and a host store whose instances hold the dataset (returns the config).

    The actors' stores (query records, directories, the budget ledger) are in memory by default:
    an experiment's cluster lives as long as its run ("sqlite" keeps them on disk).
    """
    config = write_cluster(
        directory,
        ClusterLayout(
            leaf_aggregators=leaf_aggregators, k_min=k_min, batch_size=1000, host_as_of=AS_OF,
            cohorts=(TRAIN_CONCEPT,), dp=dp, extra_settings=dict(extra_settings or {}), insecure=insecure,
            backend=backend,
        ),
    )  # fmt: skip
    ids = instance_ids(data.n_instances)
    documents = config.local_for(HOST).documents
    assert documents is not None
    with DocumentStore(documents) as store:
        n = len(ids)
        store.add_instances(
            ids,
            np.full(n, epoch_day(AS_OF) - 30 * 365),
            ["F" if i % 2 else "M" for i in range(n)],
            np.ones(n),
        )
        store.declare_concepts(ids, [TRAIN_CONCEPT] * n)
    return config


def timed_round(config: ExperimentConfig, data: FederatedData, model: nn.Module) -> float:
    """A round time for a cluster `dispers train` builds itself, whose one host (in this process)
    trains its whole cohort at once: that training timed here, once torch is warm, on the largest
    instances (twice the cohort: T's Poisson draw varies around it), twice over plus a second.
    The data is the experiment's own, so nothing about anyone leaks by it."""
    import copy

    from dispers.learn.local import train_batched
    from dispers.learn.models import get_flat
    from dispers.learn.shards import local_settings

    sizes = data.sizes()
    largest = [int(i) for i in np.argsort(-sizes, kind="stable")[: 2 * config.training.cohort] if sizes[i]]
    if not largest:
        return 1.0
    twin = copy.deepcopy(model)
    settings = local_settings(config)
    w = get_flat(twin)
    # A first call pays torch's one-time costs (imports, torch.func setup), which the host does not.
    train_batched(twin, w, [data.records(largest[-1])], largest[-1:], dataclasses.replace(settings, epochs=1),
                  seed=config.seed, round_=0)  # fmt: skip
    start = time.monotonic()
    train_batched(twin, w, [data.records(i) for i in largest], largest, settings, seed=config.seed, round_=0)
    return 1.0 + 2 * (time.monotonic() - start)


class ClusterEngine:
    """Rounds through the actors of an in-process cluster (real sealing, signatures and ledger)."""

    def __init__(
        self,
        config: ExperimentConfig,
        data: FederatedData,
        model: nn.Module,
        *,
        directory: Path | None = None,
        leaf_aggregators: int = 2,
        cluster_config: ClusterConfig | None = None,
    ) -> None:
        """Write a cluster (in `directory`, else a temporary one) unless `cluster_config` is given
        (one made by `write_training_cluster`, perhaps with another DA tree); with engine
        "cluster", join the running cluster of `config.cluster` as its querier instead."""
        self._config = config
        self._n_params = n_params(model)
        self._closers: list[Callable[[], None]] = []
        self._run_id = uuid.uuid4().hex[:16]
        self._tmp = None
        self.das: dict[str, DataAggregator] = {}
        self._round_time: float | None = None  # None: the running cluster's round_time_s
        self.clock = "real"  # "simulated": hosts answer when done, each round counted as its round time
        if config.engine == "cluster":
            self._join(config)
            return
        self._target = TRAIN_CONCEPT
        if directory is None and cluster_config is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dispers-train-")
        root = directory or Path(self._tmp.name if self._tmp else ".")
        p = config.privacy
        extra = {
            "budget_epsilon": p.budget_epsilon,
            "budget_delta": min(0.5, 10 * p.delta),
            "max_delta": p.delta,
        }
        if cluster_config is None:
            cluster_config = write_training_cluster(
                root, data, dp=p.user_level, leaf_aggregators=leaf_aggregators, extra_settings=extra
            )
        self.cluster_config = cluster_config
        actors = (
            self._start_grpc(cluster_config) if config.engine == "grpc" else self._start_local(cluster_config)
        )
        self.das = {n: a for n, a in actors.items() if isinstance(a, DataAggregator)}
        host = actors[HOST]
        assert isinstance(host, PersonalCloudHost)
        self.clock = "real" if config.engine == "grpc" else (config.training.clock or "simulated")
        if self.clock == "simulated":
            host.simulate_round_time()
        host.serve_training_data(config.data.dataset, instance_ids(data.n_instances), data)
        self._k = cluster_config.settings.k_min
        if config.training.round_time_s is None:
            self._round_time = min(timed_round(config, data, model), cluster_config.settings.max_round_time_s)

    def _join(self, config: ExperimentConfig) -> None:
        """A running cluster (`dispers serve` ...): its hosts train on their own documents."""
        from dispers.core.config import load_config
        from dispers.core.ids import Role
        from dispers.transport.grpc_client import QuerierClient, client_for

        target = CLUSTER_TARGETS.get(config.data.dataset)
        if target is None:
            names = " or ".join(repr(d) for d in CLUSTER_TARGETS)
            raise DispersError(
                ErrorCode.CONFIG,
                f"experiment: engine 'cluster' trains on the hosts' documents: data.dataset must be {names}",
            )
        assert config.cluster is not None
        cluster_config = load_config(config.cluster)
        self.cluster_config = cluster_config
        if target not in cluster_config.settings.vocabulary:
            raise DispersError(
                ErrorCode.CONFIG,
                f"experiment: data.dataset {config.data.dataset!r} trains the instances in {target}, "
                "which the cluster's vocabulary does not hold",
            )
        queriers = [e.name for e in cluster_config.roster.by_role(Role.QUERIER)]
        name = config.querier or (queriers[0] if queriers else "")
        if name not in queriers:
            raise DispersError(ErrorCode.CONFIG, f"experiment: the cluster has no querier {name!r}")
        querier = client_for(cluster_config, name, name, QuerierClient)
        self._closers.append(querier.close)
        self._querier: Any = querier
        self._target = target
        self._k = cluster_config.settings.k_min

    def _start_local(self, cluster_config: ClusterConfig) -> dict[str, object]:
        """Every actor an object of this process, calls as method calls (the in-process transport)."""
        from dispers.transport.local import AsCaller, LocalCluster

        cluster = LocalCluster.from_config(cluster_config)
        self._closers.append(cluster.close)
        cluster.host_admin(HOST).subscribe_all(SubscriptionOp.SUBSCRIBE)
        querier = cluster.querier_object()
        self._querier = AsCaller(querier, querier.name)
        return {"conductor": cluster.conductor_actor, **cluster.das, **cluster.hosts}

    def _start_grpc(self, cluster_config: ClusterConfig) -> dict[str, object]:
        """Every actor a gRPC service on loopback (mutual TLS), served from this process."""
        from dispers.core.ids import Role
        from dispers.services.server import start_all_in_process
        from dispers.transport.grpc_client import PersonalCloudClient, QuerierClient, client_for

        servers = start_all_in_process(cluster_config)
        self._closers.extend(lambda s=s: s.stop(0) for s in servers)  # type: ignore[misc]
        name = cluster_config.roster.by_role(Role.QUERIER)[0].name
        querier = client_for(cluster_config, name, name, QuerierClient)
        self._closers.insert(0, querier.close)
        with client_for(cluster_config, HOST, HOST, PersonalCloudClient) as host:
            host.subscribe_all(SubscriptionOp.SUBSCRIBE)
        self._querier = querier
        return {s.name: s.actor for s in servers}

    @property
    def round_time_s(self) -> float:
        """How long each round lasts: on the real clock, or counted so on a simulated one."""
        t = self._config.training.round_time_s or self._round_time
        return float(t if t is not None else self.cluster_config.settings.round_time_s)

    def plan(self, round_: int, weights: FloatArray) -> RoundPlan:
        """What the Querier asks of round `round_`."""
        c, t, p = self._config, self._config.training, self._config.privacy
        return RoundPlan(
            run_id=self._run_id, round=round_, target=self._target, k=self._k, model=c.model,
            dataset=c.data.dataset, weights=weights, epochs=t.local_epochs, batch_size=t.batch_size,
            lr=t.lr, clip=t.clip, weighting=t.weighting, record_noise=p.record_noise,
            record_clip=p.record_clip, seed=c.seed, cohort=t.cohort,
            noise_multiplier=p.noise_multiplier if p.user_level else None, delta=p.delta,
            accountant=p.accountant, round_time_s=t.round_time_s or self._round_time,
        )  # fmt: skip

    def evaluation_plan(self, index: int, weights: FloatArray) -> RoundPlan:
        """What the Querier asks of federated evaluation `index`: the same target and cohort as
        training, on a run of its own (its rounds accounted apart from training's)."""
        e, p = self._config.evaluation, self._config.privacy
        return dataclasses.replace(
            self.plan(index, weights), run_id=f"{self._run_id}-eval", task="evaluate",
            max_examples=e.max_examples, epochs=1, batch_size=1, clip=None, weighting="examples",
            record_noise=None, noise_multiplier=e.noise_multiplier if p.user_level else None,
        )  # fmt: skip

    def run_evaluation(self, index: int, weights: FloatArray) -> EvaluationOutput:
        """Submit federated evaluation `index` as the Querier; open the root's released sums."""
        from dispers.learn.evaluation import metrics

        result = self._outcome(self._querier.submit_round(self.evaluation_plan(index, weights)),
                               f"evaluation {index + 1}")  # fmt: skip
        if result.task != "evaluate":
            raise DispersError(ErrorCode.MALFORMED, "the root released a training round for an evaluation")
        loss, acc = metrics(result.average)
        return EvaluationOutput(result.average, loss, acc, result.epsilon_run, result.budget_left)

    def _outcome(self, qid: str, what: str) -> RoundResult:
        """Wait for a submitted round's released result (a clear error if it has none)."""
        deadline = time.monotonic() + 3600
        while True:
            record, result = self._querier.round_outcome(qid, self._n_params, 30.0)
            if record.state in ("done", "refused", "failed") or time.monotonic() > deadline:
                break
        if result is None:
            code = ErrorCode(record.error_code) if record.error_code else ErrorCode.INTERNAL
            message = record.error_message or f"{what} did not finish"
            if code is not ErrorCode.BUDGET_EXCEEDED:
                message = f"{what} {record.state}: {message}"
            raise DispersError(code, message)
        assert isinstance(result, RoundResult)
        return result

    def run_round(self, round_: int, weights: FloatArray) -> RoundOutput:
        """Submit the round as the Querier and wait for the root's sealed average update."""
        result = self._outcome(self._querier.submit_round(self.plan(round_, weights)), f"round {round_ + 1}")
        # T Poisson-samples the cohort (`asked` is its expected size): Q cannot tell instances
        # drawn but lost (no address, a host down; T's count, in C's record, which Q is not
        # shown) from the draw's variation, so it reports none.
        lost = 0
        return RoundOutput(
            average_update=result.average,
            asked=result.asked,
            contributed=result.contributed,
            declined=result.declined,
            unreachable=lost,
            train_loss=None,
            epsilon_spent=result.epsilon_run,
            budget_left=result.budget_left,
            cut=result.cut,
        )

    def close(self) -> None:
        """Close the actors' stores and remove the temporary cluster."""
        for close in self._closers:
            close()
        self._closers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
