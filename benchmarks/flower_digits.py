"""Flower's simulation of the digits FedAvg experiment (run by bench_train.py in its own venv).

Flower needs protobuf < 7 and dispers >= 7, so they cannot share an environment: bench_train.py
runs this file with the Flower venv's Python, and it uses only dispers.learn's data split and
model registry (installed there with --no-deps). Prints one JSON line: per-round seconds and
the test accuracy after each round.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dispers.learn.data import digits
from dispers.learn.models import ModelShape, build_model


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in (
        ("instances", 100),
        ("rounds", 20),
        ("cohort", 10),
        ("epochs", 2),
        ("batch", 16),
        ("seed", 0),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--model", default="mlp")
    args = p.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import flwr as fl
    from flwr.server.strategy import FedAvg

    data = digits(n_instances=args.instances, split="dirichlet", alpha=args.alpha, seed=args.seed)
    shape = ModelShape(data.n_features, data.n_classes)
    init = build_model(args.model, shape, seed=args.seed)
    names = [n for n, _ in init.named_parameters()]

    def to_arrays(model: torch.nn.Module) -> list[np.ndarray]:
        return [p.detach().numpy().copy() for p in model.parameters()]

    def load(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
        model.load_state_dict(
            {n: torch.from_numpy(a) for n, a in zip(names, arrays, strict=True)}, strict=False
        )

    class DigitsClient(fl.client.NumPyClient):  # type: ignore[misc]
        def __init__(self, cid: int) -> None:
            self.cid = cid
            self.model = build_model(args.model, shape)

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            load(self.model, parameters)
            x, y = data.records(self.cid)
            opt = torch.optim.SGD(self.model.parameters(), lr=args.lr)
            for _ in range(args.epochs):
                perm = torch.randperm(len(y))
                for j in range(0, len(y), args.batch):
                    b = perm[j : j + args.batch]
                    opt.zero_grad()
                    F.cross_entropy(self.model(x[b]), y[b]).backward()
                    opt.step()
            return to_arrays(self.model), len(y), {}

    def client_fn(context: Any) -> Any:
        cid = (
            int(context.node_config.get("partition-id", 0))
            if hasattr(context, "node_config")
            else int(context)
        )
        return DigitsClient(cid).to_client()

    stamps: list[float] = []
    accs: list[float] = []
    evaluator = build_model(args.model, shape)

    def evaluate(
        server_round: int, parameters: list[np.ndarray], config: dict[str, Any]
    ) -> tuple[float, dict[str, Any]]:
        load(evaluator, parameters)
        with torch.no_grad():
            out = evaluator(data.x_test)
            loss = float(F.cross_entropy(out, data.y_test))
            acc = float((out.argmax(1) == data.y_test).float().mean())
        stamps.append(time.perf_counter())
        accs.append(acc)
        return loss, {"accuracy": acc}

    strategy = FedAvg(
        fraction_fit=args.cohort / args.instances, min_fit_clients=args.cohort,
        fraction_evaluate=0.0, min_evaluate_clients=0, min_available_clients=args.instances,
        evaluate_fn=evaluate,
        initial_parameters=fl.common.ndarrays_to_parameters(to_arrays(init)),
    )  # fmt: skip
    start = time.perf_counter()
    fl.simulation.start_simulation(
        client_fn=client_fn, num_clients=args.instances,
        config=fl.server.ServerConfig(num_rounds=args.rounds), strategy=strategy,
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
        ray_init_args={"num_cpus": 2, "include_dashboard": False, "log_to_driver": False},
    )  # fmt: skip
    total = time.perf_counter() - start
    per_round = list(np.diff(stamps))  # evaluate runs after the initial model and after each round
    print(
        json.dumps(
            {"rounds": len(per_round), "per_round_s": per_round, "accuracy": accs[1:], "total_s": total}
        )
    )


if __name__ == "__main__":
    main()
