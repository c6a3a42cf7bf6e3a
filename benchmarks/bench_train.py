"""The digits FedAvg experiment by dispers, a plain sequential torch loop and Flower, in one run.

Same data split (scikit-learn digits over 100 instances, Dirichlet alpha 0.5), model (MLP),
cohort, local epochs, batch size, learning rate and rounds for every runner:

- dispers, simulation engine on one shard (in process), cohort trained at once with torch.func
  (vmap over instances);
- dispers, simulation engine on one shard, instances one after another on one model object;
- dispers, local engine: every actor in this process, each update sealed to its DA, DAs summing
  partials, the root releasing the average to the Querier (real crypto, no DP);
- a plain sequential torch loop: per instance a copy of the global model, SGD, FedAvg;
- Flower's simulation (`start_simulation`, Ray), in its own venv (`--flower-python`), since
  Flower needs protobuf < 7 and dispers >= 7; fewer rounds by default (`--flower-rounds`);
- Apple's pfl (`SimulatedBackend`: users one after another on one model), from the bench extra.

Prints seconds per round (median over rounds, the best of `--repeat` passes in turn), final
test accuracy, and ratios against the plain torch loop measured in the same run. Machines here
are noisy and shared: compare ratios, and runs.

`--shards 1,2` (`--shards-only` to skip the runners above) then compares the simulation engine
on 1 shard (in this process) and on 2 (worker processes, `--backend local`, or Ray actors) on
the same digits experiment, on `simulations/train_health_dp.toml` (100,000 instances,
`--health-rounds` rounds) and on the same with a cohort of 10,000: seconds per round (median,
the first round, which warms each shard's torch.func up, left out; the best of `--repeat`
passes in turn), the setup (shards started and their records generated), and the ratio to
one shard. Under user-level DP the noise differs run to run, so the health runs' accuracy
does too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dispers.learn.config import DataConfig, ExperimentConfig, ServerConfig, TrainingConfig, load_experiment
from dispers.learn.data import FederatedData, digits
from dispers.learn.experiment import run_experiment
from dispers.learn.models import ModelShape, build_model, get_flat

ROOT = Path(__file__).resolve().parent.parent


def plain_torch(args: argparse.Namespace, data: FederatedData) -> tuple[list[float], float]:
    """FedAvg written the way a tutorial does: a model copy per client, DataLoader-free SGD."""
    torch.manual_seed(args.seed)
    shape = ModelShape(data.n_features, data.n_classes)
    global_model = build_model(args.model, shape, seed=args.seed)
    times: list[float] = []
    for r in range(args.rounds):
        start = time.perf_counter()
        rng = np.random.default_rng([args.seed, r, 7])
        cohort = rng.choice(data.n_instances, args.cohort, replace=False)
        states, weights = [], []
        for i in cohort:
            x, y = data.records(int(i))
            model = build_model(args.model, shape)
            model.load_state_dict(global_model.state_dict())
            opt = torch.optim.SGD(model.parameters(), lr=args.lr)
            for _ in range(args.epochs):
                perm = torch.randperm(len(y))
                for j in range(0, len(y), args.batch):
                    b = perm[j : j + args.batch]
                    opt.zero_grad()
                    F.cross_entropy(model(x[b]), y[b]).backward()
                    opt.step()
            states.append(model.state_dict())
            weights.append(float(len(y)))
        total = sum(weights)
        avg = {k: sum(w * s[k] for w, s in zip(weights, states, strict=True)) / total for k in states[0]}
        global_model.load_state_dict(avg)
        with torch.no_grad():
            acc = float((global_model(data.x_test).argmax(1) == data.y_test).float().mean())
        times.append(time.perf_counter() - start)
    return times, acc


def dispers_run(
    args: argparse.Namespace, data: FederatedData, *, engine: str, batched: bool
) -> tuple[list[float], float]:
    # One shard, in this process: the runners above compare on one core each.
    config = ExperimentConfig(
        name=f"bench-{engine}", seed=args.seed, engine=engine, model=args.model, shards=1,
        data=DataConfig(dataset="digits", instances=args.instances, split="dirichlet", alpha=args.alpha),
        training=TrainingConfig(rounds=args.rounds, cohort=args.cohort, local_epochs=args.epochs,
                                batch_size=args.batch, lr=args.lr, batched=batched),
        server=ServerConfig(optimizer="fedavg", lr=1.0),
    )  # fmt: skip
    result = run_experiment(config, data=data)
    return [r.seconds for r in result.rounds], result.final_accuracy


def peer_run(
    args: argparse.Namespace, python: Path, script: str, rounds: int
) -> tuple[list[float], float] | str:
    """Run a peer framework's script (its own interpreter) and read its JSON line."""
    if not python.exists():
        return f"not run: no interpreter at {python} (make bench-train creates the Flower venv)"
    cmd = [str(python), str(ROOT / "benchmarks" / script), "--rounds", str(rounds),
           "--instances", str(args.instances), "--cohort", str(args.cohort), "--epochs", str(args.epochs),
           "--batch", str(args.batch), "--lr", str(args.lr), "--alpha", str(args.alpha),
           "--model", args.model, "--seed", str(args.seed)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        return f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}"
    out = json.loads(lines[-1])
    return out["per_round_s"][1:] or out["per_round_s"], out["accuracy"][
        -1
    ]  # the first round starts Ray's actors


