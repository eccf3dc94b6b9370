"""`make compare`: PILL and its peers trained like for like on the embedded demo data, one table.

    python scripts/compare.py                                  # every method (about 15 min on a 2-core CPU)
    python scripts/compare.py --methods lavin iaa --steps-scale 0.25

Each method runs the real trainer (`deepspeed pipeline/train.py`, 2 ranks, ZeRO-2, fp32 on CPU) on the same demo
shards, prompts and held-out questions as `make train` (configs/demo.yaml), with its own stage schedule (one stage
for LLaMA-Adapter, LaVIN and Excitor; two for PILL and IAA) and its own learning rate, then the trainer's held-out
evaluation of the export with and without images. Results: runs/compare/compare.md and compare.json, one row per
method: accuracy with images, with the images removed, chance, trainable parameters (tiny shape and LLaMA-2-7B
shape), training samples/s, peak memory (max RSS of one rank), wall time (launch, training and evaluation).

The steps are chosen so the whole comparison fits in 15 minutes here, not so each method converges: the table is
"what each method learns from the same small budget", and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml
from transformers import LlamaConfig

from pipeline.model import get_method
from pipeline.model.clip import tiny_clip_config
from pipeline.params import PRESETS, meta_method

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "runs" / "compare"

# name: (model section overrides, [(stage, task, steps, lr)]). PILL's two stages are the demo's, shortened; the
# peers' learning rates follow their papers' ordering (LLaMA-Adapter and LaVIN train at a base lr of 9e-3,
# Excitor's prompts likewise; IAA trains full layers, so a much smaller lr) scaled to the demo's batch of 16.
METHODS: dict[str, tuple[dict, list[tuple[int, str, int, float]]]] = {
    "pill": (
        {
            "method": "pill",
            "vpg_path": "tiny",
            "options": {"rank": 16, "attn_backend": "auto", "adapter_backend": "auto"},
        },
        [(1, "caption", 60, 1.0e-2), (2, "scienceqa", 600, 3.0e-3)],
    ),
    "llama_adapter": (
        {"method": "llama_adapter", "vpg_path": "tiny", "options": {"attn_backend": "sdpa"}},
        [(2, "scienceqa", 600, 2.0e-2)],
    ),
    "lavin": (
        {"method": "lavin", "vpg_path": "tiny", "options": {"attn_backend": "sdpa"}},
        [(2, "scienceqa", 600, 1.0e-2)],
    ),
    "excitor": (
        {"method": "excitor", "vpg_path": "tiny", "options": {"attn_backend": "sdpa"}},
        [(2, "scienceqa", 600, 3.0e-2)],
    ),
    "iaa": (
        {"method": "iaa", "vpg_path": "tiny", "options": {"attn_backend": "sdpa"}},
        [(1, "caption", 60, 1.0e-3), (2, "scienceqa", 600, 3.0e-4)],
    ),
}


def method_config(name: str, steps_scale: float) -> dict:
    """configs/demo.yaml with the method's model section and stage schedule, its shards under runs/compare/."""
    text = (REPO / "pipeline" / "configs" / "demo.yaml").read_text()
    # Own copy of the demo shards: .cache/demo_shards is shared with anything else running `make train`.
    d = yaml.safe_load(text.replace(".cache/demo_shards", str(OUT / "demo_shards")))
    model, stages = METHODS[name]
    d["name"] = f"compare-{name}"
    d["output_dir"] = str(OUT / name)
    d["model"] = {"llm_path": "tiny", **model}
    template = {s["stage"]: s for s in d["stages"]}
    d["stages"] = []
    for stage, task, steps, lr in stages:
        st = dict(
            template[2 if task == "scienceqa" else 1],
            stage=stage,
            task=task,
            max_steps=max(1, int(steps * steps_scale)),
            lr=lr,
        )
        if task != "scienceqa":
            st.pop("eval_shards", None)
        d["stages"].append(st)
    # IAA puts 49 patch tokens per image into the prompt (the others 1-8): 224 tokens keep every demo answer.
    d["data"]["max_length"] = 224
    d["log"] = {"every_steps": 50, "progress_bar": False, "tensorboard": False}
    d["checkpoint"] = {"every_steps": 10_000, "keep_last": 1}
    return d


def trainable_counts(name: str) -> dict[str, int]:
    """(tiny shape, LLaMA-2-7B shape) trainable parameters of the method's last stage, on the meta device."""
    counts = {}
    for preset in ("tiny", "llama2-7b"):
        llm_config = LlamaConfig(**PRESETS[preset])
        clip = _clip_kwargs(tiny_clip_config().to_dict()) if preset == "tiny" else None
        overrides = {"stage": 2}
        if get_method(name).front_end == "blip2":
            overrides.update(rank=16 if preset == "tiny" else 32, vpg_width=64 if preset == "tiny" else 768)
        model = meta_method(name, llm_config, overrides, clip_preset=clip)
        counts[preset] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return counts


def _clip_kwargs(d: dict | None) -> dict | None:
    if d is None:
        return None
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "projection_dim",
    )
    return {k: d[k] for k in keys}


