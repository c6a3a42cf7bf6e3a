"""dispers: privacy-preserving queries over personal clouds.

A researcher's workflow: `dispers up DIR` (a local cluster, each actor its own process),
`dispers populate` or `dispers import` (data in), `dispers subscribe`, `dispers concepts` and
`dispers functions` (what a query may name), `dispers query SPEC --output DIR` (results as JSON,
CSV and plots), `dispers ps`, `dispers down`; `dispers simulate` and `dispers train`.
`--config` is optional: DISPERS_CONFIG, ./cluster.toml or the cluster `dispers up` started.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dispers.core.errors import DispersError, ErrorCode

if TYPE_CHECKING:
    from dispers.core.config import ClusterConfig
    from dispers.core.spec import QueryResult, QuerySpec
    from dispers.transport.grpc_client import QuerierClient

log = logging.getLogger("dispers.cli")


def _load(args: argparse.Namespace) -> ClusterConfig:
    """The cluster config a command acts on: --config, or the default cluster."""
    from dispers.cli.workflow import load_cluster

    return load_cluster(args)


def _keygen(args: argparse.Namespace) -> int:
    from dispers.core.ids import check_name
    from dispers.crypto.keyfiles import write_key_file
    from dispers.crypto.keys import ActorKeys

    keys = ActorKeys.generate(check_name(args.name))
    path = Path(args.out) / f"{args.name}.key"
    write_key_file(path, keys, overwrite=args.force)
    print(f"# wrote {path} (mode 0600); add this to the roster of cluster.toml:")
    print("[[actor]]")
    print(f'name = "{args.name}"')
    print(f'role = "{args.role}"')
    print('endpoint = "127.0.0.1:PORT"')
    print(f'sealing_public_key = "{keys.sealing.public.hex()}"')
    print(f'verify_key = "{keys.signing.verify_key.hex()}"')
    print(f'key_file = "{path}"')
    return 0


def _init(args: argparse.Namespace) -> int:
    from dispers.cli.processes import is_ours, read_state
    from dispers.core.cluster_files import ClusterLayout, write_cluster

    existing = Path(args.directory) / "cluster.toml"
    if existing.exists() and any(is_ours(r) for r in read_state(Path(args.directory).resolve())):
        raise DispersError(
            ErrorCode.FAILED_PRECONDITION,
            f"the cluster in {args.directory} is up: `dispers down --config {existing}` first",
        )
    if existing.exists() and not args.force:
        raise DispersError(
            ErrorCode.FAILED_PRECONDITION,
            f"{existing} exists: a cluster lives there (its keys and ports); pass --force to replace it",
        )
    config = write_cluster(
        Path(args.directory),
        ClusterLayout(
            leaf_aggregators=args.leaf_aggregators,
            hosts=tuple(args.hosts),
            k_min=args.k_min,
            backend=args.backend,
            host_as_of=dt.date.fromisoformat(args.as_of) if args.as_of else None,
            insecure=args.insecure,
        ),
    )
    print(f"wrote {config.path} and {len(config.roster.entries)} key files")
    if args.insecure:
        print("warning: insecure = true: plain gRPC channels and unauthenticated callers; "
              "use this cluster only for experiments on loopback")  # fmt: skip
    else:
        print(f"mutual TLS: cluster CA {config.settings.ca_cert}, a certificate and key per actor")
    for entry in config.roster:
        print(f"  {entry.name:12} {entry.role.value:16} {entry.endpoint}")
    return 0


def _populate(args: argparse.Namespace) -> int:
    from dispers.cli.progress import bar, spinner
    from dispers.simulation.population import MEASURED_KINDS, PopulationSpec, generate
    from dispers.state.documents import DocumentStore

    config = _load(args)
    documents = config.local_for(args.host).documents
    if documents is None:
        raise DispersError(ErrorCode.CONFIG, f"actor {args.host!r} has no documents path")
    spec = PopulationSpec(
        n_instances=args.instances,
        seed=args.seed,
        as_of=dt.date.fromisoformat(args.as_of),
        host=args.host,
    )
    with spinner(f"populate: generating {args.instances} instances"):
        population = generate(spec)
    rows = population.n_instances + sum(len(population.series(k)) for k in MEASURED_KINDS)
    with (
        bar(rows, desc="populate: writing", unit="row", unit_scale=True) as progress,
        DocumentStore(documents) as store,
    ):

        def wrote(n: int) -> None:
            progress.update(n)

        population.write(store, on_rows=wrote)
    print(f"wrote {population.n_instances} instances to {documents}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dispers.core.ids import Role
    from dispers.services.server import serve_forever

    config = _load(args)
    role = Role.parse(args.role)
    if args.name:
        same_role = [e.name for e in config.roster.by_role(role)]
        if args.name not in same_role:
            raise DispersError(
                ErrorCode.NOT_FOUND,
                f"no {role.value} named {args.name!r} (there are: {', '.join(same_role)})",
            )
        entry = config.roster.require(args.name, role)
    else:
        candidates = config.roster.by_role(role)
        if len(candidates) != 1:
            names = ", ".join(e.name for e in candidates)
            print(
                f"error: several {role.value} actors ({names}): pick one with --name",
                file=sys.stderr,
            )
            return 2
        entry = candidates[0]
    serve_forever(config, entry.name)
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    from dispers.cli.progress import polled, spinner
    from dispers.core.messages import SubscriptionOp
    from dispers.transport.grpc_client import PersonalCloudClient, client_for

    config = _load(args)
    op = SubscriptionOp.UNSUBSCRIBE if args.unsubscribe else SubscriptionOp.SUBSCRIBE
    # The deadline grows with the instances: count them when the host's store is on this machine.
    instances = None
    documents = config.local_for(args.host).documents
    if documents is not None and documents.exists():
        from dispers.state.documents import DocumentStore

        with DocumentStore(documents) as store:
            instances, before = store.count(), store.count_subscribed()
    # The host's own administrator: the call is made as the host.
    with client_for(config, args.host, args.host, PersonalCloudClient) as client:
        if instances is None or documents is None:  # a remote host: how long it has taken
            with spinner(f"{op.value}: {args.host}'s instances"):
                count = client.subscribe_all(op, instances)
        else:
            # The host's store is here: a bar of its instances as the host marks each batch.
            from dispers.state.documents import DocumentStore

            path = documents

            def done() -> int | None:
                try:
                    with DocumentStore(path) as store:
                        now = store.count_subscribed()
                except Exception:  # noqa: BLE001  (the host is writing: skip this reading)
                    return None
                return now - before if op is SubscriptionOp.SUBSCRIBE else before - now

            with polled(f"{op.value}: {args.host}", instances, done):
                count = client.subscribe_all(op, instances)
    print(f"{op.value}: {count} instances")
    return 0


def _concepts(args: argparse.Namespace) -> int:
    from dispers.core.ids import Role
    from dispers.transport.grpc_client import ConductorClient, client_for

    config = _load(args)
    if args.offline:
        concepts = config.settings.vocabulary
    else:
        me = args.as_ or config.roster.by_role(Role.QUERIER)[0].name
        conductor = config.roster.one(Role.CONDUCTOR).name
        with client_for(config, me, conductor, ConductorClient) as client:
            concepts = client.get_vocabulary()
    if args.json:
        print(json.dumps(list(concepts)))
    else:
        for concept in concepts:
            print(concept)
    return 0


def _querier_name(config: ClusterConfig, chosen: str | None) -> str:
    """The querier a command acts as: the one named, or the first of the roster."""
    from dispers.core.ids import Role

    queriers = [e.name for e in config.roster.by_role(Role.QUERIER)]
    if chosen and chosen not in queriers or not queriers:
        raise DispersError(
            ErrorCode.UNAUTHORIZED,
            f"{chosen!r} is not a querier of this cluster (queriers: {', '.join(queriers) or 'none'})",
        )
    return chosen or queriers[0]


def _budget(args: argparse.Namespace) -> int:
    from dispers.transport.grpc_client import DataAggregatorClient, client_for

    config = _load(args)
    name = _querier_name(config, args.querier)
    root = config.roster.da_plan().root
    with client_for(config, name, root, DataAggregatorClient) as client:
        status = client.budget(name)
    left = status.left
    if args.json:
        print(json.dumps({
            "querier": name, "queries": status.queries,
            "total": {"epsilon": status.total.epsilon, "delta": status.total.delta},
            "spent": {"epsilon": status.spent.epsilon, "delta": status.spent.delta},
            "left": {"epsilon": left.epsilon, "delta": left.delta},
        }, indent=2))  # fmt: skip
    else:
        print(f"querier {name}: {status.queries} charged queries")
        print(f"epsilon: spent {status.spent.epsilon:g} of {status.total.epsilon:g}, left {left.epsilon:g}")
        print(f"delta:   spent {status.spent.delta:g} of {status.total.delta:g}, left {left.delta:g}")
        if not config.settings.dp:
            print("(this cluster's policy turns differential privacy off: queries are not charged)")
    return 0


def _querier_client(args: argparse.Namespace) -> QuerierClient:
    """A client of the chosen Querier service, calling as that querier (its certificate)."""
    from dispers.transport.grpc_client import QuerierClient, client_for

    config = _load(args)
    name = _querier_name(config, args.querier)
    return client_for(config, name, name, QuerierClient)


def _emit(
    args: argparse.Namespace,
    *,
    query_id: str,
    state: str,
    result: QueryResult | None,
    spec: QuerySpec | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> int:
    """Print a query's end in the chosen format (and write --output files); the exit code."""
    from dispers.cli.render import result_table
    from dispers.results import Result, all_suppressed

    fmt = "json" if getattr(args, "json", False) else args.format
    report = Result(result, spec) if result is not None else None
    if report is not None and getattr(args, "output", None):
        written = report.write(args.output)
        print(f"wrote {', '.join(p.name for p in written)} to {args.output}", file=sys.stderr)
    if fmt == "json":
        print(json.dumps({
            "query_id": query_id, "state": state, "phases": {}, "counts": {},
            "error_code": error_code, "error_message": error_message,
            "result": result.to_obj() if result is not None else None,
            "rows": report.rows() if report is not None else None,
        }, indent=2, default=str))  # fmt: skip
    elif fmt == "csv" and report is not None:
        sys.stdout.write(report.to_csv())
    elif fmt == "table":
        print(f"query {query_id}: {state}")
        if result is not None:
            print(result_table(result))
    if result is None:
        if state in ("refused", "failed"):
            print(f"error: {error_code}: query {state}: {error_message}", file=sys.stderr)
        else:
            print(f"error: query {query_id} has not finished (still {state}): `dispers status {query_id}`",
                  file=sys.stderr)  # fmt: skip
        return 1
    if all_suppressed(result):
        print(
            f"note: every group is suppressed (its noised count is under k = {result.k}, or it has too few "
            "contributors): nothing was released; widen the target or the groups",
            file=sys.stderr if fmt != "table" else sys.stdout,
        )
    return 0


