"""A materialised source (tiny LLM, tiny CLIP, a GGUF conversion) is built by whichever rank takes build_once's
lock first. transformers >= 5 writes a checkpoint from save_pretrained only on torch.distributed rank 0, so a
build won by rank 1 used to leave a directory without config.json, and that rank failed to load it ("has no
config.json": the CI failure of the lavin / iaa two-rank runs, issue 27). Rank 1 of a real gloo group builds here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.model.tiny import build_once, build_tiny_clip, build_tiny_llm


def _rank(rank: int, store_file: str, out: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        if rank == 1:
            build_once(Path(out) / "clip", build_tiny_clip)
            build_once(Path(out) / "llm", build_tiny_llm)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_rank_1_builds_a_whole_checkpoint(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for name in ("clip", "llm"):
        files = sorted(p.name for p in (tmp_path / name).iterdir())
        assert "config.json" in files and "model.safetensors" in files, (name, files)
