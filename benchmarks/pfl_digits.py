"""Apple's pfl-research simulation of the digits FedAvg experiment (run by bench_train.py).

pfl simulates the cohort's users one after another in this process with one model (its
`SimulatedBackend`), the design dispers' simulation engine follows. Same split, model, cohort,
local epochs, batch size and learning rate as the other runners. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser()
    for name, default in (("instances", 100), ("rounds", 20), ("cohort", 10), ("epochs", 2), ("batch", 16),
                          ("seed", 0)):  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--model", default="mlp")
    args = p.parse_args()
    torch.set_num_threads(1)

    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    from dispers.learn.data import digits
    from dispers.learn.models import ModelShape, build_model

    data = digits(n_instances=args.instances, split="dirichlet", alpha=args.alpha, seed=args.seed)
    net = build_model(args.model, ModelShape(data.n_features, data.n_classes), seed=args.seed)

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)  # type: ignore[no-any-return]

        def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
            self.eval() if eval else self.train()
            return F.cross_entropy(self(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = True) -> dict[str, Any]:
            self.eval()
            out = self(x)
            return {
                "loss": Weighted(float(F.cross_entropy(out, y, reduction="sum")), len(y)),
                "accuracy": Weighted(float((out.argmax(1) == y).sum()), len(y)),
            }

    model = PyTorchModel(
        model=Wrapped(net),
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    users = list(range(data.n_instances))

    def make_dataset(user_id: int) -> Dataset:
        x, y = data.records(user_id)
        return Dataset(raw_data=[x, y], user_id=str(user_id))

    train = FederatedDataset(make_dataset, get_user_sampler("random", users))
    test = Dataset(raw_data=[data.x_test, data.y_test])
    stamps: list[float] = []
    accs: list[float] = []

    class Clock(CentralEvaluationCallback):  # type: ignore[misc]
        def after_central_iteration(
            self, aggregate_metrics: Any, model: Any, *, central_iteration: int
        ) -> Any:
            out = super().after_central_iteration(
                aggregate_metrics, model, central_iteration=central_iteration
            )
            stamps.append(time.perf_counter())
            for name, value in out[1]:
                if "accuracy" in str(name):
                    accs.append(float(getattr(value, "overall_value", value)))
            return out

    start = time.perf_counter()
    stamps.append(start)
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds, evaluation_frequency=1,
            train_cohort_size=args.cohort, val_cohort_size=None,
        ),
        backend=SimulatedBackend(training_data=train, val_data=None),
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=args.lr, local_num_epochs=args.epochs, local_batch_size=args.batch
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=1024),
        callbacks=[Clock(test, model_eval_params=NNEvalHyperParams(local_batch_size=1024))],
    )  # fmt: skip
    per_round = list(np.diff(stamps))
    print(json.dumps({"rounds": len(per_round), "per_round_s": per_round, "accuracy": accs,
                      "total_s": time.perf_counter() - start}))  # fmt: skip


if __name__ == "__main__":
    main()
