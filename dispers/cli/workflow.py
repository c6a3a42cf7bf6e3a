"""The researcher's workflow commands: up, ps, down, import, functions, fields."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dispers.core.config import ClusterConfig
from dispers.core.errors import DispersError, ErrorCode

CONFIG_HELP = (
    "the cluster's cluster.toml or its directory (default: $DISPERS_CONFIG, ./cluster.toml, "
    "or the cluster `dispers up` started)"
)


def load_cluster(args: argparse.Namespace) -> ClusterConfig:
    """The cluster config a command acts on: --config, or the default cluster."""
    from dispers.core.config import load_config
    from dispers.core.defaults import resolve_config

    return load_config(resolve_config(getattr(args, "config", None)))


def _up(args: argparse.Namespace) -> int:
    from dispers.cli.processes import up
    from dispers.cli.progress import bar
    from dispers.core.cluster_files import ClusterLayout, write_cluster
    from dispers.core.config import load_config
    from dispers.core.defaults import CONFIG_NAME, remember, resolve_config

    t0 = time.perf_counter()
    if args.directory:
        target = Path(args.directory)
        path = target if target.suffix == ".toml" else target / CONFIG_NAME
        if target.suffix != ".toml" and not path.is_file():
            directory = target
            if directory.exists() and any(directory.iterdir()):
                raise DispersError(
                    ErrorCode.CONFIG, f"{directory} is not empty and holds no {CONFIG_NAME}: pick another"
                )
            write_cluster(directory, ClusterLayout())
            print(f"created a cluster in {directory} (keys, certificates, {CONFIG_NAME})")
        config = load_config(path)
    else:
        config = load_config(resolve_config(args.config))
    n = len(config.roster.entries)
    with bar(n, desc="starting actors", unit="actor") as progress:

        def ready(_name: str) -> None:
            progress.update()

        started = up(config, ready_timeout_s=args.timeout, on_ready=ready)
    assert config.path is not None
    remember(Path(config.path))
    print(f"cluster {Path(config.path).resolve().parent}: {len(started)} actors up and healthy "
          f"in {time.perf_counter() - t0:.1f} s; logs in {Path(started[0].log).parent}")  # fmt: skip
    for s in started:
        print(f"  {s.name:12} {s.role:16} pid {s.pid}")
    return 0


def _ps(args: argparse.Namespace) -> int:
    from dispers.cli.processes import status
    from dispers.cli.render import table

    config = load_cluster(args)
    rows = status(config)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        cells = [
            [r.name, r.role, r.endpoint, "-" if r.pid is None else str(r.pid), r.process, r.health]
            for r in rows
        ]
        print(table(["name", "role", "endpoint", "pid", "process", "health"], cells, left=(0, 1, 2, 4, 5)))
    return 0 if all(r.health == "healthy" for r in rows) else 1


def _down(args: argparse.Namespace) -> int:
    from dispers.cli.processes import down

    config = load_cluster(args)
    stopped, skipped = down(config, grace_s=args.grace)
    if not stopped and not skipped:
        assert config.path is not None
        print(f"nothing to stop: `dispers up` recorded no process for {Path(config.path).resolve().parent}")
        return 0
    print(f"stopped {len(stopped)} actors" + (f" ({', '.join(s.name for s in stopped)})" if stopped else ""))
    for record in skipped:
        print(f"  {record.name}: pid {record.pid} is no longer the process `up` started: left alone")
    return 0


def _import(args: argparse.Namespace) -> int:
    from dispers.cli.progress import bar
    from dispers.state.documents import DocumentStore
    from dispers.state.importing import import_batch, read_import_file

    config = load_cluster(args)
    try:
        documents = config.local_for(args.host).documents
    except DispersError:
        documents = None
    if documents is None:
        hosts = ", ".join(e.name for e in config.roster if config.local_for(e.name).documents is not None)
        raise DispersError(ErrorCode.NOT_FOUND, f"no host {args.host!r} with documents (hosts: {hosts})")
    if args.dataset is not None:
        if args.file is not None:
            raise DispersError(ErrorCode.CONFIG, "import: give a FILE or --dataset, not both")
        return _import_dataset(args, config, documents)
    if args.file is None:
        raise DispersError(ErrorCode.CONFIG, "import: give a FILE (CSV or JSON Lines) or --dataset digits")
    path = Path(args.file)
    if not path.is_file():
        raise DispersError(ErrorCode.NOT_FOUND, f"no file {path}")
    t0 = time.perf_counter()
    with bar(os.path.getsize(path), desc=f"checking {path.name}", unit="B", unit_scale=True) as progress:

        def wrap(handle: IO[str]) -> Iterator[str]:
            pending = 0
            for line in handle:  # counts characters read (bytes, for ASCII files)
                pending += len(line)
                if pending > 1 << 16:
                    progress.update(pending)
                    pending = 0
                yield line
            progress.update(pending)

        batch = read_import_file(
            path, file_format_name=args.format, vocabulary=config.settings.vocabulary, wrap=wrap
        )
    if args.dry_run:
        print(f"{path.name} is valid: {batch.rows} rows ({len(batch.person_ids)} people, "
              f"{batch.n_measurements} measurements); nothing written (--dry-run)")  # fmt: skip
        return 0
    with DocumentStore(documents) as store:
        report = import_batch(store, batch, path.name)
    seconds = time.perf_counter() - t0
    print(f"imported {path.name} into {args.host}: {report.people} people, {report.measurements} "
          f"measurements, {report.cohorts} cohort memberships ({report.rows} rows in {seconds:.1f} s); "
          f"`dispers subscribe --host {args.host}` makes them answer queries")  # fmt: skip
    return 0


def _import_dataset(args: argparse.Namespace, config: ClusterConfig, documents: Path) -> int:
    """`dispers import --dataset digits`: a registered dataset's training split, one synthetic
    person per instance (consenting, in the dataset's cohort), their records in the host's store."""
    from dispers.learn.data import digits
    from dispers.state.documents import DocumentStore, epoch_day

    cohort = f"cohort:{args.dataset}"
    if cohort not in config.settings.vocabulary:
        raise DispersError(
            ErrorCode.CONFIG,
            f"import: the cluster's vocabulary has no {cohort} (add it to [cluster] vocabulary)",
        )
    if args.instances < 1:
        raise DispersError(ErrorCode.CONFIG, "import: --instances must be at least 1")
    if not args.alpha > 0:
        raise DispersError(ErrorCode.CONFIG, "import: --alpha must be a positive number")
    data = digits(n_instances=args.instances, split=args.split, alpha=args.alpha, seed=args.seed)
    ids = dataset_instance_ids(args.dataset, args.instances)
    n = len(ids)
    if args.dry_run:
        print(f"{args.dataset}: {n} instances, {len(data.y)} records; nothing written (--dry-run)")
        return 0
    born = epoch_day(dt.date(1990, 1, 1))
    with DocumentStore(documents) as store:
        store.import_documents(
            people=(ids, [born] * n, ["F" if i % 2 else "M" for i in range(n)], [True] * n),
            measurements={},
            declared=(ids, [cohort] * n),
        )
        store.import_training_records(args.dataset, ids, data.offsets, data.x.numpy(), data.y.numpy())
    print(f"imported {args.dataset} into {args.host}: {n} instances ({ids[0]} ...), {len(data.y)} records "
          f"(split {args.split}, seed {args.seed}; the seed's 20 % held out stays the querier's test set), "
          f"in {cohort}; `dispers subscribe --host {args.host}` makes them answer")  # fmt: skip
    return 0


def dataset_instance_ids(dataset: str, n: int) -> list[str]:
    """The ids `dispers import --dataset` gives a dataset's instances."""
    return [f"{dataset}-{i:06d}" for i in range(n)]


def _functions(args: argparse.Namespace) -> int:
    from dispers.cli.render import table
    from dispers.protocol.instance.functions import describe_fields, describe_functions

    functions = describe_functions()
    fields = describe_fields()
    if args.json:
        print(json.dumps({
            "functions": [{
                "name": f.name, "kind": f.kind, "statistic": f.statistic, "unit": f.unit,
                "summary": f.summary, "bounds": [f.lower, f.upper],
                "params": {k: {"default": p.default, "min": p.lo, "max": p.hi} for k, p in f.params.items()},
            } for f in functions],
            "group_by_fields": [{
                "name": f.name, "unit": f.unit, "summary": f.summary, "categories": dict(f.categories),
            } for f in fields],
        }, indent=2))  # fmt: skip
        return 0
    rows = []
    for f in functions:
        params = ", ".join(f"{k}={p.default} [{p.lo}..{p.hi}]" for k, p in f.params.items()) or "-"
        rows.append([f.name, params, f"[{f.lower:g}, {f.upper:g}]", f.unit or "-", f.summary])
    print(table(["function", "params (default [range])", "natural bounds", "unit", "computes"], rows,
                left=(0, 1, 3, 4)))  # fmt: skip
    print()
    print(_fields_table(fields))
    print("\nA spec names one function under [data] function, its params under [data] params and "
          "a group_by field; [aggregate] bounds should lie within the natural bounds.")  # fmt: skip
    return 0


def _fields_table(fields: Any) -> str:
    from dispers.cli.render import table

    rows = [[f.name, f.unit or "-", ", ".join(f.categories) or "(numeric edges)", f.summary] for f in fields]
    return table(["group-by field", "unit", "categories", "what"], rows, left=(0, 1, 2, 3))


def _fields(args: argparse.Namespace) -> int:
    from dispers.protocol.instance.functions import describe_fields

    fields = describe_fields()
    if args.json:
        print(json.dumps([{"name": f.name, "unit": f.unit, "summary": f.summary,
                           "categories": dict(f.categories)} for f in fields], indent=2))  # fmt: skip
    else:
        print(_fields_table(fields))
    return 0


def add_commands(sub: Any) -> None:
    """Add up, ps, down, import, functions and fields to the `dispers` parser."""
    s = sub.add_parser(
        "up", help="start every actor of a local cluster as its own process; wait until healthy"
    )
    s.add_argument("directory", nargs="?",
                   help="cluster directory or cluster.toml (created with defaults if the directory "
                        "is new; default: the default cluster)")  # fmt: skip
    s.add_argument("--config", help=CONFIG_HELP + " (when no directory is given)")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for every actor (default 60)")
    s.set_defaults(fn=_up)

    s = sub.add_parser("ps", help="show the cluster's actors: process and health")
    s.add_argument("--config", help=CONFIG_HELP)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_ps)

    s = sub.add_parser("down", help="stop exactly the processes `dispers up` started")
    s.add_argument("--config", help=CONFIG_HELP)
    s.add_argument("--grace", type=float, default=10.0, help="seconds each actor gets to stop before SIGKILL")
    s.set_defaults(fn=_down)

    s = sub.add_parser(
        "import",
        help="load people, measurements, cohorts and consent from CSV or JSON Lines, or a training dataset",
    )
    s.add_argument("file", nargs="?", help="a .csv or .jsonl file (schema: README, 'Your own data')")
    s.add_argument("--dataset", choices=["digits"], help="instead of a file: a training dataset's records")
    s.add_argument("--instances", type=int, default=100, help="--dataset: instances to split it over")
    s.add_argument("--split", choices=["iid", "dirichlet"], default="iid", help="--dataset: how")
    s.add_argument("--alpha", type=float, default=0.5, help="--dataset: Dirichlet concentration")
    s.add_argument("--seed", type=int, default=0, help="--dataset: the split's seed (and the held-out set's)")
    s.add_argument("--host", default="pc-1", help="the personal-cloud host that keeps them (default pc-1)")
    s.add_argument("--format", choices=["csv", "jsonl"], help="the file's format (default: from its suffix)")
    s.add_argument("--dry-run", action="store_true", help="check the whole file, write nothing")
    s.add_argument("--config", help=CONFIG_HELP)
    s.set_defaults(fn=_import)

    s = sub.add_parser(
        "functions", help="list the local functions a query may ask for, and the group-by fields"
    )
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_functions)

    s = sub.add_parser("fields", help="list the fields a query may group by")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(fn=_fields)
