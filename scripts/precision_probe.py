"""The demo_smollm2 stage-2 training step in fp32 and in bf16, side by side in one process (issue 27, item 6).

    python scripts/precision_probe.py [--config demo_smollm2] [--steps 3] [--threads 1]
        [--variants fp32,autocast,deepspeed_bf16] [--json PATH]

Builds the preset's stage 2 exactly as the trainer does (pipeline.training.loop.setup_stage: the real SmolLM2 with
PILL at init, the preset's micro-batch, ds_configs/zero2.json, one rank) once per variant, takes the first `--steps`
micro-batches of the preset's shards, and runs the trainer's step on each (forward, loss, engine.backward,
engine.step), the variants taking turns step by step so that all see the same machine load:

- fp32: what the demo trains (`precision: fp32`);
- autocast: fp32 master weights (the trainables and their AdamW state stay fp32), the frozen weights stored in bf16,
  the forward and loss under `torch.autocast("cpu"|"cuda", bfloat16)`: the recipe that avoids DeepSpeed's bf16
  engine;
- deepspeed_bf16: what `precision: bf16` trains (DeepSpeed's bf16 engine: the whole module cast to bf16, inputs in
  bf16, fp32 master copy inside the optimizer);
- fp32_rounded (not in the default list): fp32 arithmetic on frozen weights rounded to bf16 values, a bf16-sized
  perturbation without bf16 arithmetic, to see how far such a perturbation alone moves the first steps' losses.

Prints per variant the samples/s over the timed steps (the first step of each is a warm-up and not timed) and the
loss at every step, with each bf16 loss's relative difference from the fp32 one: the computations agree when these
stay within a few bf16 roundings (2^-8 = 0.4% relative) of each other. The first line says what `precision: auto`
resolves to on this machine, and why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.training.config import load_config
from pipeline.training.dist import all_sum, init_distributed
from pipeline.training.ds_config import load_ds_config
from pipeline.training.loop import setup_stage
from pipeline.training.precision import mkldnn_bf16_supported, resolve_precision
from pipeline.training.presets import resolve_preset, run_prepare_steps

VARIANTS = ("fp32", "autocast", "deepspeed_bf16", "fp32_rounded")


def build(preset: str, variant: str, ctx, out: Path):
    """The preset's last stage as the trainer builds it, in `variant`'s precision."""
    overrides = [
        f"output_dir={out / variant}",
        f"precision={'bf16' if variant == 'deepspeed_bf16' else 'fp32'}",
        "eval.enabled=false",
        "log.progress_bar=false",
        "log.tensorboard=false",
    ]
    cfg = load_config(resolve_preset(preset, "configs", ".yaml"), overrides)
    cfg.stages = [cfg.stages[-1]]  # its max_steps kept: the first steps run the preset's warm-up of the lr
    cfg.stages[0].init_from = None  # PILL at init (no stage-1 export): the same start for every variant
    run_prepare_steps(cfg.prepare, True)
    st = setup_stage(cfg, 0, load_ds_config(resolve_preset("zero2", "ds_configs", ".json")), ctx, out / variant, None)
    if variant in ("autocast", "fp32_rounded"):
        for p in st.model.parameters():  # the frozen weights in bf16; the trainables stay the fp32 masters
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
                if variant == "fp32_rounded":  # the bf16 paths' frozen values, but fp32 arithmetic
                    p.data = p.data.float()
    st.engine.train()
    return st


def step(st, batch, ctx, autocast: bool) -> tuple[float, float]:
    """pipeline.training.loop.train_step's work for one micro-batch (grad_accum 1): (loss, seconds)."""
    t0 = time.perf_counter()
    counts = all_sum(st.loss.counts(batch), ctx.device)
    on_device = batch.to(ctx.device, st.float_dtype)
    amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with amp:
        out = st.engine(on_device)
        result = st.loss(st.model, out, on_device, counts, 1)
    loss = float(result.loss.detach().float())
    st.engine.backward(result.loss)
    st.engine.step()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return loss, time.perf_counter() - t0


