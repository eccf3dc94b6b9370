"""JPEG decoding at reduced DCT scale + the torch bicubic resize: pixels within 1/255 mean abs of a full decode +
Pillow's resize (the baseline's transform) on 500 px and 1000 px sources, the Pillow fallback (simplejpeg missing or
turned off) giving the same pixels, and Pillow deciding whatever simplejpeg refuses. Speeds: docs/data.md."""

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data import bench, transforms
from pipeline.data.transforms import dct_scale, decode_image, resize_bicubic

SIZE = 224


def _jpegs(w: int, h: int, n: int, photo: bool = True, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    src = bench.sample_photo() if photo else None  # None: 1/f noise at native sharpness (the harsh case)
    return [bench.photo_jpeg(rng, w, h, src) for _ in range(n)]


def _error(data: bytes, **kw) -> float:
    """Mean |ours - full decode + Pillow's bicubic resize| in 1/255 units."""
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.BICUBIC), np.float32)
    return float(np.abs(decode_image(data, SIZE, **kw).astype(np.float32) - ref).mean())


@pytest.mark.parametrize("turbo", [True, False])
@pytest.mark.parametrize(
    "w,h,photo",
    [
        (500, 375, True),
        (500, 500, True),
        (1000, 750, True),
        (1000, 1000, True),
        (1000, 750, False),
        (1400, 1400, False),
    ],
)
def test_pixels_within_1_255_of_full_decode_and_resize(w, h, photo, turbo):
    if turbo:
        pytest.importorskip("simplejpeg")
    errs = [_error(d, turbo=turbo) for d in _jpegs(w, h, 4, photo)]
    assert max(errs) < 1.0, errs


def test_scale_choice_keeps_the_margin_and_matches_pillows_draft():
    for w, h in [(500, 375), (1000, 750), (1343, 2000), (1344, 1400), (2688, 2688), (6000, 5400), (100, 80)]:
        m = dct_scale(w, h, SIZE)
        assert m in transforms.DCT_SCALES
        assert m == 8 or min(w, h) * m / 8 >= transforms.DCT_MARGIN * SIZE
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (90, 120, 30)).save(buf, format="JPEG")  # draft reads only the header
        img = Image.open(buf)
        need = int(np.ceil(transforms.DCT_MARGIN * SIZE))
        _, box = img.draft("RGB", (need, need))
        assert box[2] == w * m / 8  # the fallback decodes at the same scale


def test_fallback_without_simplejpeg_gives_the_same_pixels(monkeypatch):
    pytest.importorskip("simplejpeg")
    datas = _jpegs(1400, 1050, 2) + _jpegs(500, 375, 2)
    fast = [decode_image(d, SIZE) for d in datas]
    off = [decode_image(d, SIZE, turbo=False) for d in datas]
    monkeypatch.setattr(transforms, "simplejpeg", None)  # as if the package were not installed
    missing = [decode_image(d, SIZE) for d in datas]
    for a, b, c in zip(fast, off, missing):
        assert a.shape == b.shape == (SIZE, SIZE, 3) and np.array_equal(b, c)
        assert np.abs(a.astype(int) - b).max() <= 1  # both are libjpeg-turbo; builds may round differently


def test_turbo_path_decodes_without_pillow(monkeypatch):
    pytest.importorskip("simplejpeg")
    data = _jpegs(1400, 1050, 1)[0]
    want = decode_image(data, SIZE, turbo=False)

    def no_pillow(*a):
        raise AssertionError("Pillow decode on the simplejpeg path")

    monkeypatch.setattr(transforms, "_decode_pillow", no_pillow)
    assert np.abs(decode_image(data, SIZE, turbo=True).astype(int) - want).max() <= 1


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_colour_modes_match_pillow(mode):
    pytest.importorskip("simplejpeg")
    buf = io.BytesIO()
    Image.open(io.BytesIO(_jpegs(600, 450, 1)[0])).convert(mode).save(buf, format="JPEG")
    data = buf.getvalue()
    assert np.array_equal(decode_image(data, SIZE, turbo=True), decode_image(data, SIZE, turbo=False))


def test_truncated_jpeg_raises_pillows_error():
    pytest.importorskip("simplejpeg")
    data = _jpegs(500, 375, 1)[0]
    for turbo in (True, False):
        with pytest.raises(OSError, match="truncated"):
            decode_image(data[: len(data) // 2], SIZE, turbo=turbo)


def test_resize_matches_pillow_with_a_fractional_box():
    rng = np.random.default_rng(0)
    for h, w, extent in [(376, 501, (500.5, 375.5)), (300, 400, None), (250, 224, (224.0, 249.25))]:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ew, eh = extent or (w, h)
        ref = np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.BICUBIC, box=(0, 0, ew, eh)))
        ours = resize_bicubic(arr, SIZE, extent)
        diff = np.abs(ours.astype(int) - ref)
        assert ours.shape == (SIZE, SIZE, 3) and diff.mean() < 0.02 and diff.max() <= 2


def test_upscale_stays_pillows():
    arr = np.random.default_rng(1).integers(0, 256, (400, 50, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(arr).resize((SIZE, SIZE), Image.BICUBIC))
    assert np.array_equal(resize_bicubic(arr, SIZE), ref)


def test_normalise_is_to_tensor_then_normalize_bit_for_bit():
    import torch

    from pipeline.constants import IMAGE_MEAN, IMAGE_STD

    levels = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), (1, 1, 3))
    imgs = [levels, np.ascontiguousarray(levels[::-1]), resize_bicubic(np.tile(levels, (20, 20, 1)), 16)]
    x = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in imgs]).float() / 255
    want = (x - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    got = transforms.normalise(imgs, IMAGE_MEAN, IMAGE_STD, 16)
    assert got.is_contiguous() and torch.equal(got, want)
