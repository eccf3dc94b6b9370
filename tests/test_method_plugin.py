"""A method added from outside the package (tests/toy_method.py: one file, one `register` call) trains, exports
and reloads through the public entry points: `pipeline.train.main`, `pipeline.model.load_export`, generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.data.prompt_cut import Prompt
from pipeline.generate import GenerationConfig, generate_ids
from pipeline.model import METHODS, load_export, read_export_meta
from pipeline.params import main as params_main
from tests import toy_method

REPO = Path(__file__).resolve().parents[1]
TRAIN = """
import sys
import tests.toy_method  # registers the method, as a user's plug-in module would
from pipeline.train import main
sys.exit(main(sys.argv[1:]))
"""


def test_registered_method_is_in_the_table_and_a_second_registration_fails():
    assert METHODS["linear_projector"] is toy_method.SPEC
    with pytest.raises(ValueError, match="registered twice"):
        toy_method.register(toy_method.SPEC)


def test_params_counts_a_registered_method(capsys):
    assert params_main(["--method", "linear_projector", "--llm-preset", "tiny"]) == 0
    assert "trainable=49216" in capsys.readouterr().out  # 768 x 64 + 64: the projection at the tiny width


def test_toy_method_trains_exports_and_reloads(tmp_path):
    data = tmp_path / "data"
    args = [
        "--set",
        "model.method=linear_projector",
        "--set",
        "model.options={attn_backend: sdpa}",
        "--set",
        "stages.*.max_steps=3",
        "--set",
        "stages.*.micro_batch_size=4",
        "--set",
        "eval.max_samples=8",
        "--set",
        "log.tensorboard=false",
        "--set",
        "log.progress_bar=false",
        "--set",
        f"prepare.0.args=[--out, {data}, --n-train, '48', --n-val, '8', --max-samples, '24', "
        "--qtypes, color, --fixed-options, --no-progress]",
        "--set",
        f"prepare.0.creates={data}",
        "--set",
        f"stages.*.train_shards=[{data}/train-index.json]",
        "--set",
        f"stages.1.eval_shards=[{data}/val-index.json]",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    env = {**os.environ, "PILL_TINY_DIR": str(tmp_path / "tiny"), "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", TRAIN, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    export = tmp_path / "run" / "stage2" / "export"
    meta = read_export_meta(export)
    assert meta["method"] == "linear_projector" and meta["keys"] == ["projection.bias", "projection.weight"]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["n"] == 8

    os.environ["PILL_TINY_DIR"] = str(tmp_path / "tiny")
    model = load_export(export, "tiny", "tiny", dtype=torch.float32)
    saved = load_file(str(export / "adapter_model.safetensors"))
    assert isinstance(model, toy_method.LinearProjector)
    assert torch.equal(model.projection.weight, saved["projection.weight"])
    fresh = toy_method.SPEC.load("tiny", "tiny", dtype=torch.float32)
    assert not torch.equal(fresh.projection.weight, saved["projection.weight"])  # training moved it
    ids = model.tokenizer("What colour is the square?").input_ids
    prompts = [Prompt(ids, [False] * len(ids)), Prompt(ids[:3], [False] * 3)]
    cached = generate_ids(model, prompts, GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    uncached = generate_ids(model, prompts, GenerationConfig(max_new_tokens=5, stop_at_eos=False, use_cache=False))
    assert cached == uncached and all(len(row) == 5 for row in cached)  # its KV cache, left padding included
