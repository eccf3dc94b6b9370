"""Image decoding and the VPG transform, batched: decode each image to uint8 HxWx3 at `size`, then normalise the
whole batch in one tensor op. Precomputed features (`{key}.feat.npy` / `.feat.pth`) are loaded instead of pixels.

The transform is BLIP-2's eval transform: resize to size x size (bicubic, no crop), scale to [0, 1], normalise with
IMAGE_MEAN / IMAGE_STD from pipeline.constants (the CLIP constants BLIP-2 uses).

JPEG is decoded at reduced size where that stays >= size on both sides (libjpeg-turbo's DCT scaling, through
`simplejpeg` when installed, else Pillow's `Image.draft`: the two give the same pixels), and every downscale is
torch's vectorised uint8 antialiased bicubic, which is Pillow's resize(BICUBIC) to within rounding. docs/data.md
has the speeds and the pixel error against a full decode + Pillow's resize.
"""

from __future__ import annotations

import functools
import io
import math
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.constants import IMAGE_MEAN, IMAGE_STD

try:
    import simplejpeg
except ImportError:  # optional: Pillow's draft decodes the same scales, ~10-25% slower (docs/data.md)
    simplejpeg = None

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")  # gif: its first frame (what the builders accept)
UNSUPPORTED_IMAGE_EXTS = ("svg", "heic", "heif", "avif", "jxl")  # images Pillow cannot decode: unsupported_image
FEATURE_EXTS = ("feat.npy", "feat.pth")


def default_mean_std() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The BLIP-2 / CLIP normalisation (pipeline.constants), the default of data.image_mean / image_std."""
    return IMAGE_MEAN, IMAGE_STD


@functools.lru_cache(maxsize=1024)
def _member_index(name: str, exts: tuple[str, ...]) -> int:
    """`jpg` -> 0, `3.png` -> 3, anything else -> -1 (member names repeat across records: cached)."""
    if name in exts:
        return 0
    head, _, tail = name.partition(".")
    return int(head) if head.isdigit() and tail in exts else -1


def _indexed(record: dict[str, Any], exts: tuple[str, ...]) -> list[str]:
    """Members `{ext}` or `{i}.{ext}` in image order: `jpg` (or `0.jpg`) first, then `1.jpg`, `2.png`, ..."""
    found: dict[int, str] = {}
    for name in record:
        i = _member_index(name, exts)
        if i >= 0:
            found.setdefault(i, name)
    return [found[i] for i in sorted(found)] if len(found) > 1 else list(found.values())


def image_exts(record: dict[str, Any]) -> list[str]:
    return _indexed(record, IMAGE_EXTS)


def feature_exts(record: dict[str, Any]) -> list[str]:
    return _indexed(record, FEATURE_EXTS)


def unsupported_image_ext(record: dict[str, Any]) -> str | None:
    return next(iter(_indexed(record, UNSUPPORTED_IMAGE_EXTS)), None)


JPEG_TURBO = simplejpeg is not None  # decode_image's default: simplejpeg for JPEG (the bench switches it off)
_TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")  # CMYK / YCCK: Pillow's own conversion, whatever simplejpeg would do
_SOI = b"\xff\xd8\xff"
# DCT scales M/8 tried, smallest first. Only powers of two: libjpeg-turbo's 1/8, 1/4, 1/2 and 8/8 IDCTs are SIMD, the
# others (3/8, 5/8, 6/8, 7/8, whose chroma is IDCT-upscaled 6x6 .. 14x14) plain C: a 5/8 decode of a 500 x 375
# JPEG costs more than the full one (docs/data.md, `bench --scales`). Pillow's draft picks from the same set.
DCT_SCALES = (1, 2, 4, 8)
# The reduced decode must keep >= DCT_MARGIN x size on both sides. DCT scaling truncates each 8 x 8 block's spectrum,
# a different low-pass than the bicubic antialias; measured at 1/2 on JPEGs at their native sharpness, mean abs error
# vs a full decode + Pillow's resize (worst of three photos): 3.4/255 at 1x, 1.8 at 1.5x, 1.25 at 2x,
# 0.7 at 3x (docs/data.md). So 3x: at 224 px, 1/2 from 1344 px, 1/4 from 2688 px, 1/8 from 5376 px.
DCT_MARGIN = 3.0


def dct_scale(width: int, height: int, size: int, margin: float | None = None) -> int:
    """The smallest M in DCT_SCALES whose M/8 decode keeps >= margin (default DCT_MARGIN) x size on both sides."""
    need = math.ceil(size * (DCT_MARGIN if margin is None else margin))
    return next((m for m in DCT_SCALES if width * m >= need * 8 and height * m >= need * 8), 8)


class ImageTooLarge(ValueError):
    """An image whose header declares more pixels than allowed (refused before decoding)."""


def check_image_pixels(data: bytes, max_pixels: int | None, where: str = "image") -> None:
    """Refuse an image with more than `max_pixels` pixels from its header alone (nothing is decoded)."""
    if max_pixels is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below is the one that counts
            w, h = Image.open(io.BytesIO(data)).size  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{where}: {e}") from None
    except (OSError, ValueError):
        return  # not an image PIL can read: decode_image reports it
    if w * h > max_pixels:
        raise ImageTooLarge(
            f"{where}: {w}x{h} = {w * h:,} pixels > data.max_image_pixels={max_pixels:,} (refused before decoding)"
        )


def decode_image(data: bytes, size: int, turbo: bool | None = None, max_pixels: int | None = None) -> np.ndarray:
    """bytes -> (size, size, 3) uint8: JPEG at reduced DCT scale when >= DCT_MARGIN x size, then the bicubic resize.

    `turbo`: decode JPEG with simplejpeg (default: when installed); False or not installed: Pillow. `max_pixels`:
    ImageTooLarge for a larger image, from its header, before any decoding."""
    check_image_pixels(data, max_pixels)
    decoded = None
    if (JPEG_TURBO if turbo is None else turbo) and simplejpeg is not None and data[:3] == _SOI:
        decoded = _decode_turbo(data, size)
    arr, extent = decoded if decoded is not None else _decode_pillow(data, size)
    return resize_bicubic(arr, size, extent)


def _decode_turbo(data: bytes, size: int) -> tuple[np.ndarray, tuple[float, float]] | None:
    """simplejpeg at the chosen scale, or None (then Pillow decides: its errors, its colour conversions)."""
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in _TURBO_COLORSPACES or h * w > (Image.MAX_IMAGE_PIXELS or h * w):
            return None  # keep Pillow's CMYK conversion and its decompression-bomb check
        m = dct_scale(w, h, size)
        arr = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h * m // 8), min_width=-(-w * m // 8))
    except ValueError:  # corrupt / truncated (strict): Pillow raises or decodes as it always did
        return None
    return arr, (w * m / 8, h * m / 8)


def _decode_pillow(data: bytes, size: int) -> tuple[np.ndarray, tuple[float, float]]:
    img = Image.open(io.BytesIO(data))
    # JPEG: the scale dct_scale picks (draft's rule is the same); `box` is the picture's extent in decoded pixels (the
    # decoded array is rounded up: it can reach a fraction of a pixel past the picture). Other formats: None.
    need = math.ceil(size * DCT_MARGIN)
    _, box = img.draft("RGB", (need, need)) or (None, (0, 0) + img.size)
    if img.mode != "RGB":
        img = img.convert("RGB")  # GIF: the first frame
    return np.asarray(img), (box[2], box[3])


def resize_bicubic(arr: np.ndarray, size: int, extent: tuple[float, float] | None = None) -> np.ndarray:
    """(h, w, 3) uint8 -> (size, size, 3) uint8 = Pillow's resize((size, size), BICUBIC, box=(0, 0) + extent).

    `extent`: the (width, height) of the picture in `arr`'s pixels (default its shape; a DCT-scaled decode may end a
    fraction of a pixel past it). Downscales run torch's uint8 antialiased bicubic (AVX2, 4-8x faster than Pillow's
    here; the same filter, mean difference 0.002/255, at most 2 levels); an upscale on either side stays Pillow's
    (torch's differs more there and small images are cheap)."""
    h, w = arr.shape[:2]
    ew, eh = extent or (w, h)
    if (w, h) == (size, size) and (ew, eh) == (w, h):
        return arr
    if ew < size or eh < size:
        return np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC, box=(0, 0, ew, eh)))
    x = _as_tensor(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)  # channels-last (1, 3, h, w), no copy
    # the aten op F.interpolate calls, with explicit scales: F.interpolate takes a size or a scale, not both, and
    # the scale (size / extent) is what maps the fractional extent like Pillow's box
    y = torch.ops.aten._upsample_bicubic2d_aa(x, [size, size], False, size / eh, size / ew)
    return y[0].permute(1, 2, 0).numpy()


