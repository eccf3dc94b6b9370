"""Small builders of on-the-fly shard sets for tests (open_clip style: tests write tiny tars themselves)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.data.tarwrite import Sample, write_tar


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 32, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format=fmt)
    return buf.getvalue()


def sqa_meta(i: int, **over: Any) -> dict[str, Any]:
    meta = {
        "question": f"Question number {i}?",
        "choices": ["red", "blue", "green"],
        "answer": i % 3,
        "hint": " ".join(["context"] * (i % 4)),
        "lecture": "",
        "solution": f"Because {i}.",
        "has_image": True,
        "qtype": "color",
        "split": "train",
        "subject": "demo",
        "grade": "grade1",
    }
    meta.update(over)
    return meta


def sqa_sample(key: str, i: int, image: bool = True, features: tuple[int, int] | None = None, **over: Any) -> Sample:
    files: dict[str, bytes] = {}
    if features is not None:
        buf = io.BytesIO()
        np.save(buf, np.full(features, i, dtype=np.float16))
        files["feat.npy"] = buf.getvalue()
    elif image:
        files["png"] = png_bytes(((i * 37) % 256, 30, 30))
    files["json"] = json.dumps(sqa_meta(i, has_image=image or features is not None, **over)).encode()
    return Sample(key, files)


def write_sqa_shards(out: Path, n_shards: int, per_shard: list[int] | int, name: str = "s", **kw: Any) -> list[str]:
    """n_shards tars of ScienceQA-style samples with globally unique keys `{name}{shard}_{i}`; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * n_shards
    paths, g = [], 0
    for s, n in enumerate(counts):
        samples = []
        for _ in range(n):
            samples.append(sqa_sample(f"{name}{s:03d}_{g:05d}", g, **kw))
            g += 1
        p = out / f"{name}-{s:06d}.tar"
        write_tar(p, samples)
        paths.append(str(p))
    return paths


def tiny_tokenizer(cache_dir: Path) -> Any:
    """The lead's tiny byte-level BPE tokenizer (pipeline.model.tiny), loaded as a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer.json").is_file():
        from pipeline.model.tiny import build_tiny_tokenizer

        build_tiny_tokenizer(cache_dir)
    return PreTrainedTokenizerFast.from_pretrained(str(cache_dir))


def read_tar_samples(tar_path: str | Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of one shard, in the order the tar holds them."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def split_loader_kwargs(kw: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """One flat dict of test settings -> (DataConfig, the other build_loader keyword arguments)."""
    import dataclasses

    from pipeline.data import DataConfig

    names = {f.name for f in dataclasses.fields(DataConfig)}
    return DataConfig(**{k: v for k, v in kw.items() if k in names}), {k: v for k, v in kw.items() if k not in names}


def make_loader(tok: Any, urls: Any, task: str = "scienceqa", **kw: Any) -> Any:
    """build_loader from flat test settings; `urls` is a shard spec or a list of SourceConfig."""
    from pipeline.data import SourceConfig, build_loader

    kw.setdefault(
        "sources",
        urls
        if isinstance(urls, list) and urls and isinstance(urls[0], SourceConfig)
        else [SourceConfig(urls, task=task)],
    )
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_query_tokens", 4)
    kw.setdefault("with_meta", True)
    cfg, rest = split_loader_kwargs(kw)
    return build_loader(cfg, tok, **rest)
