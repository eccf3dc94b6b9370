"""The loader bench runs (a smoke test: speed figures come from running it, see docs/data.md), and its pixel-error
figure (ours vs a full decode + Pillow's resize) is below 1/255 at 1000 px; tests/test_data_jpeg.py has the rest."""

import pytest

from pipeline.data import bench


def test_bench_runs(tmp_path, capsys):
    args = ["--n", "40", "--rounds", "1", "--sets", "jpeg224", "jpeg500", "features", "--dir", str(tmp_path)]
    try:
        import simplejpeg  # noqa: F401

        args.append("--scales")
    except ImportError:
        pass
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert "webdataset+PIL" in out and "features" in out and "pixel error" in out and "(pillow" in out


@pytest.mark.parametrize("turbo", [None, False])
def test_pixel_error_figure_at_1000px(tmp_path, turbo):
    urls = bench.make_shards(tmp_path, "jpeg", 12, size=(1000, 750))
    mean, worst = bench.pixel_error(urls, turbo=turbo)
    assert mean <= worst < 1.0  # in 1/255 units
