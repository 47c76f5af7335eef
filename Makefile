# memtrain: the two set-up commands are `make quickstart` and `make test`; both create/refresh .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.memtrain-installed
DEMO   := data/demo
# Where torch comes from: empty = requirements.txt's pin from the default index (a CUDA build on Linux), or e.g.
#   make test TORCH_INDEX=https://download.pytorch.org/whl/cpu      (PyTorch's CPU-only build)
TORCH_INDEX ?=

.PHONY: venv quickstart test clean-runs

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

# One pytest process per test file: streaming datasets keep about a dozen file descriptors each until the
# interpreter exits, and the whole suite in one process can exhaust the per-process limit.
test: venv
	@$(BIN)/python tools/run_tests.py tests

clean-runs:
	rm -rf runs/quickstart runs/quickstart-no-memory
