"""Precompute the frozen VPG's features: a pixel shard set -> the same shards with `{key}.feat.npy` (K x W fp16).

The VPG never trains (PILL_SPEC.md), so its output can be computed once: training on feature shards skips the
ViT-g + Q-former every step. Each output shard keeps the input's samples (json, txt, ...) in order, with the image
member replaced by `{key}.feat.npy`; one output shard per input shard, same file name, plus `{name}-index.json`.
Resume: an output shard listed complete in the index (same input size) is kept. Undecodable images are skipped and
counted like in the builders.

    python -m shards.encode --shards 'shards/demo/train-{000000..000011}.tar' --vpg tiny --out shards/demo_feat
"""

from __future__ import annotations

import argparse
import io
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.cli import run_cli
from pipeline.data.records import SkipCounter, iter_tar
from pipeline.data.shardlists import expand_shards
from pipeline.data.transforms import decode_image, default_mean_std, image_exts, normalise
from pipeline.model import load_clip
from pipeline.model import load_vpg as model_load_vpg
from pipeline.model.methods import clip_features
from pipeline.model.tiny import build_tiny_pill_dirs
from shards.writer import INDEX_FORMAT, Sample, _finalise, _load_index, _save_index, write_tar

log = logging.getLogger(__name__)


def load_vpg(spec: str, tiny_dir: Path, dtype: torch.dtype = torch.float32, lavis: dict[str, str] | None = None) -> Any:
    """`tiny`: the random tiny BLIP-2 of pipeline.model.tiny (built once under tiny_dir, the same one training's
    `tiny` uses); a transformers BLIP-2 dir;
    or LAVIS checkpoints (`lavis` = {"qformer": pth, "vit": pth, "config": dir}) via pipeline.model.load_vpg."""
    if lavis:
        return model_load_vpg(lavis, dtype)
    if spec == "tiny":
        spec = str(build_tiny_pill_dirs(tiny_dir)["vpg"])
    return model_load_vpg(spec, dtype)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def encode_shard(
    url: str, out_path: Path, vpg: Any, device: torch.device, batch_size: int, counter: SkipCounter
) -> dict[str, Any]:
    """Encode one shard; returns its index entry."""
    size = int(vpg.image_size)
    mean, std = default_mean_std()
    samples: list[Sample] = []
    pending: list[tuple[int, str, np.ndarray]] = []  # (position in samples, feature member, uint8 image)
    before = Counter(counter.counts)

    def flush() -> None:
        if not pending:
            return
        pix = normalise([im for _, _, im in pending], mean, std, size).to(device)
        feats = vpg(pix).to(torch.float16).cpu().numpy()  # (n, K, W)
        for (pos, name, _), f in zip(pending, feats):
            samples[pos].files[name] = _npy(f)
        pending.clear()

    for r in iter_tar(url, counter):
        files = {k: v for k, v in r.items() if not k.startswith("__")}
        exts = image_exts(r)
        try:
            imgs = [decode_image(files.pop(e), size) for e in exts]
        except Exception as e:  # PIL raises many types on bad bytes
            counter.skip("undecodable_image", url, r["__key__"], f"{type(e).__name__}: {e}")
            continue
        for e, img in zip(exts, imgs):  # `jpg` -> `feat.npy`; `1.jpg` (several images) -> `1.feat.npy`
            head = e.split(".", 1)[0]
            pending.append((len(samples), f"{head}.feat.npy" if head.isdigit() else "feat.npy", img))
        samples.append(Sample(r["__key__"], files))
        if len(pending) >= batch_size:
            flush()
    flush()
    # Members in a stable order: feat first, then the rest as they came (the reader groups by key anyway).
    for s in samples:
        feats = sorted(k for k in s.files if k.endswith("feat.npy"))
        s.files = {**{k: s.files.pop(k) for k in feats}, **s.files}
    nbytes = write_tar(out_path, samples)
    skipped = dict(Counter(counter.counts) - before)
    return {
        "file": out_path.name,
        "samples": len(samples),
        "bytes": nbytes,
        "skipped": skipped,
        "source": url,
        "source_bytes": os.path.getsize(url) if os.path.exists(url) else -1,
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards.encode", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="input shards: brace pattern, directory or *-index.json")
    p.add_argument("--vpg", default=None, help="transformers BLIP-2 VPG dir, or 'tiny'")
    p.add_argument("--vpg-qformer", default=None, help="LAVIS Q-former .pth (instead of --vpg)")
    p.add_argument("--vpg-vit", default=None, help="LAVIS EVA ViT-g .pth (with --vpg-qformer)")
    p.add_argument("--vpg-config", default=None, help="BLIP-2 config dir (with --vpg-qformer)")
    p.add_argument(
        "--clip", default=None, help="a CLIP ViT vision dir, or 'tiny': the peers' front end (instead of --vpg)"
    )
    p.add_argument(
        "--clip-features",
        default=None,
        help="with --clip: cls:<blocks> (CLS states after those "
        "1-based blocks), patch:<block> (patch states of one block), or method:<peer> (what it reads)",
    )
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--name", default=None, help="index name (default: the input shards' prefix)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="ViT compute dtype (the Q-former stays fp32; features are stored fp16 either way)",
    )
    p.add_argument("--tiny-dir", type=Path, default=Path(".cache/tiny_pill"), help="where 'tiny' is built")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def check_args(a: argparse.Namespace) -> list[str]:
    """The input shard urls; every bad flag combination fails here, before a front end loads."""
    urls = expand_shards(a.shards)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"--shards: {len(missing)} input shard(s) not found, e.g. {missing[0]}")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {a.batch_size}")
    names = [Path(u).name for u in urls]
    if len(set(names)) != len(names):
        raise ValueError("--shards: input shard file names repeat; encode each directory separately")
    if sum(map(bool, (a.vpg, a.vpg_qformer, a.clip))) != 1:
        raise ValueError(
            "give exactly one of --vpg (dir or 'tiny'), --vpg-qformer (+ --vpg-vit, --vpg-config) and "
            "--clip (+ --clip-features)"
        )
    if bool(a.clip) != bool(a.clip_features):
        raise ValueError("--clip and --clip-features go together (e.g. --clip tiny --clip-features method:lavin)")
    if a.vpg_qformer and not a.vpg_config:
        raise ValueError("--vpg-qformer needs --vpg-config (a BLIP-2 config dir)")
    return urls


