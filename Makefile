# Two commands on a fresh machine: `make train` (the embedded default) and `make test`.
# Both create/update .venv idempotently: a stamp file re-runs the install only when setup.py changes.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
# No GPU: the local CPU build of torch (any other spec pulls several GB of CUDA wheels) and DeepSpeed on CPU.
TORCH_SPEC := $(if $(HAS_CUDA),torch>=2.4,torch==2.13.0)
export DS_ACCELERATOR ?= $(if $(HAS_CUDA),cuda,cpu)
export DS_BUILD_OPS ?= 0
TRAIN_ARGS ?=
NUM_PROCS ?= 2

.PHONY: train test venv clean
venv: $(STAMP)

$(STAMP): setup.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip wheel setuptools
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	# DeepSpeed builds from source against the installed torch, so no build isolation.
	$(PY) -c "import deepspeed" 2>/dev/null || $(PIP) install --no-build-isolation "deepspeed>=0.16"
	$(PIP) install --no-build-isolation -e ".[test]" --config-settings editable_mode=compat
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/deepspeed --num_gpus $(NUM_PROCS) pipeline/train.py --ds_config ds_configs/zero2.json $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -q -ra --timeout 900

clean:
	rm -rf $(VENV) runs .pytest_cache
