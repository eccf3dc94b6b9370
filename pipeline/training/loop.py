"""One training stage under DeepSpeed, top to bottom: model -> optimizer -> engine -> resume -> steps -> save.

Accumulation: DeepSpeed counts micro-steps and applies the optimizer every `grad_accum` calls of engine.step();
we keep our own count in lockstep (a skipped non-finite micro-batch calls neither backward nor step on ANY
rank, so both counts stay equal everywhere). Every collective below is reached by all ranks in the same order.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.training.checkpoint import CheckpointManager, export_adapter, gather_consolidated, set_rng_state
from pipeline.training.config import ConfigError, StageConfig, TrainConfig
from pipeline.training.data_glue import StageData
from pipeline.training.dist import DistContext, Preempted, PreemptionFlag, all_agree_any, all_mean, all_sum
from pipeline.training.ds_config import fill_ds_config, peak_lr, plan_batch, uses_cpu_offload
from pipeline.training.metrics import MetricsLogger
from pipeline.training.optim import build_optimizer, build_scheduler, param_groups

MODEL_KEYS = ("input_ids", "attention_mask", "labels", "modality_mask", "pixel_values", "image_features",
              "position_ids", "cu_seqlens")


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
    """The frozen models this stage trained on (resolved paths), so the evaluation loads exactly those."""

    def summary(self) -> str:
        return (f"stage {self.stage}: {self.steps} steps, {self.samples} samples, {self.wall_seconds:.1f}s wall, "
                f"{self.samples_per_s:.2f} samples/s, final loss {self.final_loss:.4f}, "
                f"{self.skipped_nonfinite} non-finite micro-batches skipped\n"
                f"  checkpoint: {self.checkpoint}\n  export:     {self.export_dir}"
                + (f"\n  resumed from: {self.resumed_from}" if self.resumed_from else ""))


class NonFiniteLossError(RuntimeError):
    pass


# ---- model --------------------------------------------------------------------------------------------------------

def resolve_model_paths(cfg: TrainConfig, is_main: bool, collective: bool = True) -> tuple[str, str | None]:
    """"tiny" -> build the tiny LLM/VPG once (global rank 0 builds, the others wait, then read the cache)."""
    m = cfg.model
    llm, vpg = m.llm_path, m.vpg_path
    if "tiny" in (llm, vpg):
        from pipeline.model.tiny import build_tiny_pill_dirs

        if is_main:
            dirs = build_tiny_pill_dirs(m.tiny_dir, **m.tiny_llm)
        if collective and dist.is_initialized():
            dist.barrier()
        if not is_main:
            dirs = build_tiny_pill_dirs(m.tiny_dir, **m.tiny_llm)
        llm = str(dirs["llm"]) if llm == "tiny" else llm
        vpg = str(dirs["vpg"]) if vpg == "tiny" else vpg
    return llm, vpg


def build_model(cfg: TrainConfig, stage: int, llm_path: str, vpg_path: str | None):
    """PILL on the frozen LLM/VPG; K and the Q-former width come from the VPG when one is loaded."""
    from pipeline.model import PILL, PILLConfig, load_llm, load_vpg

    llm, tok = load_llm(llm_path, torch.float32)
    vpg = load_vpg(vpg_path, torch.float32)
    pill = dict(cfg.model.pill)
    if vpg is not None:
        pill.setdefault("vpg_width", vpg.width)
        pill.setdefault("num_query_tokens", vpg.num_query_tokens)
    pill["stage"] = stage
    return PILL(llm, PILLConfig.from_dict(pill), vpg, tok)


def stage_total_steps(s: StageConfig, global_batch: int, samples_per_epoch: int) -> int:
    if s.max_steps is not None:
        return s.max_steps
    return max(1, math.ceil(s.epochs * samples_per_epoch / global_batch))


def _to_device(batch: dict[str, Any], device: torch.device, float_dtype: torch.dtype) -> dict[str, Any]:
    out = {}
    for k in MODEL_KEYS:
        v = batch.get(k)
        if v is None:
            continue
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point():
                v = v.to(float_dtype)  # DeepSpeed bf16 casts the module; inputs must match its dtype
        out[k] = v
    return out


# ---- the stage ----------------------------------------------------------------------------------------------------

def run_stage(cfg: TrainConfig, idx: int, raw_ds: dict[str, Any], ctx: DistContext, stage_dir: Path,
              init_from: str | None, preempt: PreemptionFlag, resume: str) -> StageResult:
    import deepspeed

    s = cfg.stages[idx]
    at = f"stages[{idx}]"
    llm_path, vpg_path = resolve_model_paths(cfg, ctx.is_main)
    torch.manual_seed(cfg.seed)  # identical fresh init on every rank (ZeRO-2 also broadcasts, ZeRO-3 does not)
    model = build_model(cfg, s.stage, llm_path, vpg_path)
    if init_from:
        model.load_adapter(init_from)
    trainables = model.trainable_parameters()

    plan = plan_batch(s, ctx.world_size, at)
    data = StageData(cfg, s, model.tokenizer, model.cfg, ctx, plan)
    total_steps = stage_total_steps(s, plan.global_batch_size, data.samples_per_epoch)
    lr = peak_lr(s, plan)
    ds = fill_ds_config(raw_ds, cfg, s, plan, ctx.device, model.llm.config.hidden_size)
    warmup = s.warmup_steps if s.warmup_steps is not None else int(s.warmup_ratio * total_steps)
    groups = param_groups(trainables, cfg.optim)
    optimizer = build_optimizer(groups, lr, cfg.optim, uses_cpu_offload(ds))
    scheduler = build_scheduler(optimizer, total_steps, warmup, s.min_lr_ratio)
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds)
    float_dtype = torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32

    ckpts = CheckpointManager(stage_dir / "checkpoints", cfg.checkpoint.keep_last)

    # ---- resume ----
    state = {"global_step": 0, "samples": 0, "tokens": 0, "skipped_nonfinite": 0, "wall_seconds": 0.0,
             "last_loss": float("nan")}
    resumed_from = None
    path = None
    if resume == "auto":
        path = ckpts.latest()
    elif resume == "never":
        if list(ckpts.dir.glob("step_*")):
            raise ConfigError(f"--resume never, but {ckpts.dir} already holds checkpoints: a fresh run there would "
                              "mix with them (keep-last pruning, latest pointer); use a new --output-dir")
    else:
        path = Path(resume)
        if not (path / "meta.json").is_file():
            raise ConfigError(f"--resume {resume}: not a complete checkpoint directory (no meta.json)")
    if path is not None:
        client, per_rank, how = ckpts.load(engine, trainables, path)
        state.update(client["train_state"])
        data.load_state_dict(client["data"], per_rank["data"] if per_rank else None, state["samples"])
        if per_rank:
            set_rng_state(per_rank["rng"])
        resumed_from = f"{path} ({how})"
        _sync_lr(scheduler)
    if ctx.is_main:  # rows logged after the resumed step (or by an attempt that never checkpointed) are stale
        _truncate_metrics(stage_dir / "metrics.jsonl", state["global_step"])

    log = MetricsLogger(stage_dir, ctx.is_main, cfg.log.tensorboard, cfg.log.progress_bar, total_steps,
                        state["global_step"], desc=f"stage {s.stage}")
    log.info(f"stage {s.stage}: {len(trainables)} trainable tensors, "
             f"{sum(p.numel() for _, p in trainables):,} trainable params; world {ctx.world_size}, "
             f"micro-batch {plan.micro_batch_size} x accum {plan.grad_accum} x {ctx.world_size} ranks = "
             f"{plan.global_batch_size}/step, {total_steps} steps, peak lr {lr:.3e}, warmup {warmup}, "
             f"ZeRO-{engine.zero_optimization_stage()}, {'bf16' if float_dtype == torch.bfloat16 else 'fp32'}")
    if resumed_from:
        log.info(f"resumed at step {state['global_step']} from {resumed_from}")

    def save() -> Path:
        client = {"train_state": dict(state), "data": data.state_dict_global(), "global_step": state["global_step"]}
        return ckpts.save(engine, trainables, state["global_step"], client, {"data": data.state_dict_rank()})

    nan_at = set(cfg.debug.get("nan_loss_at", []))
    sleep_per_step = float(cfg.debug.get("sleep_per_step", 0))
    engine.train()
    micro_in_step, micro_total = 0, 0
    loss_sum, n_loss = 0.0, 0
    local = {"samples": 0, "tokens": 0, "positions": 0}  # this rank, since the last optimizer step
    win = {"samples": 0, "tokens": 0, "positions": 0, "t0": time.time()}  # all ranks, since the last log line
    nonfinite_in_a_row = 0
    t_stage = time.time() - state["wall_seconds"]
    last_ckpt = ckpts.latest()
    batches = data.batches()
    while state["global_step"] < total_steps:
        batch = next(batches)
        inputs = _to_device(batch, ctx.device, float_dtype)
        out = engine(**inputs)
        loss = out.loss
        if micro_total in nan_at and cfg.debug.get("nan_loss_rank", ctx.rank) == ctx.rank:  # test hook
            loss = loss * float("nan")
        micro_total += 1
        # The one host sync of a micro-step, after the forward: the loss value serves both the non-finite check and
        # the logged mean. All ranks must take the same branch (a rank that skips backward would hang the others).
        loss_value = float(loss.detach().float())
        if all_agree_any(not math.isfinite(loss_value), ctx.device):
            state["skipped_nonfinite"] += 1
            nonfinite_in_a_row += 1
            log.info(f"step {state['global_step']}: non-finite loss, micro-batch skipped "
                     f"({nonfinite_in_a_row} in a row, {state['skipped_nonfinite']} in total)")
            if nonfinite_in_a_row >= cfg.optim.max_nonfinite_in_a_row:
                raise NonFiniteLossError(
                    f"{nonfinite_in_a_row} non-finite losses in a row at step {state['global_step']}: stopping "
                    f"before the weights are corrupted. Lower the lr (stages[{idx}].lr / base_lr), check the data "
                    f"(data.max_length, labels), or resume from {last_ckpt}")
            continue
        nonfinite_in_a_row = 0
        if micro_in_step == 0:
            lr_now = scheduler.get_last_lr()[0]  # the lr this optimizer step uses (the scheduler steps after it)
        engine.backward(loss)
        engine.step()
        micro_in_step += 1
        loss_sum += loss_value
        n_loss += 1
        am = batch["attention_mask"]
        local["samples"] += len(batch.get("meta") or am)
        local["tokens"] += int(am.sum())  # the host copy of the batch: no device sync
        local["positions"] += am.numel()
        if micro_in_step < plan.grad_accum:
            continue

        # ---- an optimizer step happened ----
        micro_in_step = 0
        state["global_step"] += 1
        step = state["global_step"]
        # One small all-reduce per step: loss averaged over every micro-batch of every rank, and the counts.
        tot_loss, tot_n, samples, tokens, positions = all_sum(
            [loss_sum, n_loss, local["samples"], local["tokens"], local["positions"]], ctx.device)
        loss_sum, n_loss = 0.0, 0
        local = {"samples": 0, "tokens": 0, "positions": 0}
        mean_loss = tot_loss / max(1, tot_n)
        state["last_loss"] = mean_loss
        state["samples"] += int(samples)
        state["tokens"] += int(tokens)
        for k, v in (("samples", samples), ("tokens", tokens), ("positions", positions)):
            win[k] += v
        if step % cfg.log.every_steps == 0 or step == total_steps:
            dt = max(1e-9, time.time() - win["t0"])
            gates = None
            if s.stage == 2 and model.cfg.mag:
                gates = all_mean(model.gate_magnitudes(), ctx.device)
            grad_norm = engine.get_global_grad_norm()
            scalars = {"loss": mean_loss, "lr": lr_now,
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "samples_per_s": win["samples"] / dt, "tokens_per_s": win["tokens"] / dt,
                       "pad_frac": 1.0 - win["tokens"] / max(1, win["positions"]), "samples": state["samples"],
                       "skipped_nonfinite": state["skipped_nonfinite"], **data.skip_counters(ctx.device)}
            log.log(step, scalars, gates)
            log.progress(step, mean_loss, lr_now, scalars["samples_per_s"])
            win = {"samples": 0, "tokens": 0, "positions": 0, "t0": time.time()}
        else:
            log.progress(step, mean_loss, lr_now, None)
        state["wall_seconds"] = time.time() - t_stage
        if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total_steps:
            last_ckpt = save()
            log.info(f"step {step}: checkpoint {last_ckpt}")
        if all_agree_any(preempt.raised, ctx.device):
            last_ckpt = save()
            log.info(f"signal {preempt.signum}: checkpoint {last_ckpt} written at step {step}; exiting "
                     f"{99} (resumable: rerun with the same --output-dir)")
            log.close()
            raise Preempted(str(last_ckpt))
        if sleep_per_step:
            time.sleep(sleep_per_step)

    # ---- end of stage: final checkpoint, export of the trained PILL weights ----
    if state["global_step"] and (last_ckpt is None or not last_ckpt.name.endswith(f"{state['global_step']:08d}")):
        last_ckpt = save()
    full = gather_consolidated(engine, trainables)  # collective
    export_dir = stage_dir / "export"
    if ctx.is_main:
        export_adapter(model, full["params"], export_dir)
    if dist.is_initialized():
        dist.barrier()
    wall = time.time() - t_stage
    result = StageResult(stage=s.stage, steps=state["global_step"], samples=state["samples"], tokens=state["tokens"],
                         wall_seconds=wall, samples_per_s=state["samples"] / max(1e-9, wall),
                         final_loss=state["last_loss"], skipped_nonfinite=state["skipped_nonfinite"],
                         checkpoint=str(last_ckpt), export_dir=str(export_dir), resumed_from=resumed_from,
                         llm_path=llm_path, vpg_path=vpg_path)
    if ctx.is_main:
        (stage_dir / "result.json").write_text(json.dumps(asdict(result), indent=2))
    log.info(result.summary())
    log.close()
    engine.destroy() if hasattr(engine, "destroy") else None
    return result


def _sync_lr(scheduler) -> None:
    """Set the param groups' lr from the schedule at the restored step.

    The checkpoint restores the optimizer's last lr and the scheduler's step count; recomputing from the lambda
    gives the same value when nothing changed, and the right one when the resumed run has a new length
    (e.g. --set stages.0.max_steps=...), instead of continuing with the old schedule's last lr until next step.
    """
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for g, lr in zip(scheduler.optimizer.param_groups, lrs):
        g["lr"] = lr
    scheduler._last_lr = lrs


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop rows logged after the checkpoint so metrics.jsonl reads as one loss curve."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
