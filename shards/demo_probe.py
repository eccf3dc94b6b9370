"""Does the demo's visual signal survive the frozen VPG? A linear probe on VPG features, per question type.

    python -m shards.demo_probe --vpg tiny --n-train 800 --n-val 300 [--shape-frac 0.42 --background 128,128,128]

Images come straight from shards.demo.make_scene (no shards written); features are the VPG's (K x W) output,
flattened and standardised; a softmax-regression probe is trained on train and scored on val. If a question type
is near chance here, no adapter will learn it from these features: tune DemoConfig (or drop the type) first.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from pipeline.data.transforms import default_mean_std, normalise
from shards.demo import QTYPES, DemoConfig, make_scene
from shards.encode import load_vpg


def features(vpg, cfg: DemoConfig, split: str, n: int, batch: int = 50) -> tuple[torch.Tensor, list[dict]]:
    mean, std = default_mean_std()
    size = int(vpg.image_size)
    xs, metas = [], []
    for i0 in range(0, n, batch):
        imgs = []
        for i in range(i0, min(n, i0 + batch)):
            img, fields, _ = make_scene(cfg, split, i)
            imgs.append(np.asarray(img.resize((size, size))))
            metas.append(fields)
        with torch.no_grad():
            xs.append(vpg(normalise(imgs, mean, std, size)).float().flatten(1))
    return torch.cat(xs), metas


def probe(
    xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: torch.Tensor, n_cls: int, steps: int = 300
) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    w = torch.zeros(xtr.shape[1], n_cls, requires_grad=True)
    b = torch.zeros(n_cls, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xtr @ w + b, ytr) + 1e-3 * (w**2).sum()
        loss.backward()
        opt.step()
    return ((xva @ w + b).argmax(1) == yva).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.demo_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--vpg", default="tiny", help="VPG dir or 'tiny'")
    p.add_argument("--tiny-dir", type=Path, default=Path(".cache/tiny_pill"))
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape-frac", type=float, default=DemoConfig.shape_frac)
    p.add_argument("--background", default="128,128,128")
    a = p.parse_args(argv)
    cfg = DemoConfig(
        n_train=a.n_train,
        n_val=a.n_val,
        seed=a.seed,
        shape_frac=a.shape_frac,
        background=tuple(int(v) for v in a.background.split(",")),
    )
    torch.manual_seed(0)
    vpg = load_vpg(a.vpg, a.tiny_dir)
    xtr, mtr = features(vpg, cfg, "train", cfg.n_train)
    xva, mva = features(vpg, cfg, "val", cfg.n_val)
    print(f"linear probe on VPG features ({xtr.shape[1]} dims), train {cfg.n_train} / val {cfg.n_val} images")
    for qt in QTYPES:
        tr = [i for i, m in enumerate(mtr) if m["qtype"] == qt]
        va = [i for i, m in enumerate(mva) if m["qtype"] == qt]
        if not tr or not va:
            continue
        ans = lambda m: m["choices"][m["answer"]]  # noqa: E731
        classes = sorted({ans(mtr[i]) for i in tr})
        ytr = torch.tensor([classes.index(ans(mtr[i])) for i in tr])
        yva = torch.tensor([classes.index(ans(mva[i])) if ans(mva[i]) in classes else -1 for i in va])
        acc = probe(xtr[tr], ytr, xva[va], yva, len(classes))
        print(f"{qt:9s} val acc {acc:.3f}  (chance {1 / len(classes):.2f}, {len(tr)} train / {len(va)} val)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