def bf16_forward_loss(st, batch, ctx) -> float:
    """The loss of fp32 weights on `batch` with the forward under bf16 autocast (no grad, no step): how far bf16
    rounding alone moves the loss at these very weights, the noise against which the bf16 variants are judged."""
    counts = all_sum(st.loss.counts(batch), ctx.device)
    on_device = batch.to(ctx.device, torch.float32)
    with torch.no_grad(), torch.autocast(ctx.device.type, dtype=torch.bfloat16):
        return float(st.loss(st.model, st.model(on_device), on_device, counts, 1).loss.float())


def report(variants, losses, seconds, samples) -> dict:
    out = {}
    for v in variants:
        timed = seconds[v][1:] or seconds[v]
        out[v] = {
            "samples_per_s": round(sum(samples[1 : len(timed) + 1] or samples) / sum(timed), 3),
            "step_seconds": [round(s, 2) for s in seconds[v]],
            "loss": [round(x, 5) for x in losses[v]],
        }
        if v != "fp32" and "fp32" in losses:
            if "fp32_weights_bf16_forward" in losses:
                out[v]["bf16_noise_rel_diff"] = [  # the same bf16 rounding on the fp32 run's own weights
                    round(abs(a - b) / abs(b), 5) for a, b in zip(losses["fp32_weights_bf16_forward"], losses["fp32"])
                ]
            out[v]["loss_rel_diff_vs_fp32"] = [round(abs(a - b) / abs(b), 5) for a, b in zip(losses[v], losses["fp32"])]
            out[v]["speed_vs_fp32"] = round(out[v]["samples_per_s"] / out["fp32"]["samples_per_s"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo_smollm2", help="a preset name or YAML path (its last stage is used)")
    p.add_argument("--steps", type=int, default=3, help="micro-batches per variant; the first is a warm-up")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the 2-rank demo runs 1 per rank here)")
    p.add_argument("--variants", default=",".join(VARIANTS[:3]), help=f"comma-separated, of {','.join(VARIANTS)}")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    a = p.parse_args(argv)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    if bad := sorted(set(variants) - set(VARIANTS)):
        p.error(f"--variants: unknown {bad}; known: {','.join(VARIANTS)}")
    ctx = init_distributed()
    torch.set_num_threads(a.threads)
    resolved, why = resolve_precision(ctx.device, 576)
    print(
        f"precision auto -> {resolved} ({why}); mkldnn bf16: {mkldnn_bf16_supported()}; "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}; torch {torch.__version__}; {a.threads} thread(s)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="precision_probe_") as tmp:
        stages = {v: build(a.config, v, ctx, Path(tmp)) for v in variants}
        first = stages[variants[0]]
        it = first.data.checked_batches(ctx.device, 0, first.s)
        batches = [next(it) for _ in range(a.steps)]  # the same micro-batches for every variant
        losses = {v: [] for v in variants}
        seconds = {v: [] for v in variants}
        for i, batch in enumerate(batches):
            if "fp32" in variants and {"autocast", "deepspeed_bf16"} & set(variants):  # the weights fp32 starts from
                noise = bf16_forward_loss(stages["fp32"], batch, ctx)
                losses.setdefault("fp32_weights_bf16_forward", []).append(noise)
                print(f"step {i} fp32 weights, bf16 forward only: loss {noise:.5f}", flush=True)
            for v in variants:
                loss, sec = step(stages[v], batch, ctx, autocast=v == "autocast")
                losses[v].append(loss)
                seconds[v].append(sec)
                print(f"step {i} {v:>15}: loss {loss:.5f}  {sec:7.2f} s  ({batch.samples} samples)", flush=True)
        result = report(variants, losses, seconds, [b.samples for b in batches])
    result = {"auto": {"precision": resolved, "why": why}, "variants": result, "args": {**vars(a), "json": str(a.json)}}
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
