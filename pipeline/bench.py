"""End-to-end PILL stage-2 training steps under the real DeepSpeed engine: ``python -m pipeline.bench``.

Each point is forward + backward + optimizer step of `engine` (DeepSpeed ZeRO-2 from ds_configs/zero2.json, bf16
on a GPU) on a PILL around a random Llama built directly on the device in the training dtype (LLaMA-2-7B / 13B,
Llama-3-8B shapes from pipeline.params.PRESETS; no download, never an fp32 copy), fed precomputed Q-former features
(or, with --vpg blip2, pixels through a random BLIP-2-sized ViT-g + Q-former). Every sample has one image (K = 32
visual tokens after BOS) and an answer over its last 30% of tokens (the loss positions).

The sweep is micro-batch x sequence length x checkpointing x backends; in the same run the reference formulation
(adapter_backend eager = both FFN experts on every token, attn_backend eager = a materialised T x T mask and
scores, no checkpointing, as the authors' code) at the headline shape and the speed-up over it; then packed vs
padded batches on a realistic length mix (lognormal, median 220 tokens, clipped to [48, seq]). Figures per point:
samples/s, real tokens/s, MFU, the allocator's peak (torch.cuda.max_memory_allocated) and pipeline.memory's
prediction beside it. Results are printed as a table and written as JSON (--json).

MFU = useful FLOPs per step / (step time x the GPU's dense bf16 peak), useful FLOPs =
    4 n P_mm              frozen linears: forward 2 n P_mm, backward to the activations only another 2 n P_mm (no
                          weight gradients for frozen layers); P_mm = the decoder layers' linear weights
  + 4 m d V               the LM head at the m answer positions, forward + activation gradient
  + 6 (n A + n_vis W d)   trainable adapters (each token's own expert only) + gate, and the projection P on visual
                          tokens: forward 2, backward 4 (input and weight gradients); A = adapter weights per token
  + 7 L d sum_doc T^2     causal attention: forward 2 matmuls x 2 T^2 d / 2 = 2 T^2 d, backward 2.5x the forward
Without CUDA it runs the tiny preset in fp32 on CPU (the code path, not the figures) and says so.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import deepspeed
import torch
import transformers
from transformers import Blip2Config, LlamaConfig, LlamaForCausalLM

from pipeline.memory import GB, MemorySetup, ParamCounts, ds_bucket, estimate
from pipeline.model.adapters import ADAPTER_BACKENDS
from pipeline.model.attention import ATTENTION_BACKENDS
from pipeline.model.batch import Batch
from pipeline.model.config import PILLConfig
from pipeline.model.pill import PILL
from pipeline.model.vpg import VPG
from pipeline.params import PRESETS
from pipeline.training.activation_checkpointing import apply_activation_checkpointing
from pipeline.training.config import OptimConfig
from pipeline.training.dist import init_distributed
from pipeline.training.loss import answer_loss
from pipeline.training.optim import build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[1]
K, W = 32, 768  # visual tokens per image, Q-former width (BLIP-2)
ANSWER_FRACTION = 0.3
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.1, "A6000": 154.8}
NO_CUDA = (
    "No CUDA device: the tiny preset in fp32 on CPU, to exercise the code path; the GPU figures (7B "
    "samples/s, MFU, peak memory) need a GPU"
)
HEADLINE = (4, 512)


@dataclass(frozen=True)
class Point:
    preset: str
    micro_batch: int
    seq: int
    checkpointing: bool
    attn: str
    adapter: str
    layout: str = "full"
    """full = every row seq real tokens; padded / packed = the length mix (see module docstring)."""
    role: str = "sweep"

    def label(self) -> str:
        ck = "ckpt" if self.checkpointing else "no-ckpt"
        return f"{self.preset} {self.micro_batch}x{self.seq} {ck} {self.attn}+{self.adapter} {self.layout}"


# ---- model and engine ------------------------------------------------------------------------------------------------


def build_pill(preset: str, device: torch.device, dtype: torch.dtype, vpg: str):
    """PILL (stage 2) on a random Llama of the preset's shape, allocated on `device` in `dtype` from the start."""

    llm_config = LlamaConfig(**PRESETS[preset], max_position_embeddings=8192)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            llm = LlamaForCausalLM(llm_config)
            vision = VPG(Blip2Config(num_query_tokens=K)) if vpg == "blip2" else None
            model = PILL(llm, PILLConfig(stage=2, vpg_width=W, num_query_tokens=K), vision)
    finally:
        torch.set_default_dtype(previous)
    return model.train()


