"""One training stage under DeepSpeed: set-up (model, data, engine) -> resume -> optimizer steps -> save/export.

The loss of an optimizer step is the mean over every answer token of the global batch (all micro-batches of
all ranks), as transformers' `num_items_in_batch` and torchtitan do: the method's forward gives hidden states,
pipeline.training.loss turns them into each micro-batch's summed token loss divided by the global count, scaled so
that DeepSpeed's 1/grad_accum and its mean over ranks cancel. A sample's weight does not depend on the answer
lengths of the others in its micro-batch.

A skipped non-finite micro-batch calls neither backward nor step on ANY rank (all agree), and the next batch
takes its place, so DeepSpeed's micro-step count and ours stay equal; every collective below is reached by all
ranks in the same order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from transformers import AutoConfig
from transformers.integrations import HfDeepSpeedConfig

from pipeline.model import get_method, load_method, resolve_source
from pipeline.model.batch import Batch
from pipeline.training.activation_checkpointing import apply_activation_checkpointing
from pipeline.training.checkpoint import CheckpointManager, export_adapter, gather_consolidated, set_rng_state
from pipeline.training.config import StageConfig, TrainConfig
from pipeline.training.data_glue import StageData
from pipeline.training.dist import DistContext, Preempted, PreemptionFlag, all_agree_any, all_sum
from pipeline.training.ds_config import fill_ds_config, peak_lr, plan_batch, uses_cpu_offload
from pipeline.training.loss import Loss, training_loss
from pipeline.training.metrics import MetricsLogger, StepSums
from pipeline.training.optim import (
    base_lr,
    build_optimizer,
    build_scheduler,
    check_lr_scale,
    describe_lrs,
    lr_by_group,
    param_groups,
)
from pipeline.training.retention_probe import RetentionProbe
from pipeline.training.sources import source_counts, source_scalars


@dataclass
class StageResult:
    stage: int
    steps: int
    samples: int
    tokens: int
    wall_seconds: float
    samples_per_s: float
    final_loss: float
    skipped_nonfinite: int
    checkpoint: str
    export_dir: str
    resumed_from: str | None
    llm_path: str = ""
    vpg_path: str | None = None
    """The frozen models this stage trained on, so the evaluation loads exactly those."""

    def summary(self) -> str:
        return (
            f"stage {self.stage}: {self.steps} steps, {self.samples} samples, {self.wall_seconds:.1f}s wall, "
            f"{self.samples_per_s:.2f} samples/s, final loss {self.final_loss:.4f}, "
            f"{self.skipped_nonfinite} non-finite micro-batches skipped\n"
            f"  checkpoint: {self.checkpoint}\n  export:     {self.export_dir}"
            + (f"\n  resumed from: {self.resumed_from}" if self.resumed_from else "")
        )


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    """What a checkpoint restores besides the engine and the data position."""

    global_step: int = 0
    samples: int = 0
    tokens: int = 0
    skipped_nonfinite: int = 0
    wall_seconds: float = 0.0
    last_loss: float = float("nan")


# ---- set-up -------------------------------------------------------------------------------------------------------


def model_dtype(cfg: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if cfg.precision == "bf16" else torch.float32


def method_config(cfg: TrainConfig, stage: int) -> Any:
    """The method's config for one stage (model.options, with that stage)."""
    return replace(cfg.model.method_config(), stage=stage)


def build_model(cfg: TrainConfig, stage: int, device: torch.device | None = None):
    """The method on the frozen LLM/front end, frozen weights in the training precision, placed on `device`."""
    torch.manual_seed(cfg.seed)  # identical fresh init on every rank (ZeRO-2 also broadcasts, ZeRO-3 does not)
    model = load_method(
        cfg.model.method,
        cfg.model.llm_path,
        cfg.model.vpg_path,
        method_config(cfg, stage),
        dtype=model_dtype(cfg),
        device=device,
    )
    if cfg.model.activation_checkpointing:
        apply_activation_checkpointing(model, cfg.model.checkpoint_every_n_layers)
    return model


def build_tiny_sources_once(cfg: TrainConfig, is_main: bool) -> None:
    """Named sources ("tiny", "smollm2", a .gguf file) are materialised by global rank 0 while the others wait
    (no two ranks write the same files)."""
    if is_main:
        resolve_source(cfg.model.llm_path, "llm")
        resolve_source(cfg.model.vpg_path, "vpg")
    if dist.is_initialized():
        dist.barrier()


def llm_hidden_size(cfg: TrainConfig) -> int:
    return AutoConfig.from_pretrained(str(resolve_source(cfg.model.llm_path, "llm")), local_files_only=True).hidden_size


