"""The embedded default dataset: deterministic synthetic VQA on coloured shapes.

`python -m shards.demo --out shards/demo --seed 0` writes `train-*.tar` and `val-*.tar` (+ their index JSON).
Each sample has an image (`{key}.png`), a caption (`{key}.txt`, stage 1) and a ScienceQA-style multiple-choice
question in `{key}.json` (stage 2 and evaluation): question, choices, answer (index), qtype, split, has_image,
hint, subject, grade, lecture, solution, caption.

Why it looks like this: the demo's VPG is a tiny *random-init* frozen BLIP-2, so the answer must survive a random
ViT + Q-former. Features are big, saturated and few: large shapes, 4 distinct colours, a flat grey background,
left/right halves. Everything is parametrised (`DemoConfig`) so the lead can tune learnability.
Determinism: sample i of a split depends only on (seed, split, i); tar members have fixed metadata, so the same
command gives byte-identical shards (checked by a test), hence the shards are generated at `make train` time and not
committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from pipeline.cli import run_cli
from shards.common import json_bytes
from shards.writer import Sample, WriterConfig, summary, write_shards

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 70, 235),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 200),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle")
QTYPES = ("color", "shape", "count", "position")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


@dataclass
class DemoConfig:
    n_train: int = 3000
    n_val: int = 500
    seed: int = 0
    image_size: int = 224
    """side in pixels; the training transform resizes to 224 anyway"""
    qtypes: tuple[str, ...] = QTYPES
    """question types to draw from, uniformly"""
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow")
    shapes: tuple[str, ...] = SHAPES
    max_count: int = 3
    """count questions show 1..max_count shapes"""
    min_options: int = 2
    max_options: int = 4
    fixed_options: bool = False
    """every question of a type lists all its values in one fixed order, so the answer letter is a function of
    the image alone; with shuffled options a model must also bind the image to the option words, which a tiny
    random LLM cannot learn in a CPU-minutes budget"""
    shape_frac: float = 0.42
    """single-shape scenes: shape side as a fraction of the image side (big = survives a random ViT)"""
    background: tuple[int, int, int] = (128, 128, 128)
    image_format: str = "png"
    """png (exact colours, tiny files for flat images) or jpg"""

    def __post_init__(self) -> None:
        self.qtypes, self.colors, self.shapes = tuple(self.qtypes), tuple(self.colors), tuple(self.shapes)
        bad = [q for q in self.qtypes if q not in QTYPES]
        if bad or not self.qtypes:
            raise ValueError(f"qtypes {self.qtypes}: each must be one of {QTYPES}")
        if [c for c in self.colors if c not in COLORS] or len(self.colors) < 2:
            raise ValueError(f"colors {self.colors}: at least 2 of {sorted(COLORS)}")
        if [s for s in self.shapes if s not in SHAPES] or len(self.shapes) < 2:
            raise ValueError(f"shapes {self.shapes}: at least 2 of {SHAPES}")
        if not 2 <= self.max_count <= 4:
            raise ValueError(f"max_count must be in [2, 4], got {self.max_count}")
        if not 2 <= self.min_options <= self.max_options <= 4:
            raise ValueError(f"need 2 <= min_options <= max_options <= 4, got {self.min_options}, {self.max_options}")
        if not 32 <= self.image_size <= 512:
            raise ValueError(f"image_size must be in [32, 512], got {self.image_size}")
        if not 0.1 <= self.shape_frac <= 0.5:
            raise ValueError(f"shape_frac must be in [0.1, 0.5], got {self.shape_frac}")
        if self.image_format not in ("png", "jpg"):
            raise ValueError(f"image_format must be png or jpg, got {self.image_format}")
        if self.n_train < 0 or self.n_val < 0:
            raise ValueError("n_train and n_val must be >= 0")


def _rng(cfg: DemoConfig, split: str, i: int) -> random.Random:
    # Independent of Python's hash randomisation and of how many samples precede i.
    h = hashlib.sha256(f"{cfg.seed}/{split}/{i}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill: tuple) -> None:
    r = side / 2
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)


def _options(rng: random.Random, cfg: DemoConfig, answer: str, pool: list[str]) -> tuple[list[str], int]:
    if cfg.fixed_options:
        return list(pool), pool.index(answer)
    n = min(rng.randint(cfg.min_options, cfg.max_options), len(pool))
    others = [p for p in pool if p != answer]
    choices = [answer] + rng.sample(others, n - 1)
    rng.shuffle(choices)
    return choices, choices.index(answer)


def make_scene(cfg: DemoConfig, split: str, i: int) -> tuple[Image.Image, dict[str, Any], str]:
    """Return (image, question fields, caption) for sample i of `split`."""
    rng = _rng(cfg, split, i)
    s = cfg.image_size
    img = Image.new("RGB", (s, s), cfg.background)
    d = ImageDraw.Draw(img)
    qtype = rng.choice(cfg.qtypes)
    color, shape = rng.choice(cfg.colors), rng.choice(cfg.shapes)
    if qtype == "count":
        n = rng.randint(1, cfg.max_count)
        side = s * 0.22
        cells = rng.sample([(x, y) for x in range(2) for y in range(2)], n)  # 2x2 grid: shapes never overlap
        for x, y in cells:
            _draw_shape(d, shape, s * (0.25 + 0.5 * x), s * (0.25 + 0.5 * y), side, COLORS[color])
        plural = shape + ("s" if n > 1 else "")
        caption = f"{NUMBER_WORDS[n]} {color} {plural}"
        question = "How many shapes are in the image?"
        choices, answer = _options(rng, cfg, str(n), [str(k) for k in range(1, cfg.max_count + 1)])
        solution = f"There {'are' if n > 1 else 'is'} {NUMBER_WORDS[n]} {plural} in the image."
    else:
        side_name = rng.choice(("left", "right"))
        side = s * cfg.shape_frac * rng.uniform(0.9, 1.1)
        cx = s * (0.25 if side_name == "left" else 0.75) + rng.uniform(-0.03, 0.03) * s
        cy = s * (0.5 + rng.uniform(-0.15, 0.15))
        _draw_shape(d, shape, cx, cy, side, COLORS[color])
        caption = f"a {color} {shape} on the {side_name}"
        if qtype == "color":
            question = "What colour is the shape in the image?"
            choices, answer = _options(rng, cfg, color, list(cfg.colors))
            solution = f"The shape is {color}."
        elif qtype == "shape":
            question = "Which shape is in the image?"
            choices, answer = _options(rng, cfg, shape, list(cfg.shapes))
            solution = f"The image shows a {shape}."
        else:
            question = "Is the shape on the left or on the right of the image?"
            choices, answer = _options(rng, cfg, side_name, ["left", "right"])
            solution = f"The shape is on the {side_name} side."
    fields = {
        "question": question,
        "choices": choices,
        "answer": answer,
        "qtype": qtype,
        "hint": "",
        "subject": "demo",
        "category": qtype,
        "grade": "grade1",
        "lecture": "Look at the picture to answer the question.",
        "solution": solution,
        "caption": caption,
    }
    return img, fields, caption


def _make_sample(i: int, cfg: DemoConfig, split: str) -> Sample:
    img, fields, caption = make_scene(cfg, split, i)
    key = f"{split}_{i:06d}"
    buf = io.BytesIO()
    if cfg.image_format == "png":
        img.save(buf, format="PNG", optimize=False)
    else:
        img.save(buf, format="JPEG", quality=95)
    meta = {"id": key, "key": key, "split": split, "has_image": True, "source": "demo", **fields}
    return Sample(key, {cfg.image_format: buf.getvalue(), "json": json_bytes(meta), "txt": caption.encode()})


def build_demo(
    cfg: DemoConfig, out: Path, max_samples: int = 250, workers: int = 1, progress: bool = False, resume: bool = True
) -> dict[str, dict[str, Any]]:
    """Write `train-*` and `val-*` shards into `out`; returns {split: index}.

    The default 250 samples per shard gives 12 equal train shards for the default 3000 samples: they divide evenly
    over 1, 2, 3, 4, 6 or 12 ranks x workers (no wrap-around, no unseen samples in an epoch)."""
    indices = {}
    for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
        wcfg = WriterConfig(
            out_dir=out,
            name=split,
            max_samples=max_samples,
            workers=workers,
            progress=progress,
            resume=resume,
            meta={"builder": "demo", "split": split, "content": "pixels", "demo_config": dataclasses.asdict(cfg)},
        )
        # Resume must not keep shards made with other generator settings: the config goes into the plan keys.
        tag = hashlib.sha1(repr(dataclasses.asdict(cfg)).encode()).hexdigest()[:8]
        keys = [f"{split}_{i:06d}@{tag}" for i in range(n)]
        indices[split] = write_shards(
            list(range(n)), keys, [4096] * n, partial(_make_sample, cfg=cfg, split=split), wcfg
        )
    return indices


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("shards/demo"), help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=DemoConfig.n_train)
    p.add_argument("--n-val", type=int, default=DemoConfig.n_val)
    p.add_argument("--image-size", type=int, default=DemoConfig.image_size)
    p.add_argument("--qtypes", default=",".join(QTYPES), help=f"comma list from {QTYPES}")
    p.add_argument("--colors", default=",".join(DemoConfig.colors), help=f"comma list from {sorted(COLORS)}")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list from {SHAPES}")
    p.add_argument("--max-options", type=int, default=4)
    p.add_argument("--fixed-options", action="store_true", help="all values of a type, in one fixed order")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    # 250 -> 12 train shards: divisible by 1, 2, 3, 4, 6 and 12 (ranks x workers), so every worker holds exactly
    # its quota and no sample is repeated or left out in an epoch.
    p.add_argument("--max-samples", type=int, default=250, help="samples per shard")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = DemoConfig(
        n_train=a.n_train,
        n_val=a.n_val,
        seed=a.seed,
        image_size=a.image_size,
        qtypes=tuple(a.qtypes.split(",")),
        colors=tuple(a.colors.split(",")),
        shapes=tuple(a.shapes.split(",")),
        max_options=a.max_options,
        image_format=a.format,
        fixed_options=a.fixed_options,
    )
    for idx in build_demo(cfg, a.out, a.max_samples, a.workers, progress=not a.no_progress).values():
        print(summary(idx))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