def shard_runs(args: argparse.Namespace) -> None:
    """The simulation engine on 1 shard and on more, on digits and on the health task."""
    digits_cfg = ExperimentConfig(
        name="bench-digits", seed=args.seed, model=args.model,
        data=DataConfig(dataset="digits", instances=args.instances, split="dirichlet", alpha=args.alpha),
        training=TrainingConfig(rounds=args.rounds, cohort=args.cohort, local_epochs=args.epochs,
                                batch_size=args.batch, lr=args.lr),
    )  # fmt: skip
    health_cfg = load_experiment(ROOT / "simulations" / "train_health_dp.toml")
    health_cfg = dataclasses.replace(
        health_cfg, training=dataclasses.replace(health_cfg.training, rounds=args.health_rounds)
    )
    # Ten times the cohort: a round's training outweighs what the driver does around it. Without
    # user-level DP: at a 10 % sampling rate the budget would stop it after a few rounds.
    health_big = dataclasses.replace(
        health_cfg, name="health-cohort-10k",
        training=dataclasses.replace(health_cfg.training, cohort=10_000),
        privacy=dataclasses.replace(health_cfg.privacy, user_level=False),
    )  # fmt: skip
    counts = [int(n) for n in args.shards.split(",")]
    print(f"\nsimulation engine on shards ({args.backend} backend), load average {os.getloadavg()}")
    head = f"{'experiment':12} {'shards':>6} {'rounds':>6} {'setup s':>8} {'s/round (median)':>17}"
    print(f"{head} {'final acc':>10} {'vs 1 shard':>11}")
    runs = [("digits", digits_cfg), ("health 100k", health_cfg), ("health, 10k", health_big)]
    for label, cfg in runs:
        best: dict[int, tuple[float, float, float, int]] = {}
        for _ in range(args.repeat):
            for n in counts:  # in turn, so both see the machine's load alike
                run = dataclasses.replace(cfg, shards=n, backend=args.backend)
                start = time.perf_counter()
                result = run_experiment(run)
                total = time.perf_counter() - start
                per_round = [r.seconds for r in result.rounds[1:]] or [r.seconds for r in result.rounds]
                median = statistics.median(per_round)
                setup = total - sum(r.seconds for r in result.rounds)
                if n not in best or median < best[n][1]:
                    best[n] = (setup, median, result.final_accuracy, len(result.rounds))
        one = best[counts[0]][1]
        for n in counts:
            setup, median, acc, rounds = best[n]
            print(
                f"{label:12} {n:6d} {rounds:6d} {setup:8.1f} {median:17.4f} {acc:10.4f} {one / median:10.2f}x"
            )
    print(f"load average after: {os.getloadavg()}")
    for label, cfg in runs:
        shard_work(label, cfg, min(args.health_rounds, cfg.training.rounds))


def shard_work(label: str, cfg: ExperimentConfig, rounds: int) -> None:
    """CPU seconds a round's training takes on 1 shard and on each of 2, all in this process.

    The thread's CPU time (torch trains on this one thread), one shard after another: unlike
    wall time on a shared machine, it does not depend on what else runs. The longer of the 2
    shards is a round's critical path on 2 free cores; 1 shard's time over it is the speed-up
    training could reach there.
    """
    from dispers.learn.shards import (
        TrainShard,
        TrainShardSpec,
        assign_instances,
        records_digest,
        shard_records,
    )

    fed = load_data(cfg)
    w = get_flat(build_model(cfg.model, ModelShape(fed.n_features, fed.n_classes), seed=cfg.seed))
    layouts: dict[int, list[TrainShard]] = {}
    for n in (1, 2):
        layouts[n] = []
        for run in assign_instances(fed.n_instances, n):
            records = shard_records(fed, run)
            shard = TrainShard(TrainShardSpec(cfg, run, records_digest(records), fed.n_features,
                                              fed.n_classes, records))  # fmt: skip
            shard.load()
            layouts[n].append(shard)
    one, longest, total = [], [], []
    for r in range(rounds + 1):
        rng = np.random.default_rng([cfg.seed, r, 7])
        cohort = np.flatnonzero(rng.random(fed.n_instances) < cfg.training.cohort / fed.n_instances)
        times = {}
        for n, shards in layouts.items():
            times[n] = []
            for shard, run in zip(shards, assign_instances(fed.n_instances, n), strict=True):
                members = cohort[(cohort >= run.start) & (cohort < run.stop)].tolist()
                start = time.thread_time()
                shard.train(r, w, members)
                times[n].append(time.thread_time() - start)
        if r:  # round 0 warms torch.func up
            one.append(times[1][0])
            longest.append(max(times[2]))
            total.append(sum(times[2]))
    a, b, c = statistics.median(one), statistics.median(longest), statistics.median(total)
    print(f"{label:12} CPU s/round: 1 shard {a:.4f}; 2 shards: longest {b:.4f}, both {c:.4f}; "
          f"training's speed-up on 2 free cores at most {a / b:.2f}x")  # fmt: skip


