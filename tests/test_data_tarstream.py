"""The loader's tar reader agrees with tarfile (GNU, pax and ustar names), rejects what is not a tar, and tells a
cut archive from a complete one; the .npy fast path agrees with np.load."""

import io
import tarfile

import numpy as np
import pytest

from pipeline.data.tarstream import TarError, iter_members
from pipeline.data.transforms import _npy


def _long_name(fmt) -> str:
    """Over 100 characters: a GNU long-name / pax header, or (ustar) the prefix field."""
    return "d/" + "x" * 90 + "/y.feat.npy" if fmt == tarfile.USTAR_FORMAT else "d/" + "x" * 150 + ".feat.npy"


def _tar(fmt) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in (("a.json", b"{}"), (_long_name(fmt), b"\x01" * 700), ("dir/b.txt", b"")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("emptydir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("seekable", [True, False])
def test_members_match_tarfile(fmt, seekable):
    raw = _tar(fmt)
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        ref = [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]
    assert _long_name(fmt) in [n for n, _ in ref]
    assert [(m.name, m.read()) for m in iter_members(io.BytesIO(raw), seekable)] == ref
    # members whose data is not read are skipped over
    assert [m.name for m in iter_members(io.BytesIO(raw), seekable)] == [n for n, _ in ref]


def test_damage_is_an_error():
    raw = _tar(tarfile.GNU_FORMAT)
    with pytest.raises(TarError, match="not a tar"):
        list(iter_members(io.BytesIO(b"hello" * 200), False))
    with pytest.raises(TarError, match="empty"):
        list(iter_members(io.BytesIO(b""), False))
    with pytest.raises(TarError, match="truncated"):  # cut exactly at a header boundary: tarfile ends silently
        list(iter_members(io.BytesIO(raw[: 512 + 512]), False))
    with pytest.raises(TarError, match="truncated"):
        [m.read() for m in iter_members(io.BytesIO(raw[:2000]), False)]


@pytest.mark.parametrize(
    "arr", [np.arange(12, dtype=np.float16).reshape(3, 4), np.ones((2, 5), np.float32), np.zeros((0, 3), np.int64)]
)
def test_npy_fast_path(arr):
    buf = io.BytesIO()
    np.save(buf, arr)
    for _ in range(2):  # first call parses and caches the header, the second uses the cache
        out = _npy(buf.getvalue())
        assert out.dtype == arr.dtype and np.array_equal(out, arr)
    with pytest.raises(ValueError, match="payload"):
        _npy(buf.getvalue()[:-2] if arr.size else buf.getvalue() + b"xx")
