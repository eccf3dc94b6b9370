"""LLaVA-mix665k style multi-turn instructions -> WebDataset shards (samples with and without images).

Input: a JSON list of `{id, image?, conversations: [{from: human|gpt, value}, ...]}`; `image` is relative to
--images. Text-only records (no `image`) become json-only samples with has_image false.

    python -m shards.llava_instruct --json llava_v1_5_mix665k.json --images data/ --out shards/mix665k
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.cli import run_cli
from shards.common import (
    add_llava_args,
    file_size,
    image_count_check,
    image_paths,
    json_bytes,
    load_llava_records,
    read_images,
    require_fields,
)
from shards.writer import Sample, SkipSample, add_writer_args, sanitize_key, summary, write_shards, writer_config


def validate_records(records: Any, json_path: Path) -> None:
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        require_fields(r, ("id", "conversations"), f"{json_path}[{i}]")
        if not isinstance(r["conversations"], list) or not r["conversations"]:
            raise ValueError(f"{json_path}[{i}] (id {r['id']}): 'conversations' must be a non-empty list")
        for j, turn in enumerate(r["conversations"]):
            require_fields(turn, ("from", "value"), f"{json_path}[{i}].conversations[{j}]")


def record_key(i: int, rec: dict) -> str:
    # mix665k repeats some ids; the record index keeps keys unique and the order visible.
    return f"{i:08d}_{sanitize_key(rec['id'])}"


def make_sample(item: tuple[int, dict], root: Path, max_side: int | None, source: str = "json") -> Sample:
    i, rec = item
    key = record_key(i, rec)
    where = f"{key}: {source}[{i}]"
    conv = rec["conversations"]
    roles = [t["from"] for t in conv]
    if len(conv) < 2 or roles[0] != "human" or any(r not in ("human", "gpt") for r in roles):
        raise SkipSample("bad_conversation", f"{where}: roles {roles}")
    empty = [j for j, t in enumerate(conv) if t["from"] == "gpt" and not str(t["value"]).strip()]
    if empty or "gpt" not in roles:
        raise SkipSample(
            "empty_answer", f"{where}: " + (f"conversations[{empty[0]}] (gpt) is empty" if empty else "no gpt turn")
        )
    paths = image_paths(rec)
    image_count_check(paths, conv, where)
    files = read_images(root, paths, max_side, key)
    has_image = bool(paths)
    meta = {
        "id": rec["id"],
        "key": key,
        "image": rec.get("image"),
        "conversations": conv,
        "has_image": has_image,
        "source": "llava_instruct",
    }
    files["json"] = json_bytes(meta)
    return Sample(key, files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.llava_instruct", description=__doc__.split("\n\n")[0])
    add_llava_args(p, "llava_v1_5_mix665k.json or the like")
    add_writer_args(p, default_max_samples=5000)
    a = p.parse_args(argv)
    records, root = load_llava_records(a, "instruction JSON", validate_records)
    cfg = writer_config(
        a, "llava_instruct", {"builder": "llava_instruct", "content": "pixels", "source_json": str(a.json)}
    )
    items = list(enumerate(records))
    keys = [record_key(i, r) for i, r in items]
    sizes = [sum(file_size(root / p) for p in image_paths(r)) + 2048 for r in records]
    fn = partial(make_sample, root=root, max_side=a.max_image_side, source=a.json.name)
    index = write_shards(items, keys, sizes, fn, cfg)
    print(summary(index))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
