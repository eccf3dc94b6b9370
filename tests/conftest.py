"""Test-wide environment: CPU-only by default, Triton through its interpreter when there is no GPU."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere: @triton.jit reads it at decoration time.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DS_BUILD_OPS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    for marker in ("gpu: needs CUDA", "slow: takes more than ~30 s on CI", "slurm: starts a real local Slurm"):
        config.addinivalue_line("markers", marker)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """A tiny random Llama (+ tokenizer) and BLIP-2 VPG saved in real checkpoint formats."""
    from pipeline.model.tiny import build_tiny_pill_dirs

    return build_tiny_pill_dirs(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_gqa_dirs(tmp_path_factory):
    from pipeline.model.tiny import build_tiny_pill_dirs

    return build_tiny_pill_dirs(tmp_path_factory.mktemp("tiny_gqa"), num_heads=4, n_kv_heads=2)
