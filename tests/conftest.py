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


@pytest.fixture(scope="module")
def dist_world_of_one():
    import torch.distributed as dist

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if dist.is_initialized():
        yield
        return
    from pipeline.training.dist import _free_port, own_extension_build_dir

    own_extension_build_dir()  # DeepSpeed's CPU backend builds its shm op here (pipeline.training.dist)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    import deepspeed
    import deepspeed.comm.comm as ds_comm

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    yield
    # Leave the session as we found it: other test files must not inherit a process group or rank variables.
    dist.destroy_process_group()
    ds_comm.cdb = None
    _forget_deepspeed_groups()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _forget_deepspeed_groups() -> None:
    """DeepSpeed caches process groups in module globals; a later world of one must not find the destroyed ones."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name == name.upper():
            if isinstance(value, dict):
                value.clear()
            elif value is not None and not isinstance(value, (int, str, bool, float)):
                setattr(groups, name, None)
