"""The `dispers` command: keygen, init, populate, serve, subscribe, concepts, query, status, demo, train."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dispers.core.errors import DispersError, ErrorCode

if TYPE_CHECKING:
    from dispers.core.config import ClusterConfig
    from dispers.transport.grpc_client import QuerierClient

log = logging.getLogger("dispers.cli")


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
    from dispers.core.cluster_files import ClusterLayout, write_cluster

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
    from dispers.core.config import load_config
    from dispers.simulation.population import PopulationSpec, generate
    from dispers.state.documents import DocumentStore

    config = load_config(args.config)
    documents = config.local_for(args.host).documents
    if documents is None:
        raise DispersError(ErrorCode.CONFIG, f"actor {args.host!r} has no documents path")
    spec = PopulationSpec(
        n_instances=args.instances,
        seed=args.seed,
        as_of=dt.date.fromisoformat(args.as_of),
        host=args.host,
    )
    population = generate(spec)
    with DocumentStore(documents) as store:
        population.write(store)
    print(f"wrote {population.n_instances} instances to {documents}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from dispers.core.config import load_config
    from dispers.core.ids import Role
    from dispers.services.server import serve_forever

    config = load_config(args.config)
    role = Role.parse(args.role)
    if args.name:
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
    from dispers.core.config import load_config
    from dispers.core.messages import SubscriptionOp
    from dispers.transport.grpc_client import PersonalCloudClient, client_for

    config = load_config(args.config)
    op = SubscriptionOp.UNSUBSCRIBE if args.unsubscribe else SubscriptionOp.SUBSCRIBE
    # The host's own administrator: the call is made as the host.
    with client_for(config, args.host, args.host, PersonalCloudClient) as client:
        count = client.subscribe_all(op)
    print(f"{op.value}: {count} instances")
    return 0


def _concepts(args: argparse.Namespace) -> int:
    from dispers.core.config import load_config
    from dispers.core.ids import Role
    from dispers.transport.grpc_client import ConductorClient, client_for

    config = load_config(args.config)
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

    if chosen:
        return config.roster.require(chosen, Role.QUERIER).name
    return config.roster.by_role(Role.QUERIER)[0].name


def _budget(args: argparse.Namespace) -> int:
    from dispers.core.config import load_config
    from dispers.transport.grpc_client import DataAggregatorClient, client_for

    config = load_config(args.config)
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
    from dispers.core.config import load_config
    from dispers.transport.grpc_client import QuerierClient, client_for

    config = load_config(args.config)
    name = _querier_name(config, args.querier)
    return client_for(config, name, name, QuerierClient)


def _print_outcome(outcome: object, as_json: bool) -> int:
    from dispers.cli.render import counts_line, phase_table, result_table
    from dispers.protocol.api import QueryOutcome

    assert isinstance(outcome, QueryOutcome)
    record = outcome.record
    if as_json:
        print(json.dumps({
            "query_id": record.query_id, "state": record.state, "phases": record.phases,
            "counts": record.counts, "error_code": record.error_code, "error_message": record.error_message,
            "result": outcome.result.to_obj() if outcome.result else None,
        }, indent=2))  # fmt: skip
    else:
        print(counts_line(record))
        if outcome.result is not None:
            print(result_table(outcome.result))
        elif record.error_code:
            print(f"{record.error_code}: {record.error_message}")
        if record.phases:  # the Conductor's operator view; a querier is shown none
            print(phase_table(record))
    return 0 if record.state == "done" else 1


def _query(args: argparse.Namespace) -> int:
    from dispers.core.spec import load_query_spec
    from dispers.protocol.querier import run_query

    spec = load_query_spec(args.spec)
    with _querier_client(args) as client:
        outcome = run_query(client, spec, timeout_s=args.timeout)
    return _print_outcome(outcome, args.json)


def _status(args: argparse.Namespace) -> int:
    with _querier_client(args) as client:
        outcome = client.outcome(args.query_id, wait_s=args.wait)
    return _print_outcome(outcome, args.json)


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(prog="dispers", description=__doc__)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("keygen", help="generate one actor's key file (mode 0600)")
    s.add_argument("name")
    s.add_argument("--role", default="querier")
    s.add_argument("--out", default="keys")
    s.add_argument("--force", action="store_true", help="overwrite an existing key file")
    s.set_defaults(fn=_keygen)

    s = sub.add_parser("init", help="write keys, TLS certificates and cluster.toml for a loopback cluster")
    s.add_argument("directory")
    s.add_argument("--leaf-aggregators", type=int, default=2)
    s.add_argument("--hosts", nargs="+", default=["pc-1"])
    s.add_argument("--k-min", type=int, default=10)
    s.add_argument("--backend", choices=["memory", "sqlite"], default="sqlite")
    s.add_argument("--as-of", help="hosts derive concepts as of this date (default: today)")
    s.add_argument(
        "--insecure",
        action="store_true",
        help="no CA or certificates: plain channels, unauthenticated callers (loopback only)",
    )
    s.set_defaults(fn=_init)

    s = sub.add_parser("populate", help="fill a host's document store with a synthetic population")
    s.add_argument("--config", required=True)
    s.add_argument("--host", default="pc-1")
    s.add_argument("--instances", type=int, default=10_000)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--as-of", default="2026-11-01")
    s.set_defaults(fn=_populate)

    s = sub.add_parser("serve", help="serve one actor of the cluster over gRPC")
    s.add_argument("role", help="querier, conductor, concept_indexor, target_finder, target, "
                                "data_aggregator or personal_cloud")  # fmt: skip
    s.add_argument("--config", required=True)
    s.add_argument("--name", help="which actor of that role (required when there are several)")
    s.set_defaults(fn=_serve)

    s = sub.add_parser("subscribe", help="ask a host to (un)subscribe all its instances")
    s.add_argument("--config", required=True)
    s.add_argument("--host", default="pc-1")
    s.add_argument("--unsubscribe", action="store_true")
    s.set_defaults(fn=_subscribe)

    s = sub.add_parser(
        "concepts", help="list the cluster's public concept vocabulary (what queries may name)"
    )
    s.add_argument("--config", required=True)
    s.add_argument(
        "--as", dest="as_", metavar="NAME", help="ask the Conductor as this actor (default: a querier)"
    )
    s.add_argument("--offline", action="store_true", help="read the vocabulary from the config, ask no one")
    s.add_argument("--json", action="store_true", help="print a JSON list")
    s.set_defaults(fn=_concepts)

    s = sub.add_parser("budget", help="show a querier's privacy budget: spent and left")
    s.add_argument("--config", required=True)
    s.add_argument("--querier", help="querier name (default: the first in the roster)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_budget)

    for name, fn, helptext in (("query", _query, "submit a query spec to the Querier and print the result"),
                               ("status", _status, "show a query's state and result")):  # fmt: skip
        s = sub.add_parser(name, help=helptext)
        s.add_argument("spec" if name == "query" else "query_id")
        s.add_argument("--config", required=True)
        s.add_argument("--querier", help="querier name (default: the first in the roster)")
        s.add_argument("--json", action="store_true", help="print JSON instead of tables")
        if name == "query":
            s.add_argument("--timeout", type=float, default=600.0)
        else:
            s.add_argument("--wait", type=float, default=0.0)
        s.set_defaults(fn=fn)

    s = sub.add_parser("demo", help="the heart-rate query over 9 gRPC processes, against ground truth")
    s.add_argument("--instances", type=int, default=10_000)
    s.add_argument("--seed", type=int, default=7)
    s.add_argument("--workdir", help="where to write keys, config, stores and logs (default: a temp dir)")
    s.add_argument("--spec", help="query spec file (default: the heart-rate query)")
    s.add_argument("--leaf-aggregators", type=int, default=2)
    s.set_defaults(fn=_demo)

    from dispers.cli.train import add_train_parser

    add_train_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    if args.command == "serve":
        level = min(level, logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except DispersError as exc:
        print(f"error: {exc.code.value}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