def set_backends(model, attn: str, adapter: str) -> None:
    model.backends = (attn, adapter)
    for block in model.blocks:
        block.attn_backend, block.adapter_backend = attn, adapter


def ds_config(micro_batch: int, bf16: bool) -> dict[str, Any]:
    """The shipped ZeRO-2 JSON with its "auto" fields filled as pipeline.training.ds_config does (accumulation 1)."""
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds.update(
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=1,
        train_batch_size=micro_batch,
        gradient_clipping=1.0,
        bf16={"enabled": bf16},
    )
    return ds


def build_engine(model, micro_batch: int, bf16: bool):
    optim = OptimConfig()
    opt = build_optimizer(param_groups(model.trainable_parameters(), optim), 1e-4, optim, cpu_offload=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(micro_batch, bf16))
    return engine


# ---- batches -------------------------------------------------------------------------------------------------------


def length_mix(n: int, seq: int, seed: int = 0) -> list[int]:
    """Sample lengths of a ScienceQA/LLaVA-like instruction set: lognormal, median 220, clipped to [48, seq]."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 0.5 + math.log(220))
    return [int(x) for x in raw.clamp(48, seq).round()]


def _sample(length: int, vocab: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (length,), generator=g)
    mm = torch.zeros(length, dtype=torch.bool)
    mm[1 : 1 + K] = True
    labels = torch.full((length,), -100)
    start = max(1 + K, length - max(1, int(ANSWER_FRACTION * length)))
    labels[start:] = ids[start:]
    return ids, mm, labels


@dataclass(frozen=True)
class BenchBatch:
    batch: Batch
    docs: list[int]
    """Tokens of each sample (the attention FLOPs are per document)."""


def padded_batches(lengths: list[int], micro_batch: int, vocab: int) -> list[BenchBatch]:
    """Rows of `micro_batch` samples right-padded to the longest in the batch (a multiple of 8)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(0, len(lengths) - micro_batch + 1, micro_batch):
        chunk = lengths[i : i + micro_batch]
        T = -(-max(chunk) // 8) * 8
        ids = torch.zeros(micro_batch, T, dtype=torch.long)
        mm = torch.zeros(micro_batch, T, dtype=torch.bool)
        labels = torch.full((micro_batch, T), -100)
        att = torch.zeros(micro_batch, T, dtype=torch.long)
        for r, n in enumerate(chunk):
            ids[r, :n], mm[r, :n], labels[r, :n] = _sample(n, vocab, g)
            att[r, :n] = 1
        out.append(BenchBatch(Batch(ids, att, mm, labels, num_samples=micro_batch), chunk))
    return out


def packed_batches(lengths: list[int], capacity: int, vocab: int) -> list[BenchBatch]:
    """One row per batch holding whole samples up to `capacity` tokens, with cu_seqlens and per-sample positions."""
    g = torch.Generator().manual_seed(1)
    out, row = [], []
    for n in lengths + [capacity + 1]:  # the sentinel flushes the last row
        if row and (sum(row) + n > capacity):
            parts = [_sample(m, vocab, g) for m in row]
            cu = torch.tensor([0] + list(torch.tensor(row).cumsum(0)), dtype=torch.int32)
            batch = Batch(
                input_ids=torch.cat([p[0] for p in parts])[None],
                modality_mask=torch.cat([p[1] for p in parts])[None],
                labels=torch.cat([p[2] for p in parts])[None],
                position_ids=torch.cat([torch.arange(m) for m in row])[None],
                cu_seqlens=cu,
                max_seqlen=max(row),
                num_samples=len(row),
            )
            out.append(BenchBatch(batch, list(row)))
            row = []
        if n <= capacity:
            row.append(n)
    return out


def full_batch(micro_batch: int, seq: int, vocab: int) -> BenchBatch:
    g = torch.Generator().manual_seed(2)
    parts = [_sample(seq, vocab, g) for _ in range(micro_batch)]
    batch = Batch(
        input_ids=torch.stack([p[0] for p in parts]),
        modality_mask=torch.stack([p[1] for p in parts]),
        labels=torch.stack([p[2] for p in parts]),
        num_samples=micro_batch,
    )
    return BenchBatch(batch, [seq] * micro_batch)


def to_model_inputs(bb: BenchBatch, device: torch.device, dtype: torch.dtype, vpg: str) -> Batch:
    """The batch on `device` with one random image per sample (pixels for the BLIP-2 ViT, else Q-former features)."""
    n_img = bb.batch.samples
    g = torch.Generator(device=device).manual_seed(3)
    if vpg == "blip2":
        images = {"pixel_values": torch.randn(n_img, 3, 224, 224, device=device, generator=g).to(dtype)}
    else:
        images = {"image_features": torch.randn(n_img, K, W, device=device, generator=g).to(dtype)}
    return bb.batch.to(device).replace(**images)


# ---- FLOPs and memory ----------------------------------------------------------------------------------------------


def useful_flops(llm_config, cfg, bb: BenchBatch) -> float:
    """Per training step, by the formula in the module docstring."""
    c = llm_config
    d, F, L, V, H = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size, c.num_attention_heads
    dkv = c.num_key_value_heads * (d // H)
    batch = bb.batch
    n = int(batch.input_ids.numel()) if batch.cu_seqlens is not None else sum(bb.docs)
    m = batch.answer_tokens()
    n_vis = int(batch.modality_mask.sum())
    p_mm = L * (d * (d + 2 * dkv) + d * d + 3 * d * F)
    per_adapter = 3 * d * cfg.rank if cfg.adapter_act == "swiglu" else 2 * d * cfg.rank
    adapters = L * ((per_adapter if cfg.attn_adapter else 0) + per_adapter + (d * H if cfg.mag else 0))
    attention = 7 * L * d * sum(t * t for t in bb.docs)
    return 4 * n * p_mm + 4 * m * d * V + 6 * (n * adapters + n_vis * W * d) + attention


def predicted_peak(llm_config, cfg, counts, p: Point, bb: BenchBatch, bf16: bool) -> float:
    bucket, overlap = ds_bucket(REPO / "ds_configs" / "zero2.json")
    B, T = bb.batch.input_ids.shape
    s = MemorySetup(
        micro_batch=B,
        seq=T,
        precision="bf16" if bf16 else "fp32",
        zero_stage=2,
        world=1,
        checkpointing=p.checkpointing,
        attn_backend=p.attn,
        adapter_backend=p.adapter,
        loss_positions=int((bb.batch.labels != -100).sum()),
        reduce_bucket_size=bucket,
        overlap_comm=overlap,
    )
    return estimate(llm_config, cfg, counts, s).peak


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


# ---- one point -----------------------------------------------------------------------------------------------------


def run_point(
    engine, model, p: Point, batches: list[BenchBatch], device, dtype, vpg: str, warmup: int, steps: int
) -> dict[str, Any]:
    set_backends(model, p.attn, p.adapter)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    inputs = [to_model_inputs(b, device, dtype, vpg) for b in batches]

    def step(i: int) -> float:
        batch = inputs[i % len(inputs)]
        loss = answer_loss(model, batch, engine(batch))  # the trainer's loss (pipeline.training.loss)
        engine.backward(loss)
        engine.step()
        return loss.detach()

    for i in range(warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    loss = float(loss)  # the host sync
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    used = [batches[(warmup + i) % len(batches)] for i in range(steps)]
    samples = sum(b.batch.samples for b in used) / steps
    tokens = sum(sum(b.docs) for b in used) / steps
    return {
        "step_s": dt,
        "samples_per_s": samples / dt,
        "tokens_per_s": tokens / dt,
        "loss": loss,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
    }


# ---- the sweep -----------------------------------------------------------------------------------------------------


def plan(args, on_gpu: bool) -> list[Point]:
    pts = []
    for preset in args.presets:
        for ck in args.checkpointing:
            for backends in args.backends:
                attn, adapter = backends.split("+")
                for mb in args.micro_batch:
                    for seq in args.seq:
                        pts.append(Point(preset, mb, seq, ck, attn, adapter))
        if args.reference:
            mb, seq = (args.micro_batch[0], args.seq[0]) if not on_gpu else HEADLINE
            pts.append(Point(preset, mb, seq, False, "eager", "eager", role="reference"))
        if args.packing:
            attn, adapter = args.backends[0].split("+")
            mb, seq = (args.micro_batch[0], args.seq[-1])
            for layout in ("padded", "packed"):
                pts.append(Point(preset, mb, seq, False, attn, adapter, layout=layout, role="packing"))
    return pts


def batches_for(p: Point, vocab: int, n_batches: int) -> list[BenchBatch]:
    if p.layout == "full":
        return [full_batch(p.micro_batch, p.seq, vocab)]
    lengths = length_mix(p.micro_batch * n_batches * 2, p.seq)
    if p.layout == "padded":
        return padded_batches(lengths, p.micro_batch, vocab)[:n_batches]
    return packed_batches(lengths, p.micro_batch * p.seq, vocab)[:n_batches]


def run(args) -> dict[str, Any]:
    ctx = init_distributed()
    device = ctx.device
    on_gpu = device.type == "cuda"
    bf16 = on_gpu
    dtype = torch.bfloat16 if bf16 else torch.float32
    if not on_gpu:
        print(NO_CUDA, flush=True)
    peak = peak_tflops(device, args.peak_tflops)
    pts = plan(args, on_gpu)
    results = []
    for preset in args.presets:
        model = build_pill(preset, device, dtype, args.vpg)
        counts = ParamCounts.of(model)
        engine = build_engine(model, args.micro_batch[0], bf16)
        llm_config, cfg = model.llm.config, model.cfg
        mine = sorted((p for p in pts if p.preset == preset), key=lambda p: p.checkpointing)  # ckpt ones last
        for p in mine:
            if p.checkpointing and not getattr(model.blocks[0], "_pill_checkpointed", False):
                apply_activation_checkpointing(model, every_n_layers=1)
            batches = batches_for(p, llm_config.vocab_size, args.steps + args.warmup)
            row = {**dataclasses.asdict(p), "label": p.label()}
            try:
                row.update(run_point(engine, model, p, batches, device, dtype, args.vpg, args.warmup, args.steps))
            except torch.cuda.OutOfMemoryError as e:  # a point too large for this GPU is a result, not a crash
                row.update(error=f"out of memory: {str(e).splitlines()[0]}")
                engine.optimizer.zero_grad()
                gc.collect()
                torch.cuda.empty_cache()
            flops = useful_flops(llm_config, cfg, batches[0])
            row["useful_tflop_per_step"] = flops / 1e12
            if "step_s" in row and peak:
                row["mfu"] = flops / row["step_s"] / (peak * 1e12)
            row["predicted_peak_gb"] = predicted_peak(llm_config, cfg, counts, p, batches[0], bf16) / GB
            if row.get("peak_bytes") is not None:
                row["peak_gb"] = row.pop("peak_bytes") / GB
            results.append(row)
            print(format_row(row), flush=True)
        del engine, model
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({platform.processor() or 'x86'})",
        "gpu": on_gpu,
        "dtype": str(dtype).replace("torch.", ""),
        "peak_bf16_tflops": peak,
        "versions": versions(),
        "command": " ".join(["python -m pipeline.bench", *sys.argv[1:]]),
        "results": results,
        "ratios": ratios(results),
        "note": None if on_gpu else NO_CUDA,
        "mfu_formula": MFU_FORMULA,
    }


MFU_FORMULA = (
    "MFU = [4 n P_mm + 4 m d V + 6 (n A + n_vis W d) + 7 L d sum_doc T^2] / (step time x dense bf16 peak); "
    "n tokens, m answer tokens, P_mm decoder linear weights, A adapter+gate weights per token (own "
    "expert only)"
)


def ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Speed-up of each sweep point at the reference's shape over the reference formulation."""
    out = []
    for ref in (r for r in results if r["role"] == "reference" and "samples_per_s" in r):
        for r in results:
            if (
                r["role"] == "sweep"
                and "samples_per_s" in r
                and r["preset"] == ref["preset"]
                and (r["micro_batch"], r["seq"]) == (ref["micro_batch"], ref["seq"])
            ):
                out.append(
                    {
                        "point": r["label"],
                        "reference": ref["label"],
                        "speedup": r["samples_per_s"] / ref["samples_per_s"],
                    }
                )
    packed = {r["layout"]: r for r in results if r["role"] == "packing" and "samples_per_s" in r}
    if {"packed", "padded"} <= set(packed):
        out.append(
            {
                "point": packed["packed"]["label"],
                "reference": packed["padded"]["label"],
                "speedup": packed["packed"]["samples_per_s"] / packed["padded"]["samples_per_s"],
            }
        )
    return out


def versions() -> dict[str, str]:
    v = {
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def format_row(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['label']:48s} {r['error']}"
    mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") is not None else "  n/a"
    peak = f"{r['peak_gb']:6.2f}" if r.get("peak_gb") is not None else "   n/a"
    return (
        f"{r['label']:48s} {r['samples_per_s']:9.2f} samples/s {r['tokens_per_s']:10.0f} tok/s  MFU {mfu}  "
        f"peak {peak} GB (predicted {r['predicted_peak_gb']:6.2f})"
    )


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"device: {report['device']}, {report['dtype']}; `{report['command']}`",
        "",
        "| point | role | samples/s | tokens/s | MFU | peak GB | predicted GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['role']} | {r['error']} | | | | {r['predicted_peak_gb']:.2f} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        peak = f"{r['peak_gb']:.2f}" if r.get("peak_gb") is not None else "n/a"
        lines.append(
            f"| {r['label']} | {r['role']} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {mfu} | "
            f"{peak} | {r['predicted_peak_gb']:.2f} |"
        )
    lines += ["", "| point | over | speed-up |", "|---|---|---|"]
    lines += [f"| {x['point']} | {x['reference']} | {x['speedup']:.2f}x |" for x in report["ratios"]]
    lines += ["", report["mfu_formula"]]
    if report["note"]:
        lines += ["", report["note"]]
    return "\n".join(lines) + "\n"


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x]


GPU_DEFAULTS = dict(
    presets=["llama2-7b"],
    micro_batch=[1, 4, 8],
    seq=[512, 1024],
    checkpointing=[False, True],
    backends=["triton+triton", "sdpa+eager"],
    warmup=3,
    steps=10,
)
CPU_DEFAULTS = dict(
    presets=["tiny"], micro_batch=[2], seq=[64], checkpointing=[False, True], backends=["sdpa+eager"], warmup=2, steps=3
)


def parse_args(argv: list[str] | None, on_gpu: bool) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", type=_csv(str), default=None, help="comma list (default llama2-7b; CPU: tiny)")
    ap.add_argument("--micro-batch", type=_csv(int), default=None, help="comma list (default 1,4,8; CPU: 2)")
    ap.add_argument("--seq", type=_csv(int), default=None, help="comma list (default 512,1024; CPU: 64)")
    ap.add_argument(
        "--checkpointing",
        type=_csv(lambda s: s in ("1", "on", "true")),
        default=None,
        help="comma list of on/off (default off,on)",
    )
    ap.add_argument(
        "--backends",
        type=_csv(str),
        default=None,
        help="comma list of ATTN+ADAPTER (default triton+triton,sdpa+eager; CPU: sdpa+eager)",
    )
    ap.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the reference formulation (eager attention + eager adapter, no checkpointing)",
    )
    ap.add_argument("--no-packing", dest="packing", action="store_false", help="skip packed vs padded")
    ap.add_argument("--vpg", choices=("features", "blip2"), default="features")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per point (default 3; CPU: 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per point (default 10; CPU: 3)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (default: by name)")
    ap.add_argument("--json", type=Path, default=None, help="write the report here (and a .md beside it)")
    a = ap.parse_args(argv)
    for k, v in (GPU_DEFAULTS if on_gpu else CPU_DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for b in a.backends:
        attn, _, adapter = b.partition("+")
        if attn not in ATTENTION_BACKENDS or adapter not in ADAPTER_BACKENDS:
            ap.error(
                f"--backends {b}: want ATTN+ADAPTER with ATTN in {'|'.join(ATTENTION_BACKENDS)}, ADAPTER in "
                f"{'|'.join(ADAPTER_BACKENDS)}"
            )
    bad = [p for p in a.presets if p not in PRESETS]
    if bad:
        ap.error(f"--presets: unknown {bad}; known {sorted(PRESETS)}")
    return a


def main(argv: list[str] | None = None) -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = parse_args(argv, on_gpu)
    report = run(args)
    print("\n" + report["mfu_formula"])
    for x in report["ratios"]:
        print(f"{x['point']} over {x['reference']}: {x['speedup']:.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        args.json.with_suffix(".md").write_text(markdown(report))
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
