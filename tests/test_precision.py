"""`precision: auto` (issue 27, item 6): bf16 on CUDA with bf16 and on CPUs whose torch runs bf16 natively and
measurably not slower, else fp32; resolved before launch, logged, recorded in the run dir so a resume cannot flip it.
The run with `precision: auto` is tests/test_reliability_resume_config.py's base run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

import pipeline.train as train
from pipeline.training import precision
from pipeline.training.config import ConfigError, load_config
from pipeline.training.ds_config import fill_ds_config, load_ds_config, plan_batch
from pipeline.training.run_record import as_json, check_rerun
from tests.reliability import build_workdir, write_config

REPO = Path(__file__).resolve().parents[1]


def _hardware(monkeypatch, cuda: bool = False, mkldnn: bool = False, ratio: float | None = None) -> list[int]:
    """What torch reports, set per case; returns the widths the CPU probe was measured at (none: not measured)."""
    measured: list[int] = []

    def measure(width: int) -> float:
        measured.append(width)
        assert ratio is not None, "measured although no measurement was expected"
        return ratio

    monkeypatch.setattr(precision, "cuda_bf16_supported", lambda: cuda)
    monkeypatch.setattr(precision, "mkldnn_bf16_supported", lambda: mkldnn)
    monkeypatch.setattr(precision, "measure_cpu_bf16_speed", measure)
    return measured


def test_auto_decides_from_what_torch_reports_and_the_measured_ratio(monkeypatch):
    _hardware(monkeypatch, cuda=True)
    assert precision.resolve_precision("cuda") == ("bf16", "cuda: bf16 supported")
    _hardware(monkeypatch, cuda=False)
    got, why = precision.resolve_precision(torch.device("cuda", 0))
    assert got == "fp32" and "pre-Ampere" in why
    measured = _hardware(monkeypatch, mkldnn=False)
    assert precision.resolve_precision("cpu") == ("fp32", "cpu: no native bf16: mkldnn bf16 unsupported")
    assert measured == []  # no native kernel: not even measured
    measured = _hardware(monkeypatch, mkldnn=True, ratio=2.5)
    assert precision.resolve_precision("cpu", width=576) == (
        "bf16",
        "cpu: native bf16 (mkldnn), measured 2.50x the fp32 speed at width 576",
    )
    assert measured == [576]
    _hardware(monkeypatch, mkldnn=True, ratio=0.8)  # reported native, measured slower: never the slower path
    got, why = precision.resolve_precision("cpu", width=576)
    assert got == "fp32" and "0.80x the fp32 speed" in why and "slower" in why


def test_auto_on_this_machine_is_what_its_cpu_runs_natively():
    """No mocks: this machine's torch decides. On a CPU without native bf16 (the AVX2-only Zen 3 these tests were
    written on) auto is fp32 for the mkldnn reason, and the probe itself measures bf16 slower."""
    got, why = precision.resolve_precision("cpu", width=576)
    if not precision.mkldnn_bf16_supported():
        assert (got, why) == ("fp32", "cpu: no native bf16: mkldnn bf16 unsupported")
        assert precision.measure_cpu_bf16_speed(576) < 1.0  # emulated: 0.15-0.3x the fp32 speed at this shape here
    else:
        assert "measured" in why and got in ("bf16", "fp32")


def test_agree_across_ranks_in_a_world_of_one(dist_world_of_one):
    assert precision.agree_across_ranks("bf16", torch.device("cpu")) == "bf16"
    assert precision.agree_across_ranks("fp32", torch.device("cpu")) == "fp32"


def test_the_demo_presets_ask_for_auto_and_explicit_values_stay():
    for preset in ("demo.yaml", "demo_smollm2.yaml"):
        assert load_config(REPO / "configs" / preset).precision == "auto", preset
    cfg = load_config(REPO / "configs" / "demo.yaml", ["precision=bf16"])
    train.resolve_auto_precision(cfg, rank=0)
    assert cfg.precision == "bf16"  # only "auto" is resolved
    with pytest.raises(ConfigError, match="precision: must be one of bf16|fp32|auto"):
        load_config(REPO / "configs" / "demo.yaml", ["precision=fp16"])
    unresolved = load_config(REPO / "configs" / "demo.yaml")  # never silently trained as fp32 (or bf16)
    s = unresolved.stages[-1]
    with pytest.raises(ConfigError, match="precision='auto' reached the DeepSpeed config unresolved"):
        fill_ds_config(load_ds_config(REPO / "ds_configs" / "zero2.json"), unresolved, s, plan_batch(s, 1), "cpu")


def test_a_resume_where_auto_would_resolve_otherwise_is_a_named_change(monkeypatch, tmp_path, capsys):
    """The run dir's config.json holds the resolved precision; a rerun whose `auto` resolves to another one is the
    semantic change precision: 'fp32' -> 'bf16' (exit 2 unless --resume-changed), not a silent flip."""
    overrides = [f"output_dir={tmp_path / 'run'}"]
    first = load_config(REPO / "configs" / "demo.yaml", overrides)
    monkeypatch.setattr(train, "resolve_precision", lambda device, width: ("fp32", "first machine"))
    train.resolve_auto_precision(first, rank=0)
    assert first.precision == "fp32" and "precision auto -> fp32 (first machine)" in capsys.readouterr().out
    dirs = train.stage_dirs(first)
    (dirs[0] / "checkpoints").mkdir(parents=True)
    (dirs[0] / "checkpoints" / "latest").write_text("step_00000002")
    (tmp_path / "run" / "config.json").write_text(json.dumps(as_json(first)))

    same = load_config(REPO / "configs" / "demo.yaml", overrides)
    train.resolve_auto_precision(same, rank=0)
    assert check_rerun(same, dirs, allow_changed=False) is None
    capsys.readouterr()

    other = load_config(REPO / "configs" / "demo.yaml", overrides)
    monkeypatch.setattr(train, "resolve_precision", lambda device, width: ("bf16", "other machine"))
    train.resolve_auto_precision(other, rank=1)
    assert capsys.readouterr().out == ""  # rank 0 logs the choice, the others do not
    with pytest.raises(ConfigError, match="precision: 'fp32' -> 'bf16'"):
        check_rerun(other, dirs, allow_changed=False)
    assert check_rerun(other, dirs, allow_changed=True)["changes"]["precision"] == {"old": "fp32", "new": "bf16"}


@pytest.mark.slow
def test_the_probe_trains_the_same_batches_in_each_precision(tmp_path, monkeypatch, dist_world_of_one):
    """scripts/precision_probe.py on the tiny PILL and a small demo set (2 steps per variant): every variant runs the
    trainer's step on the same micro-batches; at step 0 (the same weights) each bf16 variant's loss is within a few
    bf16 roundings of the fp32 loss, as the fp32 weights' own bf16 forward is."""
    spec = importlib.util.spec_from_file_location("precision_probe", REPO / "scripts" / "precision_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    workdir = build_workdir(tmp_path)
    monkeypatch.setenv("PILL_TINY_DIR", str(workdir / "tiny"))
    threads, cfg = torch.get_num_threads(), write_config(workdir, "probe")
    try:
        rc = probe.main(["--config", str(cfg), "--steps", "2", "--json", str(tmp_path / "p")])
    finally:
        torch.set_num_threads(threads)  # the probe sets its own count; later tests keep theirs
    assert rc == 0
    r = json.loads((tmp_path / "p").read_text())
    want, why = precision.resolve_precision("cpu", 576)
    assert r["auto"] == {"precision": want, "why": why}
    fp32 = r["variants"]["fp32"]
    assert len(fp32["loss"]) == 2 and fp32["samples_per_s"] > 0
    for name in ("autocast", "deepspeed_bf16"):
        v = r["variants"][name]
        assert v["samples_per_s"] > 0 and len(v["loss"]) == 2 and all(math.isfinite(x) for x in v["loss"])
        noise = max(v["bf16_noise_rel_diff"][0], 2**-8)
        assert v["loss_rel_diff_vs_fp32"][0] <= 4 * noise, (name, v, fp32)
