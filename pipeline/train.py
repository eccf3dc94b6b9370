"""PILL training entry point (DeepSpeed).

    deepspeed --num_gpus N pipeline/train.py --ds_config ds_configs/zero2.json [--config FILE.yaml|PRESET]
        [--set key=value ...] [--output-dir DIR] [--resume auto|never|PATH]
    python -m pipeline.launch --num_gpus N pipeline/train.py ...   (the same, and SIGTERM to it -> exit 99)
    pill-train ...      (the console script; a world of one unless started by a launcher)

Also runs under `torchrun` and `srun` (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT) and as a plain
`python -m pipeline.train` (a world of one). With no --config it runs the embedded default, the `demo` preset
(pipeline/configs/demo.yaml, shipped as package data): its prepare step builds the synthetic demo shards, then the
tiny PILL trains stage 1 then stage 2, then the held-out multiple-choice evaluation with and without images is
printed and written to <output_dir>/eval.json. `--config NAME` without a path picks a shipped preset.

Exit codes: 0 done, 2 configuration error (before any process spends time), 3 non-finite losses,
99 preempted by SIGTERM/SIGUSR1 after writing a checkpoint (rerun the same command to resume). The `deepspeed`
command itself dies of SIGTERM with 143 (its ranks still checkpoint); pipeline.launch returns the ranks' 99.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

# Install the preemption handlers before anything slow is imported (torch, deepspeed: seconds): Slurm may send
# its warning signal while a task is still starting, and the default action of SIGUSR1/SIGTERM kills the process
# with no checkpoint and no requeue. PreemptionFlag takes these over once it is installed.
_EARLY_SIGNALS: list[int] = []
for _sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(_sig, lambda signum, frame: _EARLY_SIGNALS.append(signum))

if __name__ == "__main__" and os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
    # The imports below and the model set-up take from seconds to a minute and a half before the first log line:
    # say at once that the run has started (rank 0 only, on stderr: stdout stays the run's own output).
    print(
        f"pipeline/train.py: starting ({' '.join(sys.argv[1:]) or 'the embedded demo'}); loading torch and DeepSpeed",
        file=sys.stderr,
        flush=True,
    )

import torch  # noqa: E402

from pipeline.data.prompts import prompt_format_problem  # noqa: E402
from pipeline.data.shardlists import check_exists, expand_shards  # noqa: E402
from pipeline.model.frozen import check_llm, is_materialised_source  # noqa: E402
from pipeline.model.gguf import read_gguf_config, smollm2_gguf  # noqa: E402
from pipeline.training.config import (  # noqa: E402
    ConfigError,
    TrainConfig,
    describe_config,
    load_config_with_sources,
)
from pipeline.training.dist import (  # noqa: E402
    EXIT_PREEMPTED,
    DistContext,
    Preempted,
    PreemptionFlag,
    init_distributed,
)
from pipeline.training.ds_config import fill_ds_config, load_ds_config, plan_batch  # noqa: E402
from pipeline.training.evaluate import evaluate_export  # noqa: E402
from pipeline.training.loop import NonFiniteLossError, StageResult, run_stage  # noqa: E402
from pipeline.training.optim import check_lr_scale  # noqa: E402
from pipeline.training.precision import agree_across_ranks, resolve_precision  # noqa: E402
from pipeline.training.presets import resolve_preset, run_prepare_steps  # noqa: E402
from pipeline.training.run_record import check_rerun, write_record  # noqa: E402

DEFAULT_PRESET = "demo"
EXIT_CONFIG, EXIT_NONFINITE = 2, 3


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline/train.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ds_config",
        "--ds-config",
        "--deepspeed_config",
        "--deepspeed",
        dest="ds_config",
        default=None,
        help="DeepSpeed JSON (a path or a shipped name: zero1, zero2, zero3, zero2_offload; "
        'default zero2); "auto" fields are filled from the training config',
    )
    p.add_argument(
        "--config",
        default=None,
        help=f"YAML file or shipped preset name (configs/*.yaml); default: the embedded {DEFAULT_PRESET}",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set stages.0.max_steps=100 or --set stages.*.lr=1e-3",
    )
    p.add_argument("--output-dir", "--output_dir", default=None, help="run directory (default: output_dir)")
    p.add_argument(
        "--resume", default=None, help="auto (default: continue from the run dir), never, or a checkpoint directory"
    )
    p.add_argument(
        "--resume-changed",
        action="store_true",
        help="continue a run dir although the config differs from its config.json in data, task, routing, lr, ...; "
        "the changes are recorded in <output_dir>/config_history.jsonl (shape or method changes stay refused)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every field of the resolved config with its "
        "value and where it came from (default, --config, --set), then exit",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    preset = resolve_preset(args.config or DEFAULT_PRESET, "configs", ".yaml")
    cfg, sources = load_config_with_sources(preset, args.overrides)
    if args.output_dir:
        cfg.output_dir, sources["output_dir"] = args.output_dir, "--output-dir"
    if args.resume:
        cfg.checkpoint.resume, sources["checkpoint.resume"] = args.resume, "--resume"
    if args.print_config:
        print(describe_config(cfg, sources))
    return cfg


def resolve_auto_precision(cfg: TrainConfig, rank: int) -> None:
    """`precision: auto` -> bf16 | fp32 for this machine, before anything reads it; rank 0 logs the choice and why.
    The probe's width is the LLM's hidden size when its config.json is at hand (it matters only on CPUs with native
    bf16, where a short matmul is measured)."""
    if cfg.precision != "auto":
        return
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    llm_config = Path(str(cfg.model.llm_path)) / "config.json"
    width = json.loads(llm_config.read_text()).get("hidden_size", 1024) if llm_config.is_file() else 1024
    cfg.precision, why = resolve_precision(device, width)
    if rank == 0:
        print(f"precision auto -> {cfg.precision} ({why})", flush=True)


def validate_before_launch(cfg: TrainConfig, raw_ds: dict, world_size: int) -> None:
    """Everything that can be checked without a model: batch arithmetic and the DeepSpeed combination."""

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    for i, s in enumerate(cfg.stages):
        fill_ds_config(raw_ds, cfg, s, plan_batch(s, world_size, f"stages[{i}]"), device)
    check_paths(cfg)
    check_lr_scale(cfg)  # optim.lr_scale names groups of the method (built on the meta device)


def check_llm_source(llm_path: str, max_length: int) -> None:
    """model.llm_path names something loadable: a checkpoint dir with a config.json, "tiny", "smollm2" (its package
    installed) or a .gguf file transformers can read. Only metadata is read; nothing is converted here."""
    try:
        if str(llm_path) == "smollm2":
            smollm2_gguf()
        elif str(llm_path).endswith(".gguf"):
            check_llm(read_gguf_config(Path(llm_path)), source=f"model.llm_path={llm_path}")
    except (OSError, ValueError, ImportError) as e:
        raise ConfigError(f"model.llm_path={llm_path!r}: {e}") from e
    if is_materialised_source(llm_path):
        return
    llm_config = Path(llm_path) / "config.json"
    if not llm_config.is_file():
        raise ConfigError(
            f"model.llm_path={llm_path!r}: no config.json there (give a local transformers checkpoint directory "
            "of a Llama-family LLM, a .gguf file, or smollm2)"
        )
    check_sliding_window(json.loads(llm_config.read_text()), max_length, str(llm_config))


def check_paths(cfg: TrainConfig) -> None:
    """Local inputs that do not exist fail here, naming the field, before any process group or model load."""

    m = cfg.model
    check_llm_source(m.llm_path, cfg.data.max_length)
    if m.vpg_path not in (None, "tiny") and not Path(m.vpg_path).is_dir():
        raise ConfigError(
            f"model.vpg_path={m.vpg_path!r} does not exist (a transformers BLIP-2 / CLIP directory; "
            "null to train on precomputed-feature shards)"
        )
    if not is_materialised_source(m.llm_path) and (
        problem := prompt_format_problem(cfg.data.prompt_format, m.llm_path)  # from the tokenizer's files
    ):
        raise ConfigError(problem)
    prepared = [Path(p.creates).resolve() for p in cfg.prepare if p.creates]
    for i, s in enumerate(cfg.stages):
        if s.init_from is not None and not (Path(s.init_from) / "adapter_model.safetensors").is_file():
            raise ConfigError(f"stages[{i}].init_from={s.init_from!r}: no adapter_model.safetensors there")
        for field_name in ("train_shards", "eval_shards"):
            for spec in getattr(s, field_name):
                if any(Path(spec).resolve().is_relative_to(d) for d in prepared):
                    continue  # written by a prepare step before training
                try:
                    check_exists(expand_shards(spec), f"stages[{i}].{field_name}")
                except FileNotFoundError as e:
                    raise ConfigError(f"stages[{i}].{field_name}: {e}") from e
        for j, src in enumerate(s.sources):
            for spec in src.shards:
                if any(Path(spec).resolve().is_relative_to(d) for d in prepared):
                    continue
                try:
                    check_exists(expand_shards(spec), f"stages.{i}.sources.{j}.shards")
                except (FileNotFoundError, ValueError) as e:
                    raise ConfigError(f"stages.{i}.sources.{j}.shards: {e}") from e


def stage_dirs(cfg: TrainConfig) -> list[Path]:
    """A single-stage job writes into the run dir itself; a multi-stage run uses run_dir/stage{N}/."""
    out = Path(cfg.output_dir)
    if len(cfg.stages) == 1:
        return [out]
    names = [f"stage{s.stage}" for s in cfg.stages]
    return [out / (n if names.count(n) == 1 else f"{n}_{i}") for i, n in enumerate(names)]


def check_sliding_window(llm_config: dict, max_length: int, source: str) -> None:
    """Mistral's sliding window: PILL's attention is full causal, which equals the frozen model's only while a
    sequence fits the window, so longer data.max_length is refused rather than silently computing another model."""
    window = llm_config.get("sliding_window")
    if window is not None and llm_config.get("use_sliding_window", True) and window < max_length:
        raise ConfigError(
            f"{source}: sliding_window={window} < data.max_length={max_length}: PILL's attention "
            f"backends are full causal, so beyond {window} tokens they would differ from the frozen "
            f"model; set data.max_length <= {window}"
        )


def configure(args: argparse.Namespace) -> tuple[TrainConfig, dict, dict | None] | int:
    """The resolved config and DeepSpeed config, checked, and the rerun's accepted config changes (run_record); or
    the exit code (--print-config, a config error)."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    try:
        cfg = resolve_config(args)
        if args.print_config:
            return 0
        raw_ds = load_ds_config(resolve_preset(args.ds_config or "zero2", "ds_configs", ".json"))
        resolve_auto_precision(cfg, rank)  # before the checks and the rerun comparison read it
        validate_before_launch(cfg, raw_ds, int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1))))
        history = check_rerun(cfg, stage_dirs(cfg), args.resume_changed)  # before any process starts
    except ConfigError as e:
        if rank == 0:
            print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    return cfg, raw_ds, history


