"""Training tests need the learn extra (torch, opacus): left out where it is not installed."""

import importlib.util

collect_ignore_glob = (
    [] if importlib.util.find_spec("torch") and importlib.util.find_spec("opacus") else ["test_*.py"]
)

if not collect_ignore_glob:
    import torch

    # The models here are tiny: torch's intra-op threads only spin against each other (and
    # against other processes on a shared machine), which slows every round many times over.
    torch.set_num_threads(1)
