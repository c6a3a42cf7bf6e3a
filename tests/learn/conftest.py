"""Training tests need the learn extra (torch, opacus): left out where it is not installed."""

import importlib.util

collect_ignore_glob = (
    [] if importlib.util.find_spec("torch") and importlib.util.find_spec("opacus") else ["test_*.py"]
)