def load_data(cfg: ExperimentConfig) -> FederatedData:
    """The dataset a config describes."""
    from dispers.learn import data as datasets

    d = cfg.data
    return datasets.load(d.dataset, n_instances=d.instances, split=d.split, alpha=d.alpha, seed=cfg.seed)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--flower-rounds", type=int, default=20)
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--cohort", type=int, default=10)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--model", default="mlp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flower-python", default=str(ROOT / ".venv-flower" / "bin" / "python"))
    p.add_argument("--skip-peers", action="store_true", help="run neither Flower nor pfl")
    p.add_argument("--repeat", type=int, default=2, help="passes over the runners (best median kept)")
    p.add_argument("--shards", default="", help="compare the simulation engine on these shard counts (1,2)")
    p.add_argument("--shards-only", action="store_true", help="only the shard comparison")
    p.add_argument("--backend", default="local", help="where the shards run: local or ray")
    p.add_argument("--health-rounds", type=int, default=20)
    args = p.parse_args()
    if args.shards_only:
        shard_runs(args)
        return 0
    torch.set_num_threads(1)  # every runner on one core: the machine is shared
    data = digits(n_instances=args.instances, split="dirichlet", alpha=args.alpha, seed=args.seed)
    print(
        f"digits FedAvg: {args.instances} instances (Dirichlet alpha {args.alpha}), {args.model}, cohort "
        f"{args.cohort}, {args.epochs} local epochs, batch {args.batch}, lr {args.lr}, {args.rounds} rounds"
    )
    runners: list[tuple[str, Callable[[], tuple[list[float], float] | str]]] = [
        ("plain torch loop (sequential)", lambda: plain_torch(args, data)),
        (
            "dispers simulation, torch.func",
            lambda: dispers_run(args, data, engine="simulation", batched=True),
        ),
        (
            "dispers simulation, sequential",
            lambda: dispers_run(args, data, engine="simulation", batched=False),
        ),
        ("dispers actors in-process, sealed", lambda: dispers_run(args, data, engine="local", batched=True)),
    ]
    if not args.skip_peers:
        flower = Path(args.flower_python)
        runners.append(
            (
                f"Flower simulation ({args.flower_rounds} rounds)",
                lambda: peer_run(args, flower, "flower_digits.py", args.flower_rounds),
            )
        )
        here = Path(sys.executable)
        runners.append((f"pfl simulation ({args.rounds} rounds)",
                        lambda: peer_run(args, here, "pfl_digits.py", args.rounds)))  # fmt: skip
    # The machine is shared: the runners take turns, `--repeat` passes, and each keeps its best
    # (lowest) median; Flower, slow to start, runs in the first pass only.
    results: dict[str, tuple[float, float] | str] = {}
    for attempt in range(args.repeat):
        for name, fn in runners:
            if attempt and (name.startswith("Flower") or isinstance(results.get(name), str)):
                continue
            out = fn()
            if isinstance(out, str):
                results[name] = out
                continue
            times, acc = out
            best = results.get(name)
            if not isinstance(best, tuple) or statistics.median(times) < best[0]:
                results[name] = (statistics.median(times), acc)
    floor = results["plain torch loop (sequential)"]
    assert not isinstance(floor, str)
    print(f"{'runner':40} {'s/round (median)':>17} {'final acc':>10} {'vs torch loop':>14}")
    for name, res in results.items():
        if isinstance(res, str):
            print(f"{name:40} {res}")
        else:
            print(f"{name:40} {res[0]:17.4f} {res[1]:10.4f} {res[0] / floor[0]:13.2f}x")
    if args.shards:
        shard_runs(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
