# dispers: `make demo` runs the heart-rate query over gRPC, `make test` runs the suite.
# Both create .venv and install the package (with every extra) when it is missing or stale.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dispers
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: venv demo test lint typecheck protos check-protos bench bench-stats bench-train clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[dev,learn]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/dispers demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

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

# Flower needs protobuf < 7 (dispers >= 7): it gets its own venv, with dispers' learn code only.
FLOWER := .venv-flower
$(FLOWER)/.installed: pyproject.toml
	@test -x $(FLOWER)/bin/python || $(PYTHON) -m venv $(FLOWER)
	$(FLOWER)/bin/python -m pip --disable-pip-version-check -q install torch==2.13.0 'flwr[simulation]==1.41.0' scikit-learn numpy
	$(FLOWER)/bin/python -m pip --disable-pip-version-check -q install --no-deps -e .
	@touch $@

bench-train: $(STAMP) $(FLOWER)/.installed
	$(PIP) install -e '.[dev,learn,bench]'
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) $(FLOWER) .pytest_cache .mypy_cache .ruff_cache .hypothesis
