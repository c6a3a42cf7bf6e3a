# dispers: `make demo` runs the heart-rate query over gRPC, `make test` runs the suite.
# Both create .venv and install the package (with every extra) when it is missing or stale.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dispers
# pip shows its progress on a terminal and is quiet when piped (CI); $(shell) takes stdout, so
# stderr tells whether make runs on a terminal.
QUIET  := $(shell test -t 2 || echo -q)
PIP    := $(BIN)/python -m pip --disable-pip-version-check $(QUIET)

.PHONY: venv demo test test-long lint typecheck protos check-protos bench bench-stats bench-import bench-sim bench-train clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev,ray,learn]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dispers demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The long runs too (20,000-instance simulations in both crypto modes with 1, 2 and 3 shards).
test-long: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check dispers tests benchmarks dev
	$(BIN)/ruff format --check dispers tests benchmarks dev

typecheck: $(STAMP)
	$(BIN)/mypy dispers

protos: $(STAMP)
	$(BIN)/python dev/gen_protos.py

check-protos: $(STAMP)
	$(BIN)/python dev/gen_protos.py --check

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_query.py

bench-stats: $(STAMP)
	$(BIN)/python benchmarks/bench_stats.py

bench-import: $(STAMP)
	$(BIN)/python benchmarks/bench_import.py

bench-sim: $(STAMP)
	$(BIN)/python benchmarks/bench_simulate.py

# Flower needs protobuf < 7 (dispers >= 7): it gets its own venv, with dispers' learn code only.
FLOWER := .venv-flower
$(FLOWER)/.installed: pyproject.toml
	@test -x $(FLOWER)/bin/python || $(PYTHON) -m venv $(FLOWER)
	$(FLOWER)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0 'flwr[simulation]==1.41.0' scikit-learn numpy
	$(FLOWER)/bin/python -m pip --disable-pip-version-check -q install --no-deps -e .
	@touch $@

bench-train: $(STAMP) $(FLOWER)/.installed
	$(PIP) install -e '.[dev,learn,bench]'
	$(BIN)/python benchmarks/bench_train.py --shards 1,2

clean:
	rm -rf $(VENV) $(FLOWER) .pytest_cache .mypy_cache .ruff_cache .hypothesis