def decode_features(data: bytes, ext: str) -> np.ndarray:
    """bytes -> (K, W) array (fp16 as stored)."""
    if ext.endswith("feat.npy"):  # `feat.npy` or `{i}.feat.npy`
        arr = _npy(data)
    else:
        arr = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True).numpy()
    if arr.ndim != 2:
        raise ValueError(f"features must be (K, W), got shape {arr.shape}")
    return arr


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], int]] = {}


def _npy(data: bytes) -> np.ndarray:
    """np.load without its per-call header parse (ast.literal_eval): every feature file of a shard set has the same
    header, so it is parsed once (by numpy) and the array is a view of the bytes."""
    if data[:6] != b"\x93NUMPY" or len(data) < 10:
        raise ValueError("not a .npy file")
    major = data[6]
    hlen, start = (
        (int.from_bytes(data[8:10], "little"), 10) if major == 1 else (int.from_bytes(data[8:12], "little"), 12)
    )
    header = data[: start + hlen]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if arr.dtype.hasobject or arr.flags.f_contiguous and arr.ndim > 1 and not arr.flags.c_contiguous:
            return arr  # unusual files: numpy's own path, not cached
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = (arr.dtype, arr.shape, start + hlen)
        return arr
    dtype, shape, offset = parsed
    n = int(np.prod(shape))
    if len(data) - offset != n * dtype.itemsize:
        raise ValueError(f".npy payload has {len(data) - offset} bytes, header says {shape} {dtype}")
    return np.frombuffer(data, dtype=dtype, count=n, offset=offset).reshape(shape)


_MEAN_STD: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def normalise(images_uint8: list[np.ndarray], mean: tuple, std: tuple, size: int) -> torch.Tensor:
    """list of (H, W, 3) uint8 -> (N, 3, H, W) float32 = (x / 255 - mean) / std.

    One strided uint8 -> float32 copy into NCHW, then three in-place vectorised passes: the same float32 operations
    as ToTensor + Normalize (bit-identical), ~2x cheaper per CPU second than the per-channel lookup table it
    replaces (np.take gathers, measured on the 2-core box)."""
    if not images_uint8:
        return torch.empty(0, 3, size, size)
    key = (tuple(mean), tuple(std))
    if key not in _MEAN_STD:
        _MEAN_STD[key] = tuple(torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in key)
    m, sd = _MEAN_STD[key]
    x = torch.stack([_as_tensor(im).permute(2, 0, 1) for im in images_uint8])  # (N, 3, H, W) uint8
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255).sub_(m).div_(sd)


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A tensor view of `arr`; np.asarray(PIL image) is read-only, which torch warns about (nothing writes to it)."""
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)
