"""LLaVA stage-1 (image-caption) JSON -> WebDataset shards.

Input: LLaVA's pretrain JSON (`chat.json` of CC3M-595K or `blip_laion_cc_sbu_558k.json`): a list of
`{id, image, conversations: [{from: human, value: '...<image>...'}, {from: gpt, value: caption}]}` plus the image
folder that `image` is relative to. Output per sample: `{key}.jpg|png` (original bytes unless --max-image-side),
`{key}.txt` (the caption), `{key}.json` (id, image, conversations, caption, has_image, source).

    python -m shards.llava_pretrain --json chat.json --images images/ --out shards/cc595k --workers 8
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
    """Structural errors stop the build before any image is read (a wrong file is not a data-quality issue)."""
    if not isinstance(records, list):
        raise ValueError(f"{json_path}: expected a JSON list of records, got {type(records).__name__}")
    for i, r in enumerate(records):
        require_fields(r, ("id", "image", "conversations"), f"{json_path}[{i}]")
        conv = r["conversations"]
        if not isinstance(conv, list) or len(conv) < 2:
            raise ValueError(f"{json_path}[{i}] (id {r['id']}): 'conversations' needs a human turn and a gpt turn")
        for j, turn in enumerate(conv[:2]):
            require_fields(turn, ("from", "value"), f"{json_path}[{i}].conversations[{j}]")


def make_sample(item: tuple[int, dict], root: Path, max_side: int | None, source: str = "json") -> Sample:
    i, rec = item
    key = sanitize_key(rec["id"])
    where = f"{key}: {source}[{i}]"
    caption = str(rec["conversations"][1]["value"]).strip()
    if not caption:
        raise SkipSample("empty_answer", f"{where}: conversations[1] (the caption) is empty")
    paths = image_paths(rec)
    image_count_check(paths, rec["conversations"][:2], where)
    files = read_images(root, paths, max_side, key)
    meta = {
        "id": rec["id"],
        "key": key,
        "image": rec["image"],
        "conversations": rec["conversations"][:2],
        "caption": caption,
        "has_image": True,
        "source": "llava_pretrain",
    }
    return Sample(key, {**files, "json": json_bytes(meta), "txt": caption.encode()})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shards.llava_pretrain", description=__doc__.split("\n\n")[0])
    add_llava_args(p, "chat.json / blip_laion_cc_sbu_558k.json")
    add_writer_args(p, default_max_samples=10000)
    a = p.parse_args(argv)
    records, root = load_llava_records(a, "LLaVA pretrain JSON", validate_records)
    cfg = writer_config(
        a, "llava_pretrain", {"builder": "llava_pretrain", "content": "pixels", "source_json": str(a.json)}
    )
    keys = [sanitize_key(r["id"]) for r in records]
    sizes = [sum(file_size(root / p) for p in image_paths(r)) for r in records]
    fn = partial(make_sample, root=root, max_side=a.max_image_side, source=a.json.name)
    index = write_shards(list(enumerate(records)), keys, sizes, fn, cfg)
    print(summary(index))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))  # a bad argument: one line, exit 2
