"""Does the demo's visual signal survive the frozen VPG? Probes on VPG features, per question type.

    python -m shards.demo_probe --vpg tiny --n-train 800 --n-val 300 [--shape-frac 0.42 --background 128,128,128]
    python -m shards.demo_probe --qtypes color,shape --n-train 3000 --n-val 400 --mlp 256   # demo_smollm2's data

Images come straight from shards.demo.make_scene (no shards written); features are the VPG's (K x W) output,
flattened and standardised; a softmax-regression probe (and with --mlp H, a one-hidden-layer probe of width H) is
trained on train and scored on val. If a question type is near chance here, no adapter will learn it from these
features: tune DemoConfig (or drop the type) first. A type the probes read well but a trained model gets wrong is
limited by the training, not by the VPG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

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
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xva: torch.Tensor,
    yva: torch.Tensor,
    n_cls: int,
    steps: int = 300,
    hidden: int = 0,
) -> float:
    """Val accuracy of a probe trained full-batch on (xtr, ytr): linear, or with `hidden` > 0 one GELU layer."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    dim = xtr.shape[1]
    head = (
        nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_cls)) if hidden else nn.Linear(dim, n_cls)
    )
    if not hidden:  # the softmax regression from zero, as before
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        l2 = sum((m.weight**2).sum() for m in head.modules() if isinstance(m, nn.Linear))
        loss = nn.functional.cross_entropy(head(xtr), ytr) + 1e-3 * l2
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (head(xva).argmax(1) == yva).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.demo_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--vpg", default="tiny", help="VPG dir or 'tiny'")
    p.add_argument("--tiny-dir", type=Path, default=Path(".cache/tiny_pill"))
    p.add_argument("--n-train", type=int, default=800)
    p.add_argument("--n-val", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shape-frac", type=float, default=DemoConfig.shape_frac)
    p.add_argument("--background", default="128,128,128")
    p.add_argument("--qtypes", default=",".join(QTYPES), help="comma list: the question types the scenes ask")
    p.add_argument("--mlp", type=int, default=0, metavar="H", help="also a one-hidden-layer probe of width H")
    a = p.parse_args(argv)
    try:
        cfg = DemoConfig(
            n_train=a.n_train,
            n_val=a.n_val,
            seed=a.seed,
            shape_frac=a.shape_frac,
            background=tuple(int(v) for v in a.background.split(",")),
            qtypes=tuple(a.qtypes.split(",")),
        )
    except ValueError as e:  # before the VPG is built
        p.error(str(e))
    torch.manual_seed(0)
    vpg = load_vpg(a.vpg, a.tiny_dir)
    xtr, mtr = features(vpg, cfg, "train", cfg.n_train)
    xva, mva = features(vpg, cfg, "val", cfg.n_val)
    kinds = "linear" + (f" and MLP ({a.mlp} hidden)" if a.mlp else "")
    print(f"{kinds} probes on VPG features ({xtr.shape[1]} dims), train {cfg.n_train} / val {cfg.n_val} images")
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
        mlp = f", MLP {probe(xtr[tr], ytr, xva[va], yva, len(classes), hidden=a.mlp):.3f}" if a.mlp else ""
        print(f"{qt:9s} val acc {acc:.3f}{mlp}  (chance {1 / len(classes):.2f}, {len(tr)} train / {len(va)} val)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