def run_stages(cfg: TrainConfig, raw_ds: dict, ctx: DistContext, preempt: PreemptionFlag) -> list[StageResult]:
    """Each stage in order, each starting from the previous stage's export (or its own `init_from`)."""
    results: list[StageResult] = []
    init_from = None
    for i, (s, sdir) in enumerate(zip(cfg.stages, stage_dirs(cfg))):
        done = sdir / "result.json"
        if len(cfg.stages) > 1 and done.is_file() and cfg.checkpoint.resume == "auto":
            # A finished earlier stage of a multi-stage run is not repeated after a restart.
            results.append(StageResult(**json.loads(done.read_text())))
        else:
            results.append(
                run_stage(cfg, i, raw_ds, ctx, sdir, s.init_from or init_from, preempt, cfg.checkpoint.resume)
            )
        init_from = results[-1].export_dir
    return results


def train_and_evaluate(
    cfg: TrainConfig, raw_ds: dict, ctx: DistContext, preempt: PreemptionFlag, history: dict | None = None
) -> None:
    t0 = time.time()
    run_prepare_steps(cfg.prepare, ctx.is_main)
    if ctx.is_main:
        write_record(cfg, history)  # config.json once, by the first run; a rerun's accepted changes
    results = run_stages(cfg, raw_ds, ctx, preempt)
    eval_result = None
    if cfg.eval.enabled and cfg.stages[-1].eval_shards:
        last = results[-1]
        eval_result = evaluate_export(cfg, last.export_dir, ctx, last.llm_path, last.vpg_path)
    if ctx.is_main:
        write_summary(cfg, results, eval_result, time.time() - t0)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configured = configure(args)
    if isinstance(configured, int):
        return configured
    cfg, raw_ds, history = configured
    ctx = init_distributed(args.local_rank)
    agreed = agree_across_ranks(cfg.precision, ctx.device)  # `auto` measured on each rank: one answer for all
    if agreed != cfg.precision and ctx.is_main:
        print(f"precision {cfg.precision} -> {agreed}: another rank resolved fp32", flush=True)
    cfg.precision = agreed
    preempt = PreemptionFlag().install()
    preempt.watch_launcher()  # `deepspeed` does not forward SIGTERM: its end is this rank's stop request
    if _EARLY_SIGNALS:
        preempt.signum = _EARLY_SIGNALS[0]
    preempted = False
    try:
        train_and_evaluate(cfg, raw_ds, ctx, preempt, history)
        return 0
    except Preempted:
        preempted = True
        return EXIT_PREEMPTED
    except NonFiniteLossError as e:
        if ctx.is_main:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except ConfigError as e:
        if ctx.is_main:
            print(f"config error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        if preempted:
            # The checkpoint is written and every rank is leaving with 99. srun (--kill-on-bad-exit) sends SIGTERM
            # to the ranks still shutting down once the first has exited; with the default action their exit
            # would turn into 143 and the job would not requeue. So the stop signals stay ignored until exit.
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
        else:
            preempt.uninstall()


def write_summary(cfg: TrainConfig, results: list, eval_result: dict | None, wall: float) -> None:
    lines = [f"run {cfg.name}: {len(results)} stage(s) in {wall:.1f}s, output {cfg.output_dir}"]
    lines += [r.summary() for r in results]
    if eval_result is not None:
        lines.append(
            f"held-out accuracy {eval_result['accuracy']:.3f} with images, "
            f"{eval_result['accuracy_no_image']:.3f} with images removed, chance {eval_result['chance']:.3f} "
            f"(n={eval_result['n']}); {Path(cfg.output_dir) / 'eval.json'}"
        )
    text = "\n".join(lines)
    (Path(cfg.output_dir) / "summary.txt").write_text(text + "\n")
    print("\n" + "=" * 80 + "\n" + text + "\n" + "=" * 80, flush=True)


if __name__ == "__main__":
    sys.exit(main())
