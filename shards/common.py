"""Helpers shared by the builders: input validation with clear errors, image checks, JSON encoding."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from pipeline.data.config import DataConfig
from pipeline.data.transforms import ImageTooLarge, check_image_pixels
from shards.writer import SkipSample

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif"}


def require_file(path: Path | str, what: str) -> Path:
    """Fail before any expensive work, naming the file and what it should be."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def require_dir(path: Path | str, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{what} is not a directory: {p}")
    return p


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None


def require_fields(rec: Any, fields: tuple[str, ...], where: str) -> None:
    """`where` names the file and record, e.g. 'chat.json[17]'."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
    missing = [f for f in fields if f not in rec]
    if missing:
        raise ValueError(f"{where}: missing field(s) {missing}; has {sorted(rec)}")


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()


def read_image(
    path: Path, max_side: int | None = None, key: str = "", max_pixels: int | None = DataConfig.max_image_pixels
) -> tuple[bytes, str]:
    """Return (bytes, ext) of a decodable image; raise SkipSample('missing_image' | 'undecodable_image' |
    'image_too_large').

    The original bytes are kept unless `max_side` asks for a downscale (saves shard space for 224 px training).
    An image over `max_pixels` (the training default data.max_image_pixels) is refused from its header, before
    decoding: a small PNG can decode to gigabytes.
    """
    if not path.is_file():
        raise SkipSample("missing_image", f"{key}: {path}")
    data = path.read_bytes()
    try:
        check_image_pixels(data, max_pixels, str(path))
    except ImageTooLarge as e:
        raise SkipSample("image_too_large", f"{key}: {e}") from None
    try:
        img = Image.open(io.BytesIO(data))
        fmt = (img.format or "").lower()
        if max_side is None or max(img.size) <= max_side:
            img.draft("RGB", (224, 224))  # JPEG: decode at reduced scale; still reads the whole entropy stream
            img.load()
            if fmt in ("jpeg", "png"):
                return data, "jpg" if fmt == "jpeg" else "png"
        img = img.convert("RGB")
        if max_side is not None and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.BICUBIC)
    except Exception as e:  # PIL raises many types for bad files
        raise SkipSample("undecodable_image", f"{key}: {path}: {type(e).__name__}: {e}") from None
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "jpg"


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def image_paths(rec: dict, field: str = "image") -> list[str]:
    """A LLaVA record's images: `image` is one path, a list of paths (multi-image), or absent/null."""
    v = rec.get(field)
    if not v:
        return []
    return [str(x) for x in v] if isinstance(v, list) else [str(v)]


def image_count_check(paths: list[str], conv: list[dict], where: str) -> None:
    """Several images need one `<image>` marker each in the human turns (one image: the loader adds a missing one)."""
    markers = sum(str(t.get("value", "")).count("<image>") for t in conv if t.get("from") == "human")
    if len(paths) > 1 and markers != len(paths):
        raise SkipSample("image_count_mismatch", f"{where}: {len(paths)} images but {markers} <image> markers")


def read_images(root: Path, paths: list[str], max_side: int | None, key: str) -> dict[str, bytes]:
    """Tar members of a sample's images: `jpg`/`png` for one, `0.jpg`, `1.png`, ... for several."""
    files = {}
    for j, p in enumerate(paths):
        data, ext = read_image(root / p, max_side, key)
        files[ext if len(paths) == 1 else f"{j}.{ext}"] = data
    return files


def check_image_root(records: list[dict], root: Path, field: str = "image") -> None:
    """A wrong --images path would skip every sample as missing: catch it from the first few records."""
    probe = [p for r in records[:50] for p in image_paths(r, field)]
    if probe and not any((root / p).is_file() for p in probe):
        raise FileNotFoundError(
            f"none of the first {len(probe)} images exist under --images {root} "
            f"(e.g. {root / probe[0]}); is the image folder right?"
        )


def add_llava_args(p: Any, json_help: str) -> None:
    """The inputs every LLaVA-format builder takes: the conversation JSON and the image folder."""
    p.add_argument("--json", required=True, type=Path, help=json_help)
    p.add_argument("--images", required=True, type=Path, help="folder the records' 'image' paths are relative to")
    p.add_argument("--max-image-side", type=int, default=None, help="downscale larger images (JPEG re-encode)")
    p.add_argument("--limit", type=int, default=None, help="only the first N records (smoke runs)")


def load_llava_records(a: Any, what: str, validate: Any) -> tuple[list[dict], Path]:
    """Check the paths, read and validate the JSON, apply --limit; fail before any image is read."""
    require_file(a.json, f"--json ({what})")
    root = require_dir(a.images, "--images")
    records = load_json(a.json, "--json")
    validate(records, a.json)
    records = records[: a.limit] if a.limit else records
    check_image_root(records, root)
    return records, root