@dataclass
class Stage:
    """Everything one stage trains with, built by `setup_stage`."""

    cfg: TrainConfig
    s: StageConfig
    model: Any
    engine: Any
    scheduler: Any
    data: StageData
    plan: Any
    total_steps: int
    lr: float
    warmup: int
    float_dtype: torch.dtype
    trainables: list
    ckpts: CheckpointManager
    keep_alive: list = field(default_factory=list)
    """Objects that must outlive the engine set-up (transformers' ZeRO-3 config, read through a weak reference)."""
    loss: Loss = field(default_factory=Loss)
    """The training loss's terms (pipeline.training.loss)."""


def setup_stage(
    cfg: TrainConfig, idx: int, raw_ds: dict[str, Any], ctx: DistContext, stage_dir: Path, init_from: str | None
) -> Stage:
    s = cfg.stages[idx]
    at = f"stages[{idx}]"
    build_tiny_sources_once(cfg, ctx.is_main)
    plan = plan_batch(s, ctx.world_size, at)
    ds = fill_ds_config(raw_ds, cfg, s, plan, ctx.device, llm_hidden_size(cfg))
    keep_alive = []
    if ds.get("zero_optimization", {}).get("stage") == 3:
        # transformers' from_pretrained then builds the frozen LLM inside deepspeed.zero.Init: each rank only ever
        # holds its partition (the weak reference it keeps must stay alive until the model is loaded).
        keep_alive.append(HfDeepSpeedConfig(ds))
        fixed_mmap_threshold()
    model = build_model(cfg, s.stage, None if keep_alive else ctx.device)
    if init_from:
        model.load_adapter(init_from)
    trainables = model.trainable_parameters()
    data = StageData(
        cfg, s, model.tokenizer, model.cfg.num_query_tokens, ctx, plan.micro_batch_size, plan.global_batch_size
    )
    total_steps = s.max_steps if s.max_steps is not None else data.steps_for_epochs(s.epochs, plan.grad_accum)
    lr = peak_lr(s, plan)
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * total_steps)
    groups = param_groups(trainables, cfg.optim, get_method(cfg.model.method).row_of, check_lr_scale(cfg))
    optimizer = build_optimizer(groups, lr, cfg.optim, uses_cpu_offload(ds))
    scheduler = build_scheduler(optimizer, total_steps, warmup, s.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    float_dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32
    return Stage(
        cfg,
        s,
        model,
        engine,
        scheduler,
        data,
        plan,
        total_steps,
        lr,
        warmup,
        float_dtype,
        trainables,
        CheckpointManager(stage_dir / "checkpoints", cfg.checkpoint.keep_last),
        keep_alive,
        training_loss(cfg.loss.text_kl.weight, cfg.loss.text_kl.where),
    )


def fixed_mmap_threshold(nbytes: int = 128 * 1024) -> None:
    """Return freed gathered weights to the OS (glibc only; a no-op elsewhere).

    ZeRO-3 gathers each layer's weights for its forward/backward and frees them after. glibc raises its mmap
    threshold (up to 32 MB) after large frees, so later layer-sized buffers come from the heap and their memory is
    never returned: measured on CPU with a 1.1B Llama on 2 ranks, each rank's private memory grew to 4.4 GB (twice
    the whole model) instead of staying at its 1.05 GB partition + ~0.3 GB; with the threshold fixed, 1.6 GB."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(-3, nbytes)  # M_MMAP_THRESHOLD; setting it also turns glibc's dynamic adjustment off
    except (OSError, AttributeError):
        pass


def param_count(params) -> int:
    """True element counts, also under ZeRO-3 (a partitioned parameter's numel() is 0; ds_numel is the full one)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)


# ---- one optimizer step -------------------------------------------------------------------------------------------


class NonFiniteGuard:
    """Counts micro-batches, and non-finite losses in a row; stops before the weights are corrupted."""

    def __init__(self, cfg: TrainConfig, idx: int, ctx: DistContext, state: TrainState, log: MetricsLogger):
        self.cfg, self.idx, self.ctx, self.state, self.log = cfg, idx, ctx, state, log
        self.in_a_row = 0
        self.last_ckpt: Path | None = None

    def skip(self, loss_value: float) -> bool:
        """Collective: True (on every rank) when any rank's loss is non-finite."""
        if not all_agree_any(not math.isfinite(loss_value), self.ctx.device):
            self.in_a_row = 0
            return False
        self.state.skipped_nonfinite += 1
        self.in_a_row += 1
        self.log.info(
            f"step {self.state.global_step}: non-finite loss, micro-batch skipped ({self.in_a_row} in a "
            f"row, {self.state.skipped_nonfinite} in total)"
        )
        if self.in_a_row >= self.cfg.optim.max_nonfinite_in_a_row:
            raise NonFiniteLossError(
                f"{self.in_a_row} non-finite losses in a row at step {self.state.global_step}: stopping before the "
                f"weights are corrupted. Lower the lr (stages[{self.idx}].lr / base_lr), check the data "
                f"(data.max_length, labels), or resume from {self.last_ckpt}"
            )
        return True


def train_step(st: Stage, batches: Iterator[Batch], ctx: DistContext, guard: NonFiniteGuard, sums: StepSums) -> float:
    """grad_accum micro-batches -> one optimizer step (DeepSpeed steps at the last engine.step()); what the log
    reports is added to `sums` (pipeline.training.metrics). Returns the lr this step used."""
    ga = st.plan.grad_accum
    group = [next(batches) for _ in range(ga)]
    # Every loss term's count over the global batch, from the host copies: one all-reduce per step, no device sync.
    global_counts = all_sum([sum(col) for col in zip(*(st.loss.counts(b) for b in group))], ctx.device)
    # the lr this step uses (the scheduler steps after it), before any optim.lr_scale factor
    lr = base_lr(st.scheduler.optimizer, st.scheduler.get_last_lr())
    done = 0
    while done < ga:
        batch = group.pop(0) if group else next(batches)  # a skipped micro-batch is replaced by the next one
        on_device = batch.to(ctx.device, st.float_dtype)  # bf16: DeepSpeed casts the module, inputs follow
        out = st.engine(on_device)
        result = st.loss(st.model, out, on_device, global_counts, ctx.world_size * ga)
        loss_value = float(result.loss.detach().float())  # the one host sync of a micro-step
        if guard.skip(loss_value):
            continue
        st.engine.backward(result.loss)
        st.engine.step()
        done += 1
        sums.add("loss", loss_value)
        if len(result.parts) > 1:
            for name, part in result.parts.items():
                sums.add(f"loss/{name}", part)
        sums.add("samples", batch.samples)
        sums.add("tokens", int(batch.attention_mask.sum()))
        sums.add("positions", batch.attention_mask.numel())
        if st.data.n_sources > 1:  # a mixed stage: samples, answer tokens and answer CE per source
            sums.add("source_counts", source_counts(batch, st.data.n_sources))
            sums.add("source_ce", result.by_source)
    if out.gate_abs is not None:
        sums.add("gate_abs", out.gate_abs)  # the step's last micro-batch
    sums.steps += 1
    return lr


# ---- the stage ----------------------------------------------------------------------------------------------------


def run_stage(
    cfg: TrainConfig,
    idx: int,
    raw_ds: dict[str, Any],
    ctx: DistContext,
    stage_dir: Path,
    init_from: str | None,
    preempt: PreemptionFlag,
    resume: str,
) -> StageResult:
    """Train stage `idx` of `cfg` to its last step, checkpointing, and export its trainables.

    Builds the engine (`setup_stage`), resumes from `resume` (auto: the newest complete checkpoint in
    `stage_dir`; never; or a checkpoint path) with the data position and RNG of every rank, then runs
    `train_step` until `total_steps`. Raises Preempted after writing a checkpoint when any rank got a stop
    signal, NonFiniteLossError when the guard gives up. The returned result names the export directory.
    """
    st = setup_stage(cfg, idx, raw_ds, ctx, stage_dir, init_from)
    st.loss.n_sources = st.data.n_sources  # a mixed stage: the answer CE per source too (LossResult.by_source)
    state, resumed = _restore(st, resume)
    if ctx.is_main:  # rows logged after the resumed step (or by an attempt that never checkpointed) are stale
        _truncate_metrics(stage_dir / "metrics.jsonl", state.global_step)
    log = MetricsLogger(
        stage_dir,
        ctx.is_main,
        cfg.log.tensorboard,
        cfg.log.progress_bar,
        st.total_steps,
        state.global_step,
        desc=f"stage {st.s.stage}",
        wandb=_wandb_options(cfg, stage_dir),
    )
    _log_start(st, ctx, log, resumed[2] if resumed else None, state)

    def save() -> Path:
        client = {"train_state": asdict(state), "data": st.data.state_dict_global(), "global_step": state.global_step}
        return st.ckpts.save(st.engine, st.trainables, state.global_step, client, {"data": st.data.state_dict_rank()})

    guard = NonFiniteGuard(cfg, idx, ctx, state, log)
    guard.last_ckpt = st.ckpts.latest()
    sums = StepSums()
    st.engine.train()
    t_stage = time.time() - state.wall_seconds
    batches = st.data.checked_batches(ctx.device, idx, st.s)  # no optimizer step on a stage with no usable sample
    probe = _retention_probe(st, log, state, sums)
    while state.global_step < st.total_steps:
        lr = train_step(st, batches, ctx, guard, sums)
        state.global_step += 1
        step = state.global_step
        checkpoint_now = cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < st.total_steps
        retention = _probe_now(probe, st, step, sums)
        # A checkpoint step is a log step too: the train state it saves is settled, and a resumed run logs the same
        # rows as an uninterrupted one. A retention step is one so that its row carries the loss beside it.
        if step % cfg.log.every_steps == 0 or step == st.total_steps or checkpoint_now or retention:
            _log_step(st, log, state, lr, sums, ctx, retention)
        else:
            log.progress(step, state.last_loss, lr, None)
        state.wall_seconds = time.time() - t_stage
        if checkpoint_now:
            guard.last_ckpt = save()
            log.info(f"step {step}: checkpoint {guard.last_ckpt}")
        if all_agree_any(preempt.raised, ctx.device):
            if sums.steps:
                _log_step(st, log, state, lr, sums, ctx)
            guard.last_ckpt = save()
            log.info(
                f"signal {preempt.signum}: checkpoint {guard.last_ckpt} written at step {step}; exiting 99 "
                "(resumable: rerun with the same --output-dir)"
            )
            log.close()
            raise Preempted(str(guard.last_ckpt))
    return _finish(st, ctx, log, state, save, guard.last_ckpt, stage_dir, t_stage, resumed)


def _restore(st: Stage, resume: str) -> tuple[TrainState, tuple | None]:
    """The train state to start from: fresh, or a checkpoint's (with its data position and this rank's RNG)."""
    resumed = st.ckpts.resume(resume, st.engine, st.trainables)
    if resumed is None:
        return TrainState(), None
    client, per_rank, _ = resumed
    state = TrainState(**client["train_state"])
    st.data.load_state_dict(client["data"], per_rank["data"] if per_rank else None, state.samples)
    if per_rank:
        set_rng_state(per_rank["rng"])
    _lr_at_restored_step(st.scheduler)
    return state, resumed


def _log_start(st: Stage, ctx: DistContext, log: MetricsLogger, resumed_from: str | None, state: TrainState) -> None:
    p = st.plan
    log.info(
        f"stage {st.s.stage} ({st.cfg.model.method}): {len(st.trainables)} trainable tensors, "
        f"{param_count(p for _, p in st.trainables):,} trainable params of "
        f"{param_count(st.model.parameters()):,}; world {ctx.world_size}, micro-batch {p.micro_batch_size} x "
        f"accum {p.grad_accum} x {ctx.world_size} ranks = {p.global_batch_size}/step, {st.total_steps} steps, "
        f"peak lr {st.lr:.3e}, warmup {st.warmup}, ZeRO-{st.engine.zero_optimization_stage()}, "
        f"{'bf16' if st.float_dtype == torch.bfloat16 else 'fp32'}, backends {_backends(st.model, ctx.device)}"
        f"{', activation checkpointing' if st.cfg.model.activation_checkpointing else ''}"
    )
    if lrs := describe_lrs(st.scheduler.optimizer):
        log.info(lrs)
    if resumed_from:
        log.info(f"resumed at step {state.global_step} from {resumed_from}")


def _backends(model: Any, device: torch.device) -> str:
    """attention/adapter backends as the first step will run them ("built-in" for a method without the choice)."""
    resolve = getattr(model, "resolve_backends", None)
    return "/".join(resolve(device)) if resolve is not None else "built-in"


def _retention_probe(st: Stage, log: MetricsLogger, state: TrainState, sums: StepSums) -> RetentionProbe | None:
    """eval.retention_every's probe (pipeline.training.retention_probe), and its step-0 row on a fresh stage."""
    e = st.cfg.eval
    if not e.retention_every:
        return None
    probe = RetentionProbe(st.model, e.retention_prompts, e.retention_max_new_tokens, st.cfg.data.prompt_format)
    if state.global_step == 0:
        log.log(0, probe.measure(st.model))
        sums.t0 = time.time()  # the probe's time is not training time
    return probe


def _probe_now(probe: RetentionProbe | None, st: Stage, step: int, sums: StepSums) -> dict[str, float]:
    """The probe's figures at a retention step (every rank runs it: ZeRO-3 gathers), else {}."""
    if probe is None or step % st.cfg.eval.retention_every:
        return {}
    t0 = time.time()
    figures = probe.measure(st.model)
    sums.t0 += time.time() - t0  # samples/s counts training time only
    return figures


def _log_step(
    st: Stage,
    log: MetricsLogger,
    state: TrainState,
    lr: float,
    sums: StepSums,
    ctx: DistContext,
    extra: dict[str, float] | None = None,
) -> None:
    """One log line from every rank's sums since the last one (one all-reduce); settles the train state's totals.
    `extra`: figures every rank already has (the retention probe's), logged as they are."""
    g = sums.reduce(ctx.device)
    micro_batches = ctx.world_size * st.plan.grad_accum * sums.steps
    state.last_loss = g["loss"] / micro_batches  # the global token mean of one step (the steps' mean over several)
    state.samples += int(g["samples"])
    state.tokens += int(g["tokens"])
    dt = sums.seconds()
    grad_norm = st.engine.get_global_grad_norm()
    scalars = {
        "loss": state.last_loss,
        # a term's part is added as a 0-d tensor (no host sync per micro-step): StepSums returns it as a 1-list
        **{k: (sum(v) if isinstance(v, list) else v) / micro_batches for k, v in g.items() if k.startswith("loss/")},
        "lr": lr,
        **lr_by_group(st.scheduler.optimizer, lr),
        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "samples_per_s": g["samples"] / dt,
        "tokens_per_s": g["tokens"] / dt,
        "pad_frac": 1.0 - g["tokens"] / max(1, g["positions"]),
        "samples": state.samples,
        "skipped_nonfinite": state.skipped_nonfinite,
        **st.data.skip_counters(ctx.device),
        **source_scalars(_source_sums(g), st.data.source_names, st.data.source_progress()),
        **(extra or {}),
    }
    gates = [v / (ctx.world_size * sums.steps) for v in g["gate_abs"]] if "gate_abs" in g else None
    log.log(state.global_step, scalars, gates)
    log.progress(state.global_step, state.last_loss, lr, scalars["samples_per_s"])
    sums.reset()


def _source_sums(g: dict[str, Any]) -> list[float] | None:
    """The all-reduced per-source sums of a mixed stage (source_counts then source_ce), None for one source."""
    return g["source_counts"] + g["source_ce"] if "source_counts" in g else None


def _finish(
    st: Stage,
    ctx: DistContext,
    log: MetricsLogger,
    state: TrainState,
    save,
    last_ckpt: Path | None,
    stage_dir: Path,
    t_stage: float,
    resumed,
) -> StageResult:
    """Final checkpoint (unless the last step has one), export of the trained weights, result.json."""
    if state.global_step and (last_ckpt is None or not last_ckpt.name.endswith(f"{state.global_step:08d}")):
        last_ckpt = save()
    full = gather_consolidated(st.engine, st.trainables)  # collective
    export_dir = stage_dir / "export"
    if ctx.is_main:
        export_adapter(st.model, full["params"], export_dir)
    if dist.is_initialized():
        dist.barrier()
    wall = time.time() - t_stage
    result = StageResult(
        stage=st.s.stage,
        steps=state.global_step,
        samples=state.samples,
        tokens=state.tokens,
        wall_seconds=wall,
        samples_per_s=state.samples / max(1e-9, wall),
        final_loss=state.last_loss,
        skipped_nonfinite=state.skipped_nonfinite,
        checkpoint=str(last_ckpt),
        export_dir=str(export_dir),
        resumed_from=resumed[2] if resumed else None,
        llm_path=st.cfg.model.llm_path,
        vpg_path=st.cfg.model.vpg_path,
    )
    if ctx.is_main:
        (stage_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
    log.info(result.summary())
    log.close()
    st.engine.destroy() if hasattr(st.engine, "destroy") else None
    st.keep_alive.clear()  # later model loads (evaluation on rank 0) must not be partitioned collectively
    return result


def _lr_at_restored_step(scheduler) -> None:
    """Set the param groups' lr from the schedule at the restored step, through the scheduler's public step().

    The checkpoint restores the scheduler's step count; recomputing from the schedule gives the same lr when
    nothing changed and the right one when the resumed run has a new length (--set stages.0.max_steps=...)."""
    scheduler.last_epoch -= 1
    with warnings.catch_warnings():  # "step() before optimizer.step()": intended, no optimizer step is skipped
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


def _wandb_options(cfg: TrainConfig, stage_dir: Path) -> dict[str, Any] | None:
    if not cfg.log.wandb:
        return None
    return {
        "project": cfg.log.wandb_project,
        "name": f"{cfg.name}-{stage_dir.name}",
        "dir": str(stage_dir),
        "config": cfg.to_dict(),
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop rows logged after the checkpoint so metrics.jsonl reads as one loss curve."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
