"""Host memory of loading and training a ~1B frozen Llama on CPU (issue 12, items 1 and 2): peak RSS per rank.

    python scripts/measure_loading.py [--work .cache/loading] [--steps 2] [--skip-zero3] [--json PATH]

1. builds a random Llama of 1.1B parameters (TinyLlama-1.1B's shape: d 2048, 22 layers, 32/4 heads, vocab 32000)
   in bf16 from the start and saves it as bf16 safetensors (once, into WORK/llm-1b);
2. baseline: pipeline/train.py on the same stage-2 config with the tiny LLM (imports, DeepSpeed, data loader,
   tiny models: everything but the big weights), 1 rank;
3. the 1B model, `precision: bf16`, ds_configs/zero2.json, 1 rank: its peak RSS against bf16 weight bytes + the
   baseline (the goal: at most 1.3 x weights + baseline);
4. the 1B model with ds_configs/zero3.json on 2 ranks (this host): each rank's peak RSS against the full weights.

Each rank is started here as a plain process with the torch.distributed environment. Its peak RSS is the kernel's
ru_maxrss from os.wait4; /proc/<pid>/status is also sampled every 20 ms for the peak of RssAnon (the process's
private memory) and RssFile (file pages mapped into it: the mmapped safetensors, which ranks on one host share
through the page cache, so RSS double-counts them across ranks). The config is configs/demo.yaml's stage 2 (demo
shards), micro-batch 1, no evaluation, no progress bar; each 1B run has a tiny-LLM baseline with the same DeepSpeed
config and world size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.model.tiny import build_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHAPE = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
)
MB = 2**20


def build_1b(out: Path) -> int:
    """The random 1.1B Llama in bf16 safetensors (built in bf16: no fp32 copy); returns the weight bytes."""

    if not (out / "config.json").is_file():
        build_tiny_tokenizer(out)
        tok = PreTrainedTokenizerFast.from_pretrained(str(out))
        config = LlamaConfig(
            **SHAPE,
            max_position_embeddings=2048,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=False,
            initializer_range=SHAPE["hidden_size"] ** -0.5,
        )
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(str(out))  # safetensors, bf16
        del model
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def write_config(path: Path, llm: str, steps: int, run_dir: Path) -> Path:
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would be resumed instead of trained
    d = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    st = dict(d["stages"][-1], max_steps=steps, micro_batch_size=1, grad_accum=1)
    st.pop("eval_shards", None)
    d.update(
        stages=[st],
        precision="bf16",
        output_dir=str(run_dir),
        eval={"enabled": False},
        checkpoint={"every_steps": 0, "keep_last": 1},
        log={"every_steps": 1, "progress_bar": False, "tensorboard": False},
    )
    d["model"] = dict(d["model"], llm_path=llm)
    d["data"] = dict(d["data"], num_workers=0)
    path.write_text(yaml.safe_dump(d))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_mb(pid: int) -> dict[str, float]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            out[key] = int(val.split()[0]) / 1024
    return out


def run_ranks(config: Path, ds_config: str, world: int, log_dir: Path) -> list[dict]:
    """Start `world` ranks of pipeline/train.py; per rank: exit code, ru_maxrss and the sampled Rss* peaks (MiB)."""
    port = str(free_port())
    procs = []
    t0 = time.time()
    for rank in range(world):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            DS_ACCELERATOR="cpu",
            CUDA_VISIBLE_DEVICES="",
            OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // world)),
            PYTHONUNBUFFERED="1",
        )
        log = open(log_dir / f"{config.stem}-rank{rank}.log", "w")
        procs.append(
            subprocess.Popen(
                [sys.executable, "pipeline/train.py", "--ds_config", ds_config, "--config", str(config)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    peaks = [{"RssAnon": 0.0, "RssFile": 0.0, "RssShmem": 0.0} for _ in procs]
    out: list[dict | None] = [None] * world
    while any(r is None for r in out):
        for rank, p in enumerate(procs):
            if out[rank] is not None:
                continue
            for k, v in _status_mb(p.pid).items():
                peaks[rank][k] = max(peaks[rank][k], v)
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                p.returncode = os.waitstatus_to_exitcode(status)
                out[rank] = {
                    "rank": rank,
                    "exit_code": p.returncode,
                    "peak_rss_mb": usage.ru_maxrss / 1024,
                    **{f"peak_{k}_mb": v for k, v in peaks[rank].items()},
                    "seconds": round(time.time() - t0, 1),
                }
        time.sleep(0.02)
    for r in out:
        if r["exit_code"] != 0:
            tail = (log_dir / f"{config.stem}-rank{r['rank']}.log").read_text()[-3000:]
            raise SystemExit(f"{config.stem} rank {r['rank']} exited {r['exit_code']}:\n{tail}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "loading")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--skip-zero3", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))

    weights = build_1b(work / "llm-1b")
    print(f"1.1B Llama: {weights / MB:.0f} MiB of bf16 safetensors in {work / 'llm-1b'}", flush=True)
    report: dict = {"weights_mb": weights / MB, "shape": SHAPE, "steps": args.steps, "runs": {}}
    setups = [("zero2", "ds_configs/zero2.json", 1)]
    if not args.skip_zero3:
        setups.append(("zero3", "ds_configs/zero3.json", 2))
    for name, ds, world in setups:
        for llm in ("tiny", str(work / "llm-1b")):
            tag = f"{name}-{world}rank-{'1b' if llm != 'tiny' else 'baseline'}"
            ranks = run_ranks(write_config(work / f"{tag}.yaml", llm, args.steps, work / f"run-{tag}"), ds, world, work)
            report["runs"][tag] = ranks
            for r in ranks:
                print(
                    f"{tag:24s} rank {r['rank']}: peak RSS {r['peak_rss_mb']:6.0f} MiB (sampled peaks: anon "
                    f"{r['peak_RssAnon_mb']:6.0f}, file {r['peak_RssFile_mb']:6.0f}) in {r['seconds']:.0f} s",
                    flush=True,
                )
        base = max(r["peak_rss_mb"] for r in report["runs"][f"{name}-{world}rank-baseline"])
        for r in report["runs"][f"{name}-{world}rank-1b"]:
            extra = r["peak_rss_mb"] - base
            print(
                f"  {name} x {world}: rank {r['rank']} peak RSS = baseline {base:.0f} + {extra:.0f} MiB = baseline + "
                f"{extra / (weights / MB):.2f} x the bf16 weights ({weights / MB:.0f} MiB)",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