def run_method(name: str, steps_scale: float, nprocs: int) -> dict:
    run_dir = OUT / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run every time (no resume, no stale results)
    run_dir.mkdir(parents=True)
    cfg_path = run_dir / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(method_config(name, steps_scale), sort_keys=False))
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(nprocs),
        "pipeline/train.py",
        "--ds_config",
        "ds_configs/zero2.json",
        "--config",
        str(cfg_path),
        "--resume",
        "never",
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu"),
        "PILL_TINY_DIR": str(OUT / "tiny"),
    }  # the same tiny LLM/VPG/CLIP recipe, built once for the comparison
    # One wrapper per method: RUSAGE_CHILDREN's max RSS then covers this method's ranks only.
    wrapper = (
        "import json, resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(json.dumps({'rc': rc, 'maxrss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
    )
    t0 = time.time()
    with open(run_dir / "train.out", "w") as log:
        proc = subprocess.run(
            [sys.executable, "-c", wrapper, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    wall = time.time() - t0
    lines = proc.stdout.strip().splitlines()
    (run_dir / "train.out").open("a").write(proc.stdout)
    usage = json.loads(lines[-1]) if lines else {"rc": proc.returncode, "maxrss_kb": 0}
    row = {"method": name, "rc": usage["rc"], "wall_s": round(wall, 1), "peak_rss_mb": round(usage["maxrss_kb"] / 1024)}
    if usage["rc"] == 0:
        row.update(eval_fields(run_dir))
    results = sorted(run_dir.glob("**/result.json"))
    if results:
        r = json.loads(results[-1].read_text())  # the last stage (the one that is evaluated)
        row.update(samples_per_s=round(r["samples_per_s"], 1), steps=r.get("steps"), final_loss=r.get("final_loss"))
    return row


def eval_fields(run_dir: Path) -> dict:
    """The held-out numbers of one method's eval.json (empty when it has none)."""
    ev = run_dir / "eval.json"
    if not ev.is_file():
        return {}
    e = json.loads(ev.read_text())
    w, wo = e["with_image"], e["without_image"]
    return dict(
        accuracy=e["accuracy"],
        accuracy_no_image=e["accuracy_no_image"],
        chance=e["chance"],
        n=e["n"],
        unparsed=w["unparsed"],
        unparsed_no_image=wo["unparsed"],
        accuracy_color=w["categories"]["qtype:color"]["accuracy"],
        accuracy_shape=w["categories"]["qtype:shape"]["accuracy"],
        accuracy_random_fallback=w["accuracy_random_fallback"],
        accuracy_no_image_random_fallback=wo["accuracy_random_fallback"],
    )


def markdown(rows: list[dict]) -> str:
    head = (
        "| method | acc. with images (colour / shape) | acc. images removed (random fallback) | chance "
        "| trainable (tiny) | trainable (LLaMA-2-7B) | samples/s | peak RSS / rank | wall |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    out = []
    for r in rows:
        acc = (
            (
                f"{r['accuracy']:.1f}% ({r['accuracy_color']:.0f} / {r['accuracy_shape']:.0f})",
                f"{r['accuracy_no_image']:.1f}% ({r['accuracy_no_image_random_fallback']:.1f}%), "
                f"{r['unparsed_no_image']} unparsed",
                f"{r['chance']:.1f}%",
            )
            if "accuracy" in r
            else (f"failed (rc {r['rc']})", "-", "-")
        )
        out.append(
            f"| {r['method']} | {acc[0]} | {acc[1]} | {acc[2]} | {r['trainable_tiny']:,} | "
            f"{r['trainable_7b']:,} | {r.get('samples_per_s', '-')} | {r['peak_rss_mb']} MB | "
            f"{r['wall_s']:.0f} s |"
        )
    return (
        head + "\n".join(out) + '\n\nAccuracy: greedy generation, then the first "The answer is X" (the '
        "ScienceQA "
        "protocol, n held-out questions); an unparsed answer counts as wrong, the random fallback replaces it by "
        "a random option.\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every stage's steps (quick checks)")
    ap.add_argument("--nprocs", type=int, default=2)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite compare.md/json from the runs already in runs/compare (no training)",
    )
    args = ap.parse_args(argv)
    if args.report_only:
        return report_only()
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows = []
    for name in args.methods:
        print(f"[compare] {name} ...", flush=True)
        row = run_method(name, args.steps_scale, args.nprocs)
        counts = trainable_counts(name)
        row.update(trainable_tiny=counts["tiny"], trainable_7b=counts["llama2-7b"])
        rows.append(row)
        print(f"[compare] {json.dumps(row)}", flush=True)
    write_report(rows, time.time() - t0, args.nprocs, args.steps_scale)
    return 0 if all(r["rc"] == 0 for r in rows) else 1


def report_only() -> int:
    old = json.loads((OUT / "compare.json").read_text())
    for row in old["rows"]:
        row.update(eval_fields(OUT / row["method"]))
    write_report(old["rows"], old["total_wall_s"], old.get("nprocs", 2), old["steps_scale"])
    return 0


def write_report(rows: list[dict], total: float, nprocs: int, steps_scale: float) -> None:
    md = (
        f"# make compare: PILL and its peers on the demo data\n\nCommand: `make compare` (scripts/compare.py), "
        f"{nprocs} DeepSpeed ranks, ZeRO-2, fp32, CPU; total wall time {total / 60:.1f} min.\n\n" + markdown(rows)
    )
    (OUT / "compare.md").write_text(md)
    (OUT / "compare.json").write_text(
        json.dumps(
            {"total_wall_s": round(total, 1), "rows": rows, "nprocs": nprocs, "steps_scale": steps_scale}, indent=2
        )
    )
    print(md)


if __name__ == "__main__":
    raise SystemExit(main())
