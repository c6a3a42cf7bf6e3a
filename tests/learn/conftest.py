"""Training tests need the learn extra (torch, opacus): skipped where it is not installed."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("opacus")
