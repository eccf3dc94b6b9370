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

from shards.common import (
    add_llava_args,
    file_size,
    json_bytes,
    load_llava_records,
    read_image,
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


def make_sample(item: tuple[int, dict], root: Path, max_side: int | None) -> Sample:
    i, rec = item
    key = record_key(i, rec)
    conv = rec["conversations"]
    roles = [t["from"] for t in conv]
    if len(conv) < 2 or roles[0] != "human" or any(r not in ("human", "gpt") for r in roles):
        raise SkipSample("bad_conversation", f"{key}: roles {roles}")
    if any(t["from"] == "gpt" and not str(t["value"]).strip() for t in conv) or "gpt" not in roles:
        raise SkipSample("empty_answer", key)
    files: dict[str, bytes] = {}
    has_image = bool(rec.get("image"))
    if has_image:
        data, ext = read_image(root / rec["image"], max_side, key)
        files[ext] = data
    meta = {"id": rec["id"], "key": key, "image": rec.get("image"), "conversations": conv, "has_image": has_image,
            "source": "llava_instruct"}
    files["json"] = json_bytes(meta)
    return Sample(key, files)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.llava_instruct", description=__doc__.split("\n\n")[0])
    add_llava_args(p, "llava_v1_5_mix665k.json or the like")
    add_writer_args(p, default_max_samples=5000)
    a = p.parse_args(argv)
    records, root = load_llava_records(a, "instruction JSON", validate_records)
    cfg = writer_config(a, "llava_instruct", {"builder": "llava_instruct", "content": "pixels",
                                              "source_json": str(a.json)})
    items = list(enumerate(records))
    keys = [record_key(i, r) for i, r in items]
    sizes = [(file_size(root / r["image"]) if r.get("image") else 0) + 2048 for r in records]
    index = write_shards(items, keys, sizes, partial(make_sample, root=root, max_side=a.max_image_side), cfg)
    print(summary(index))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
