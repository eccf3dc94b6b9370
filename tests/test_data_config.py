"""The `data:` config: every field validated with a message naming it; the package boundary pipeline -> shards."""

import ast
from pathlib import Path

import pytest

from pipeline.data import SKIP_REASONS, DataConfig, SourceConfig, build_loader
from pipeline.data.records import SkipCounter

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "field,value,msg",
    [
        ("image_input", "x", "data.image_input must be auto|pixels|features, got 'x'"),
        ("max_length", 4, "data.max_length must be an integer >= 8"),
        ("num_workers", -1, "data.num_workers"),
        ("shuffle_buffer", 1.5, "data.shuffle_buffer"),
        ("sqa_format", "QCM", "data.sqa_format"),
        ("image_mean", (0.5, 0.5), "data.image_mean must be three numbers"),
        ("image_std", (0.5, 0.0, 0.5), "data.image_std must be > 0"),
    ],
)
def test_bad_fields_name_themselves(field, value, msg):
    with pytest.raises(ValueError) as e:
        DataConfig(**{field: value})
    assert str(e.value).startswith(msg.split(",")[0]) and msg in str(e.value)


def test_image_stats_from_yaml_lists_become_tuples():
    assert DataConfig(image_mean=[0.5, 0.5, 0.5]).image_mean == (0.5, 0.5, 0.5)


def test_per_stage_arguments_are_checked_at_build(tmp_path):
    with pytest.raises(ValueError, match="data.max_length 16 leaves no room"):
        build_loader(DataConfig(max_length=16), None, sources=[SourceConfig("x")], batch_size=1, num_query_tokens=32)
    with pytest.raises(ValueError, match="rank 2 not in"):
        build_loader(
            DataConfig(), None, sources=[SourceConfig("x")], batch_size=1, num_query_tokens=4, rank=2, world_size=2
        )


def test_skip_reasons_are_closed():
    c = SkipCounter()
    for r in SKIP_REASONS:
        c.skip(r, "s")
    assert set(c.counts) == set(SKIP_REASONS) and len(SKIP_REASONS) == len(set(SKIP_REASONS))
    with pytest.raises(ValueError, match="unknown skip reason"):
        c.skip("made_up", "s")


def test_pipeline_data_never_imports_shards():
    """`shards` may use pipeline.data; the reverse would make the trainer depend on the builders."""
    offenders = []
    for p in [*(ROOT / "pipeline" / "data").rglob("*.py"), ROOT / "pipeline" / "constants.py"]:
        for node in ast.walk(ast.parse(p.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            )
            offenders += [f"{p.relative_to(ROOT)}: {n}" for n in names if n == "shards" or n.startswith("shards.")]
    assert not offenders, offenders
