"""`dispers demo`: six actors and a personal-cloud host as separate gRPC server processes."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dispers.core.cluster_files import ClusterLayout, write_cluster
from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode
from dispers.core.ids import Role
from dispers.core.messages import SubscriptionOp
from dispers.core.spec import QuerySpec, load_query_spec
from dispers.protocol.api import QueryOutcome
from dispers.simulation.ground_truth import GroupTruth, stats_by_group
from dispers.simulation.population import Population, PopulationSpec, generate
from dispers.state.documents import DocumentStore

DEFAULT_SPEC = Path(__file__).resolve().parent / "heart_rate.toml"


@dataclass
class DemoReport:
    """What the demo measured."""

    config: ClusterConfig
    spec: QuerySpec
    truth: dict[str, GroupTruth] | None
    timings: dict[str, float]
    outcome: QueryOutcome


@contextmanager
def running_cluster(config: ClusterConfig, *, ready_timeout_s: float = 60.0) -> Iterator[None]:
    """Start `dispers serve` for every actor as its own process, as `dispers up` does (logs in
    the cluster's logs/, each actor healthy before this yields); stop exactly those on exit."""
    from dispers.cli.processes import down, up

    up(config, ready_timeout_s=ready_timeout_s)
    try:
        yield
    finally:
        down(config)


def demo_truth(population: Population, spec: QuerySpec) -> dict[str, GroupTruth] | None:
    """The spec's statistics computed directly from the generated population: its target, its
    function and parameters, its groups (numeric edges of one field) and its bounds; None for
    a grouping by categories or by two fields, or several fields per contribution."""
    group_by = spec.group_by
    if spec.fields or (group_by is not None and (group_by.then is not None or group_by.categories)):
        return None
    return stats_by_group(
        population,
        spec.function,
        spec.params,
        spec.as_of,
        group_field=group_by.field if group_by is not None else None,
        edges=group_by.edges if group_by is not None else None,
        bounds=spec.bounds,
        target=spec.target,
    )


def _fresh_workdir(workdir: Path) -> None:
    """Let the demo run again in the same directory: a previous demo's stores and logs go (its
    keys and config are written anew); a directory that is not a dispers cluster is refused."""
    if workdir.exists() and any(workdir.iterdir()):
        if not (workdir / "cluster.toml").is_file():
            raise DispersError(
                ErrorCode.CONFIG, f"{workdir} is not empty and holds no cluster.toml: pick another --workdir"
            )
        from dispers.cli.processes import read_state, stop

        stop(read_state(workdir))  # a previous demo interrupted before it stopped its actors
        for sub in ("state", "logs", "run"):
            shutil.rmtree(workdir / sub, ignore_errors=True)


def run_demo(
    *,
    instances: int = 10_000,
    seed: int = 7,
    workdir: Path | None = None,
    spec_path: Path = DEFAULT_SPEC,
    leaf_aggregators: int = 2,
    out: object = sys.stdout,
) -> DemoReport:
    """Generate a cluster and a population, run the spec's query over gRPC, print the tables."""
    from dispers.cli.render import counts_line, phase_table, result_table
    from dispers.protocol.querier import run_query
    from dispers.state.factory import open_query_store
    from dispers.transport.grpc_client import PersonalCloudClient, QuerierClient, client_for

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)  # type: ignore[call-overload]

    spec = load_query_spec(spec_path)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="dispers-demo-"))
    _fresh_workdir(workdir)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    config = write_cluster(workdir, ClusterLayout(leaf_aggregators=leaf_aggregators, host_as_of=spec.as_of))
    population = generate(PopulationSpec(n_instances=instances, seed=seed, as_of=spec.as_of))
    documents = config.local_for("pc-1").documents
    assert documents is not None
    with DocumentStore(documents) as store:
        population.write(store)
    timings["setup: keys, config, population"] = time.perf_counter() - t0
    say(f"cluster in {workdir} ({len(config.roster.entries)} actors), {instances} instances (seed {seed})")

    t0 = time.perf_counter()
    with running_cluster(config):
        timings["start 9 gRPC server processes"] = time.perf_counter() - t0
        roster = config.roster
        t0 = time.perf_counter()
        host = client_for(config, "pc-1", "pc-1", PersonalCloudClient)  # the host's administrator
        host.subscribe_all(SubscriptionOp.SUBSCRIBE, instances)
        timings[f"subscribe {instances} instances"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        researcher = roster.by_role(Role.QUERIER)[0].name
        querier = client_for(config, researcher, researcher, QuerierClient)
        outcome = run_query(querier, spec, timeout_s=600)
        timings["query, end to end"] = time.perf_counter() - t0
        host.close()
        querier.close()

    truth = demo_truth(population, spec)
    say()
    by = f", by {spec.group_by.field}" if spec.group_by is not None else ""
    say(f"Query: {spec.function} {dict(spec.params)} where {spec.target}{by}")
    say(counts_line(outcome.record))
    if outcome.result is None:
        say(f"no result: {outcome.record.error_code}: {outcome.record.error_message}")
    else:
        say()
        say(result_table(outcome.result, truth))
        if truth is None:
            say("(no ground truth for several fields, or a grouping by categories or by two fields)")
    say()
    # The phases are the Conductor's (its operator's view, from its store): a querier is not
    # shown them, since the collect phase's time grows with the number of targets.
    conductor = config.roster.one(Role.CONDUCTOR).name
    records = open_query_store("sqlite", str(config.local_for(conductor).state_path))
    try:
        operator_record = records.get(outcome.record.query_id)
    finally:
        records.close()
    say(phase_table(operator_record, timings))
    return DemoReport(config, spec, truth, timings, outcome)
