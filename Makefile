# Two commands set up a fresh machine:  `make run`  and  `make test`.
# The environment lives in .venv/ and is (re)built whenever pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=
PYTEST_ARGS ?=
# test workers (pytest-xdist); the users of one session fixture share a worker (--dist loadgroup)
WORKERS ?= 2
# which faiss the venv gets: cpu (faiss-cpu) or gpu (faiss-gpu); `make venv FAISS=gpu` after `make clean`
FAISS  ?= cpu

.PHONY: venv run test test-all lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,$(FAISS)]'
	@$(BIN)/python -c "import magic" 2>/dev/null || { echo "augly needs libmagic: apt-get install -y libmagic1 (Debian/Ubuntu) or brew install libmagic"; exit 1; }
	touch $(STAMP)

venv: $(STAMP)

## run: the main job on the embedded default data (override with ARGS="key=value ...")
run: $(STAMP)
	$(BIN)/python run.py $(ARGS)

## test: the fast test suite (what CI runs), plus lint
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadgroup $(PYTEST_ARGS)

## test-all: including the tests marked slow
test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" -n $(WORKERS) --dist loadgroup $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python bench/bench_metrics.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache .ruff_cache .mypy_cache
