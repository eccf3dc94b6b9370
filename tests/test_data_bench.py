"""The loader bench runs (a smoke test: speed figures come from running it, see docs/data.md), and the reduced-size
JPEG decode stays within 1/255 mean abs of a full decode at 224 px output."""

from pipeline.data import bench


def test_bench_runs(tmp_path, capsys):
    assert bench.main(["--n", "40", "--rounds", "1", "--sets", "jpeg224", "features", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "webdataset+PIL" in out and "features" in out and "pixel error" in out


def test_draft_decode_pixel_error_at_1000px(tmp_path):
    urls = bench.make_shards(tmp_path, "jpeg", 12, size=(1000, 750))
    assert bench.pixel_error(urls) < 1.0  # in 1/255 units