def _query(args: argparse.Namespace) -> int:
    from dispers.cli.progress import spinner
    from dispers.client import run_query
    from dispers.core.errors import QueryFailed
    from dispers.core.spec import load_query_spec
    from dispers.protocol.querier import check_spec_names

    spec = load_query_spec(args.spec)
    check_spec_names(spec)  # before any cluster is asked: unknown names list the valid ones
    with _querier_client(args) as client, spinner("query: submitting") as shown:
        try:
            result = run_query(
                client, spec, timeout_s=args.timeout, on_state=lambda st: shown.describe(f"query: {st}")
            )
        except QueryFailed as exc:
            return _emit(args, query_id=exc.query_id, state=exc.state, result=None, spec=spec,
                         error_code=exc.code.value, error_message=exc.reason)  # fmt: skip
    return _emit(args, query_id=result.query_id, state="done", result=result, spec=spec)


def _status(args: argparse.Namespace) -> int:
    with _querier_client(args) as client:
        outcome = client.outcome(args.query_id, wait_s=args.wait)
    record = outcome.record
    return _emit(args, query_id=record.query_id, state=record.state, result=outcome.result,
                 error_code=record.error_code, error_message=record.error_message)  # fmt: skip


def _demo(args: argparse.Namespace) -> int:
    from dispers.cli.demo import DEFAULT_SPEC, run_demo

    run_demo(
        instances=args.instances,
        seed=args.seed,
        workdir=Path(args.workdir) if args.workdir else None,
        spec_path=Path(args.spec) if args.spec else DEFAULT_SPEC,
        leaf_aggregators=args.leaf_aggregators,
    )
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from dispers.simulation.driver import simulate
    from dispers.simulation.scenario import load_scenario

    scenario = load_scenario(_scenario_path(args.scenario)).with_overrides(
        instances=args.instances, seed=args.seed, dp=None if args.dp is None else args.dp == "on"
    )
    # The memory-backed root DA warns that budgets reset on restart: true of every simulation.
    logging.getLogger("dispers.protocol.assemble").setLevel(logging.ERROR)
    report = simulate(
        scenario,
        shards=args.shards,
        backend=args.backend,
        crypto=args.crypto,
        address=args.address,
        inflight=args.inflight,
        crypto_workers=args.crypto_workers,
        progress=sys.stderr.isatty() and not args.json,
    )
    if args.json:
        print(json.dumps(report.to_obj(), default=str))
    else:
        print(report.render())
    if args.output:
        written = report.write(Path(args.output))
        if not args.json:
            print("\nwrote " + ", ".join(str(p) for p in written))
    return 0 if report.state == "done" else 1


