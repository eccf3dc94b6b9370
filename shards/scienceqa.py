"""ScienceQA -> WebDataset shards, one split at a time.

Input: `problems.json` ({qid: problem}), `pid_splits.json` ({split: [qid, ...]}), optional `captions.json`
({"captions": {qid: caption}}) and the image root holding `<split>/<qid>/image.png` (train, val, test; trainval and
the mini splits read from those). Every field evaluation needs
is kept in `{key}.json`: qid, question, choices, answer (index), hint, subject, topic, category, skill, grade, task,
lecture, solution, has_image, caption (if given), split.

    python -m shards.scienceqa --problems problems.json --pid-splits pid_splits.json --images images/ \
        --split train --out shards/scienceqa
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.cli import run_cli
from shards.common import file_size, json_bytes, load_json, read_image, require_dir, require_fields, require_file
from shards.writer import Sample, SkipSample, add_writer_args, summary, write_shards, writer_config

REQUIRED = ("question", "choices", "answer", "hint", "image", "subject", "grade", "lecture", "solution")
KEEP = REQUIRED + ("topic", "category", "skill", "task", "split")


def load_split(problems: Any, splits: Any, split: str, problems_path: Path, splits_path: Path) -> list[str]:
    if not isinstance(problems, dict):
        raise ValueError(f"{problems_path}: expected an object {{qid: problem}}, got {type(problems).__name__}")
    if not isinstance(splits, dict) or split not in splits:
        have = sorted(splits) if isinstance(splits, dict) else type(splits).__name__
        raise ValueError(f"{splits_path}: no split {split!r} (has {have})")
    qids = [str(q) for q in splits[split]]
    unknown = [q for q in qids if q not in problems]
    if unknown:
        raise ValueError(
            f"{splits_path}[{split!r}] lists {len(unknown)} qid(s) absent from {problems_path}, e.g. {unknown[:3]}"
        )
    for q in qids:
        require_fields(problems[q], REQUIRED, f"{problems_path}[{q!r}]")
    return qids


BASE_SPLITS = ("train", "val", "test")  # the image folders of the release; the other splits are unions/subsets


def image_splits(qids: list[str], split: str, splits: dict) -> dict[str, str]:
    """The image folder of each qid: its own split for train/val/test, else the base split that lists it
    (trainval = train + val, minitrain/minival/minitest are subsets of train/val/test)."""
    if split in BASE_SPLITS:
        return {q: split for q in qids}
    where = {str(q): b for b in BASE_SPLITS for q in splits.get(b, [])}
    default = {"minival": "val", "minitest": "test", "minitrain": "train"}.get(split)
    missing = [q for q in qids if q not in where and default is None]
    if missing:
        raise ValueError(
            f"split {split!r}: qid(s) {missing[:3]} are in none of {BASE_SPLITS}; cannot tell "
            "which image folder holds them"
        )
    return {q: where.get(q, default) for q in qids}


def make_sample(
    qid: str,
    problems: dict,
    captions: dict,
    root: Path,
    split: str,
    img_split: dict[str, str],
) -> Sample:
    prob = problems[qid]
    key = f"sqa_{qid}"
    choices = prob["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26:
        raise SkipSample("bad_choices", f"{key}: problems.json[{qid!r}]: choices {choices!r}")
    if not isinstance(prob["answer"], int) or not 0 <= prob["answer"] < len(choices):
        raise SkipSample(
            "empty_answer", f"{key}: problems.json[{qid!r}]: answer {prob['answer']!r} for {len(choices)} choices"
        )
    files: dict[str, bytes] = {}
    has_image = bool(prob.get("image"))
    if has_image:
        data, ext = read_image(root / img_split[qid] / qid / prob["image"], None, key)
        files[ext] = data
    meta: dict[str, Any] = {k: prob.get(k) for k in KEEP}
    meta.update(qid=qid, key=key, id=qid, has_image=has_image, split=split, source="scienceqa")
    if qid in captions:
        meta["caption"] = captions[qid]
    files["json"] = json_bytes(meta)
    return Sample(key, files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.scienceqa", description=__doc__.split("\n\n")[0])
    p.add_argument("--problems", required=True, type=Path, help="ScienceQA problems.json")
    p.add_argument("--pid-splits", required=True, type=Path, help="ScienceQA pid_splits.json")
    p.add_argument("--captions", type=Path, default=None, help="optional captions.json")
    p.add_argument("--images", required=True, type=Path, help="root holding <split>/<qid>/image.png")
    p.add_argument("--split", required=True, help="train | val | test | trainval | minitrain | minival | minitest")
    add_writer_args(p, default_max_samples=2000)
    a = p.parse_args(argv)
    require_file(a.problems, "--problems (problems.json)")
    require_file(a.pid_splits, "--pid-splits (pid_splits.json)")
    root = require_dir(a.images, "--images")
    problems = load_json(a.problems, "--problems")
    splits = load_json(a.pid_splits, "--pid-splits")
    qids = load_split(problems, splits, a.split, a.problems, a.pid_splits)
    captions: dict = {}
    if a.captions:
        require_file(a.captions, "--captions (captions.json)")
        cap = load_json(a.captions, "--captions")
        captions = cap.get("captions", cap) if isinstance(cap, dict) else {}
    img_split = image_splits(qids, a.split, splits)
    for folder in sorted({img_split[q] for q in qids if problems[q].get("image")}):
        require_dir(root / folder, f"--images {root}: image folder for split {folder!r}")
    cfg = writer_config(
        a,
        f"scienceqa-{a.split}",
        {"builder": "scienceqa", "split": a.split, "content": "pixels", "source_json": str(a.problems)},
    )
    sizes = [file_size(root / img_split[q] / q / str(problems[q].get("image") or "")) + 4096 for q in qids]
    fn = partial(make_sample, problems=problems, captions=captions, root=root, split=a.split, img_split=img_split)
    index = write_shards(qids, [f"sqa_{q}" for q in qids], sizes, fn, cfg)
    print(summary(index))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
