# memtrain: the two set-up commands are `make quickstart` and `make test`; both create/refresh .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memtrain-installed
DEMO   := data/demo
# Where torch comes from: empty = requirements.txt's pin from the default index (a CUDA build on Linux), or e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu      (PyTorch's CPU-only build)
TORCH_INDEX ?=
# extra options of `make test`'s pytest run
PYTEST_ARGS ?=

.PHONY: venv quickstart test lint clean-runs

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install -q --disable-pip-version-check --index-url $(TORCH_INDEX) \
	    "$$(grep -E '^torch==' requirements.txt)")
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements.txt
	# mosaicml-streaming without its deps: its torchvision requirement would replace the CPU torch
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps mosaicml-streaming==0.13.0
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

quickstart: venv
	$(BIN)/memtrain data prepare-demo --out $(DEMO) --vocab-size 4096 --row-len 32
	$(BIN)/memtrain train yaml/quickstart.yaml --resume
	$(BIN)/memtrain train yaml/quickstart.yaml --resume \
	    --set run.name=no-memory --set run.out_dir=runs/quickstart-no-memory --set model.no_memory=true
	$(BIN)/memtrain eval runs/quickstart runs/quickstart-no-memory --objectives causal,copy,blank_copy \
	    --json runs/quickstart/results.json

# The whole suite in one pytest process: a summary of skips and failures, the 15 slowest tests, and pytest's
# exit code (5 when nothing was collected fails the target too). Extra pytest options go in PYTEST_ARGS:
#   make test PYTEST_ARGS="-m 'not slow'"      make test PYTEST_ARGS="--lf -x"
#   make test PYTEST_ARGS="-k loader"          make test PYTEST_ARGS="--junitxml=test-results.xml"
test: venv lint
	$(BIN)/python -m pytest tests -q -ra --durations=15 $(PYTEST_ARGS)

# Lint, format and type checks (configured in pyproject.toml); `make test` runs them first.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pyright

clean-runs:
	rm -rf runs/quickstart runs/quickstart-no-memory