def _scenario_path(name: str) -> Path:
    """A scenario file, or the name of one in simulations/ (``heart_rate``, ``heart-rate``)."""
    path = Path(name)
    if path.exists() or path.suffix == ".toml":
        return path
    for candidate in (name, name.replace("-", "_")):
        found = Path("simulations") / f"{candidate}.toml"
        if found.exists():
            return found
    return path


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from dispers.cli.workflow import CONFIG_HELP, add_commands

    p = argparse.ArgumentParser(
        prog="dispers", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    p.add_argument("--version", action="version", version=f"dispers {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("init", help="write keys, TLS certificates and cluster.toml for a loopback cluster")
    s.add_argument("directory", help="where to write the cluster (created if missing)")
    s.add_argument(
        "--leaf-aggregators", type=int, default=2, help="data aggregators under the root (default 2)"
    )
    s.add_argument("--hosts", nargs="+", default=["pc-1"], help="personal-cloud host names (default pc-1)")
    s.add_argument("--k-min", type=int, default=10, help="the smallest k a query may use (default 10)")
    s.add_argument("--backend", choices=["memory", "sqlite"], default="sqlite", help="actors' stores")
    s.add_argument("--as-of", help="hosts derive concepts as of this date (default: today)")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="no CA or certificates: plain channels, unauthenticated callers (loopback only)",
    )
    s.add_argument("--force", action="store_true", help="replace an existing cluster (new keys and ports)")
    s.set_defaults(fn=_init)

    add_commands(sub)  # up, ps, down, import, functions, fields

    s = sub.add_parser("populate", help="fill a host's document store with a synthetic population")
    s.add_argument("--config", help=CONFIG_HELP)
    s.add_argument("--host", default="pc-1", help="the personal-cloud host to fill (default pc-1)")
    s.add_argument("--instances", type=int, default=10_000, help="how many people (default 10000)")
    s.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    s.add_argument("--as-of", default="2026-11-01", help="the population's 'today' (default 2026-11-01)")
    s.set_defaults(fn=_populate)

    s = sub.add_parser("subscribe", help="ask a host to (un)subscribe all its instances")
    s.add_argument("--config", help=CONFIG_HELP)
    s.add_argument("--host", default="pc-1", help="the personal-cloud host (default pc-1)")
    s.add_argument("--unsubscribe", action="store_true", help="every instance leaves every set")
    s.set_defaults(fn=_subscribe)

    s = sub.add_parser(
        "concepts", help="list the cluster's public concept vocabulary (what queries may name)"
    )
    s.add_argument("--config", help=CONFIG_HELP)
    s.add_argument(
        "--as", dest="as_", metavar="NAME", help="ask the Conductor as this actor (default: a querier)"
    )
    s.add_argument("--offline", action="store_true", help="read the vocabulary from the config, ask no one")
    s.add_argument("--json", action="store_true", help="print a JSON list")
    s.set_defaults(fn=_concepts)

    for name, fn, helptext in (("query", _query, "run a query spec and print or write its result"),
                               ("status", _status, "show a query's state and result")):  # fmt: skip
        s = sub.add_parser(name, help=helptext)
        if name == "query":
            s.add_argument("spec", help="the query spec (TOML; see README)")
        else:
            s.add_argument("query_id", help="the id `dispers query` printed")
        s.add_argument("--config", help=CONFIG_HELP)
        s.add_argument("--querier", help="querier name (default: the first in the roster)")
        s.add_argument("--format", choices=["table", "json", "csv"], default="table",
                       help="what to print: a table (default), JSON, or CSV rows")  # fmt: skip
        s.add_argument("--json", action="store_true", help="the same as --format json")
        s.add_argument("--output", metavar="DIR",
                       help="also write result.json, result.csv and a PNG per statistic in DIR")  # fmt: skip
        if name == "query":
            s.add_argument("--timeout", type=float, default=600.0, help="seconds to wait (default 600)")
        else:
            s.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the query to end")
        s.set_defaults(fn=fn)

    s = sub.add_parser("budget", help="show a querier's privacy budget: spent and left")
    s.add_argument("--config", help=CONFIG_HELP)
    s.add_argument("--querier", help="querier name (default: the first in the roster)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_budget)

    s = sub.add_parser("serve", help="serve one actor of the cluster over gRPC (what `up` runs per actor)")
    s.add_argument("role", help="querier, conductor, concept_indexor, target_finder, target, "
                                "data_aggregator or personal_cloud")  # fmt: skip
    s.add_argument("--config", help=CONFIG_HELP)
    s.add_argument("--name", help="which actor of that role (required when there are several)")
    s.set_defaults(fn=_serve)

    s = sub.add_parser("keygen", help="generate one actor's key file (mode 0600)")
    s.add_argument("name", help="the actor's roster name")
    s.add_argument("--role", default="querier", help="its role (default querier)")
    s.add_argument("--out", default="keys", help="directory of the key file (default keys/)")
    s.add_argument("--force", action="store_true", help="overwrite an existing key file")
    s.set_defaults(fn=_keygen)

    s = sub.add_parser(
        "simulate", help="run a scenario's population and query through the real protocol, in shards"
    )
    s.add_argument(
        "--scenario",
        default="simulations/heart_rate.toml",
        help="scenario TOML: a query spec, maybe with [simulation] and [faults]",
    )
    s.add_argument("--instances", type=int, help="how many personal clouds (default: the scenario's)")
    s.add_argument("--seed", type=int, help="population seed (default: the scenario's)")
    s.add_argument(
        "--crypto",
        choices=("real", "off"),
        default="real",
        help="real libsodium boxes (default) or off, for quick statistical studies",
    )
    s.add_argument("--shards", type=int, help="worker shards (default: one per core)")
    s.add_argument(
        "--inflight", type=int, help="subscription batches in flight (default: shards, at least 2)"
    )
    s.add_argument(
        "--crypto-workers",
        type=int,
        help="processes sealing and opening the central actors' batches of boxes (default: one "
        "per core when the shards run on a Ray cluster at --address, else 0: the driver's threads)",
    )
    s.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local processes, or a Ray actor per shard (the ray extra)",
    )
    s.add_argument("--address", help="the Ray cluster to join (default: start a local Ray)")
    s.add_argument("--dp", choices=("on", "off"), help="the cluster's DP policy (default: the scenario's)")
    s.add_argument("--output", help="directory for report.json and the PNG plots")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(fn=_simulate)

    s = sub.add_parser("demo", help="the heart-rate query over 9 gRPC processes, against ground truth")
    s.add_argument("--instances", type=int, default=10_000, help="synthetic people (default 10000)")
    s.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    s.add_argument("--workdir", help="where to write keys, config, stores and logs (default: a temp dir)")
    s.add_argument("--spec", help="query spec file (default: the heart-rate query)")
    s.add_argument("--leaf-aggregators", type=int, default=2, help="data aggregators under the root")
    s.set_defaults(fn=_demo)

    from dispers.cli.train import add_train_parser

    add_train_parser(sub)
    return p


def _version() -> str:
    from dispers.services.health import package_version

    return package_version()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: every error is one line on stderr (exit 2), never a traceback."""
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command == "serve":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        code = int(args.fn(args))
        sys.stdout.flush()  # here, where a reader that went away is caught, not at exit
        return code
    except DispersError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`dispers ... | head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # a file or directory the user named: one line, not a traceback
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