def build_front_end(a: argparse.Namespace, device: torch.device):
    """The frozen front end the flags name: a CLIP feature reader, or the VPG (a dir, 'tiny' or LAVIS files)."""
    dtype = getattr(torch, a.dtype)
    if a.clip:
        return clip_features(load_clip(a.clip, dtype), a.clip_features).to(device)
    lavis = None
    if a.vpg_qformer:
        lavis = {"qformer": a.vpg_qformer, "config": a.vpg_config, **({"vit": a.vpg_vit} if a.vpg_vit else {})}
    return load_vpg(a.vpg, a.tiny_dir, dtype, lavis).to(device)


def _up_to_date(entry: dict | None, url: str, out_path: Path) -> bool:
    return bool(
        entry
        and out_path.exists()
        and entry.get("source_bytes") == os.path.getsize(url)
        and out_path.stat().st_size == entry["bytes"]
    )


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    urls = check_args(a)
    name = a.name or Path(urls[0]).name.rsplit("-", 1)[0]
    device = torch.device(a.device)
    vpg = build_front_end(a, device)
    a.out.mkdir(parents=True, exist_ok=True)
    ipath = a.out / f"{name}-index.json"
    old = None if a.no_resume else _load_index(ipath)
    prev = {s["file"]: s for s in (old or {}).get("shards", []) if s}
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "name": name,
        "builder": "encode",
        "content": "features",
        "num_query_tokens": int(vpg.num_query_tokens),
        "width": int(vpg.width),
        "vpg": f"clip:{a.clip}:{vpg.spec}" if a.clip else (a.vpg or a.vpg_qformer),
        "shards": [None] * len(urls),
    }
    counter = SkipCounter()
    for i, url in enumerate(tqdm(urls, desc="encode", unit="shard", disable=a.no_progress)):
        out_path = a.out / Path(url).name
        if _up_to_date(prev.get(out_path.name), url, out_path):
            index["shards"][i] = prev[out_path.name]
            continue
        index["shards"][i] = encode_shard(url, out_path, vpg, device, a.batch_size, counter)
        _finalise(index)
        _save_index(ipath, index)
    _finalise(index)
    _save_index(ipath, index)
    print(
        f"{name}: {len(urls)} shard(s), {index['total_samples']} sample(s) encoded "
        f"(K={index['num_query_tokens']}, W={index['width']}); skipped: {index['skipped'] or 'none'}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
