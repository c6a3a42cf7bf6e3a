"""`dispers train experiment.toml`: a federated training run, its model, metrics and curves."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dispers.core.errors import DispersError, ErrorCode


def add_train_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The `train` subcommand."""
    s = sub.add_parser("train", help="train a model of the registry over the instances (federated)")
    s.add_argument("experiment", help="experiment TOML file")
    s.add_argument("--output", help="where to write model.pt, metrics.csv/json, curves.png "
                                    "(default: runs/<experiment name>)")  # fmt: skip
    s.add_argument("--rounds", type=int, help="override training.rounds")
    s.add_argument("--engine", choices=("simulation", "local", "grpc"), help="override experiment.engine")
    s.add_argument(
        "--cluster", help="train through this running cluster (its cluster.toml): engine 'cluster'"
    )
    s.add_argument(
        "--shards",
        type=int,
        help="override experiment.shards (simulation engine; default one per core from 10,000 instances)",
    )
    s.add_argument("--backend", help="override experiment.backend: where shards run, local or ray")
    s.add_argument("--address", help="override experiment.address: a running Ray cluster (backend ray)")
    s.add_argument("--no-progress", action="store_true", help="no progress bar (also when not a terminal)")
    s.set_defaults(fn=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Run the experiment and print where its outputs went."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise DispersError(
            ErrorCode.CONFIG, "dispers train needs the learn extra: pip install 'dispers[learn]'"
        ) from None
    import dataclasses

    from dispers.learn.config import load_experiment
    from dispers.learn.experiment import run_experiment

    config = load_experiment(args.experiment)
    if args.rounds is not None:
        if args.rounds < 1:
            raise DispersError(ErrorCode.CONFIG, "--rounds must be at least 1")
        config = dataclasses.replace(
            config, training=dataclasses.replace(config.training, rounds=args.rounds)
        )
    if args.engine is not None:
        config = dataclasses.replace(config, engine=args.engine)
    if args.cluster is not None:
        config = dataclasses.replace(config, engine="cluster", cluster=args.cluster)
    sharding = {
        key: value
        for key, value in (("shards", args.shards), ("backend", args.backend), ("address", args.address))
        if value is not None
    }
    if sharding:
        if config.engine != "simulation":
            flags = ", ".join(f"--{key}" for key in sharding)
            raise DispersError(ErrorCode.CONFIG, f"{flags}: for engine 'simulation' (not {config.engine!r})")
        config = dataclasses.replace(config, **sharding)  # validated again: errors name the key
    output = Path(args.output) if args.output else Path("runs") / config.name
    progress = not args.no_progress and sys.stderr.isatty()
    result = run_experiment(config, output=output, progress=progress)
    last = result.rounds[-1] if result.rounds else None
    print(f"{config.name}: {len(result.rounds)} round(s) of {config.model} on {config.data.dataset} "
          f"({config.engine})")  # fmt: skip
    if last is not None:
        spent = (
            f", epsilon {last.epsilon:.3g} at delta {config.privacy.delta:g}"
            if config.privacy.user_level
            else ""
        )
        print(f"test accuracy {last.test_accuracy:.4f}, test loss {last.test_loss:.4f}{spent}")
        federated = [r for r in result.rounds if r.federated_accuracy is not None]
        if federated:
            r = federated[-1]
            print(f"federated accuracy {r.federated_accuracy:.4f}, federated loss {r.federated_loss:.4f} "
                  f"(round {r.round + 1}, on the instances' own records)")  # fmt: skip
    unreleased = sum(not r.released for r in result.rounds)
    if unreleased:
        print(f"{unreleased} round(s) released nothing: fewer than k instances contributed (no DP)")
    if result.stopped:
        print(result.stopped)
    for path in result.outputs:
        print(f"wrote {path}")
    return 0 if result.rounds else 3
