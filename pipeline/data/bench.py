"""Loader throughput: samples/s for JPEG shards (decode + 224 px transform) and for precomputed-feature shards,
tokenisation and collation included.

    python -m pipeline.data.bench --workers 0 1 2 --n 2000

`--workers 0` runs in the main process (= one worker's work); torch is limited to one thread so the figure is per
core. Numbers of record are in docs/data.md with the machine they were taken on.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.config import DataConfig, SourceConfig
from pipeline.data.loader import build_loader
from pipeline.data.tarwrite import Sample, write_tar


def _photo_like(rng: np.random.Generator, w: int, h: int) -> bytes:
    """Low-frequency colour blobs + noise: JPEG sizes like real photos (~15-25 KB at 224 px, q90)."""
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 20, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(out: Path, kind: str, n: int, per_shard: int = 500, size: tuple[int, int] = (224, 224),
                K: int = 32, W: int = 768) -> str:
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    n_sh = (n + per_shard - 1) // per_shard
    for s in range(n_sh):
        samples = []
        for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
            cap = f"a photo of object number {i} with some descriptive words about the scene"
            meta = {"caption": cap, "question": f"What is in picture {i}?", "choices": ["a cat", "a dog", "a car"],
                    "answer": i % 3, "hint": "", "lecture": "Animals and cars.", "solution": "Look at it."}
            files = {"json": json.dumps(meta).encode(), "txt": cap.encode()}
            if kind == "jpeg":
                files["jpg"] = _photo_like(rng, *size)
            else:
                buf = io.BytesIO()
                np.save(buf, rng.standard_normal((K, W)).astype(np.float16))
                files["feat.npy"] = buf.getvalue()
            samples.append(Sample(f"{i:08d}", files))
        write_tar(out / f"{kind}-{s:06d}.tar", samples)
    return str(out / f"{kind}-{{000000..{n_sh - 1:06d}}}.tar")


def tiny_tokenizer(cache_dir: Path):
    """The tiny byte-level BPE tokenizer of pipeline.model.tiny (the bench measures data work, not vocabulary)."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.model.tiny import build_tiny_tokenizer

    if not (cache_dir / "tokenizer.json").is_file():
        build_tiny_tokenizer(cache_dir)
    return PreTrainedTokenizerFast.from_pretrained(str(cache_dir))


def measure(pattern: str, task: str, workers: int, tok, K: int, max_len: int, batch_size: int = 16) -> dict:
    cfg = DataConfig(max_length=max_len, num_workers=workers, shuffle_buffer=256)
    ld = build_loader(cfg, tok, sources=[SourceConfig(pattern, task=task)], batch_size=batch_size,
                      num_query_tokens=K, rank=0, world_size=1)
    it = iter(ld)
    first = next(it)  # startup (worker fork, shuffle-buffer fill) is not steady-state throughput
    t0, n = time.perf_counter(), 0
    for b in it:
        n += b["num_samples"]
    dt = time.perf_counter() - t0
    assert first["input_ids"].shape[0] > 0
    return {"samples": n, "seconds": round(dt, 2), "samples_per_s": round(n / dt, 1),
            "per_worker": round(n / dt / max(1, workers), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="samples per shard set")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--K", type=int, default=32, help="num_query_tokens")
    p.add_argument("--dir", type=Path, default=None, help="where to write the shards (default: a temp dir)")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = a.dir or Path(tempfile.mkdtemp(prefix="pill-bench-"))
    tok = tiny_tokenizer(root / "tok")
    sets = {
        "jpeg224": make_shards(root / "jpeg224", "jpeg", a.n),
        "jpeg500x375": make_shards(root / "jpeg500", "jpeg", a.n, size=(500, 375)),
        "features": make_shards(root / "feat", "features", a.n, K=a.K),
    }
    print(f"machine: {os.cpu_count()} cpu(s); {a.n} samples per set; K={a.K}; batch 16; shards in {root}")
    for name, pattern in sets.items():
        for task, max_len in (("caption", 128), ("scienceqa", 512)):
            for w in a.workers:
                r = measure(pattern, task, w, tok, a.K, max_len)
                print(f"{name:12s} {task:10s} workers={w}: {r['samples_per_s']:8.1f} samples/s "
                      f"({r['per_worker']:.1f}/worker) over {r['samples']} samples")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
