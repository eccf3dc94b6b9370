"""Checkpoints: atomic DeepSpeed saves of the trainable state, a consolidated copy any world size can load, export.

Layout under <stage dir>/checkpoints/:
    latest                      text file with the tag of the newest COMPLETE checkpoint (DeepSpeed's format)
    step_00000100/              one DeepSpeed checkpoint (exclude_frozen_parameters=True: no LLM/VPG weights)
        mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's files (ZeRO partitions per rank)
        consolidated.pt         full fp32 trainables + Adam moments + step + scheduler, by parameter name
        rank00000.pt ...        per-rank RNG states and data position
        meta.json               step, world size, ZeRO stage, and the size + sha256 of every file above;
                                written last, so its presence means the save finished

Atomicity: every rank writes into `step_N.partial/`; after a barrier global rank 0 writes meta.json, renames the
directory to `step_N/` and only then replaces `latest` (write tmp + os.replace). A crash at any point leaves
`latest` on the previous complete checkpoint; stale `.partial` dirs are removed on the next save.
Only global rank 0 touches shared files (not each node's local rank 0: the output dir is on a shared filesystem).

Fallback: a checkpoint is complete when its meta.json exists and every file it lists has its size and checksum
(a disk that filled up, a copy that was cut short, a bit flip). Resuming `auto` takes the newest complete one;
a damaged or missing newest checkpoint (or a `latest` that points nowhere) is reported by file name and skipped.
Pruning counts complete checkpoints only and never removes the newest complete one, so a damaged newer save can
never cost the last good state. With checkpoints present but none complete, the run stops (exit 2) instead of
starting over on top of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

from pipeline.training.config import ConfigError
from pipeline.training.dist import all_agree_any

MOMENT_KEYS = ("exp_avg", "exp_avg_sq")
log = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ---- consolidated trainable state (collective: every rank must call) --------------------------------------------


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _relink_optimizer_state(engine) -> None:
    """Point every parameter's hp fragment at its optimizer moments.

    DeepSpeed (0.19, ZeRO-1/2 and bf16) links them once, right after the first param group's first step, when
    the later groups have no state yet; with two groups (decay / no decay) the second stays unlinked and
    safe_get_full_optimizer_state raises on the owning rank only, which desynchronises the all-reduce. Relinking
    after a step (when every group has state) fixes that.
    """
    zopt = engine.optimizer
    if hasattr(zopt, "_hp_optimizer_states_linked") and hasattr(zopt, "_lazy_init_hp_params_optimizer_state"):
        zopt._hp_optimizer_states_linked = False
        zopt._lazy_init_hp_params_optimizer_state()


def _has_moments(engine, device) -> bool:
    inner = _inner_optimizer(engine)
    mine = any(all(k in inner.state.get(p, {}) for k in MOMENT_KEYS) for g in inner.param_groups for p in g["params"])
    return not all_agree_any(not mine, device)  # all ranks must have state, or nobody gathers moments


def gather_consolidated(engine, named_trainables: list[tuple[str, torch.nn.Parameter]]) -> dict[str, Any]:
    """Full fp32 params and Adam moments by name. Collective under ZeRO (each call all-reduces one tensor)."""
    device = named_trainables[0][1].device
    with_moments = _has_moments(engine, device)
    if with_moments:
        _relink_optimizer_state(engine)
    params, moments = {}, {}
    for name, p in named_trainables:
        full = safe_get_full_fp32_param(p)
        params[name] = (full if full is not None else p.detach().float()).cpu().clone()
        moments[name] = {}
        if not with_moments:
            continue
        for key in MOMENT_KEYS:
            m = safe_get_full_optimizer_state(p, key)
            if m is None:  # no ZeRO / bf16 wrapper: the torch optimizer holds the full state itself
                m = _inner_optimizer(engine).state[p][key]
            moments[name][key] = m.float().cpu().clone()
    step = 0
    for st in _inner_optimizer(engine).state.values():
        if "step" in st:
            step = int(st["step"])
            break
    return {"params": params, "moments": moments, "optimizer_step": step}


def restore_consolidated(engine, named_trainables: list[tuple[str, torch.nn.Parameter]], state: dict[str, Any]) -> None:
    """Load a consolidated copy into an engine of ANY world size (ZeRO 0/1/2; not ZeRO-3)."""
    if engine.zero_optimization_stage() == 3:
        raise RuntimeError(
            "resuming ZeRO-3 at a different world size is not supported; resume with the world size "
            "of the checkpoint, or load its export (stages[*].init_from) to start fresh"
        )
    names = [n for n, _ in named_trainables]
    missing = sorted(set(names) - set(state["params"]))
    if missing:
        raise ValueError(f"consolidated checkpoint lacks trainable parameter(s) {missing[:5]}: different PILLConfig?")
    inner = _inner_optimizer(engine)
    step = state["optimizer_step"]
    # torch's AdamW creates its state lazily at the first step, and DeepSpeed links each parameter's fragment of
    # the flat moments only then; create the (zero) state now, re-link, then overwrite with the saved values.
    has_moments = step > 0 and any(state["moments"][n] for n in names)
    if has_moments:
        for group in inner.param_groups:
            for flat in group["params"]:
                st = inner.state[flat]
                for key in MOMENT_KEYS:
                    st.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
                st["step"] = torch.tensor(float(step)) if isinstance(inner, torch.optim.AdamW) else step
        _relink_optimizer_state(engine)
    with torch.no_grad():
        for name, p in named_trainables:
            full = state["params"][name].to(p.device)
            if hasattr(p, "_hp_mapping"):
                safe_set_full_fp32_param(p, full)
            p.data.copy_(full.to(p.dtype))  # the low-precision working copy every ZeRO-1/2 rank holds in full
            if has_moments:
                for key, m in state["moments"][name].items():
                    if hasattr(p, "_hp_mapping"):
                        safe_set_full_optimizer_state(p, m.to(p.device), key)
                    else:
                        inner.state[p][key].copy_(m.to(p.device))


# ---- completeness ------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_manifest(ckpt: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {size, sha256}} of every file of a checkpoint directory (meta.json excluded)."""
    files = sorted(f for f in ckpt.rglob("*") if f.is_file() and f.name != "meta.json")
    return {str(f.relative_to(ckpt)): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def checkpoint_problems(ckpt: Path, checksums: bool = True) -> list[str]:
    """Why `ckpt` cannot be resumed from, each naming the file; [] when it is complete. Checkpoints written before
    manifests existed are judged by their meta.json alone."""
    meta_path = ckpt / "meta.json"
    if not ckpt.is_dir():
        return [f"{ckpt}: missing"]
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return [f"{meta_path}: missing (the save did not finish)"]
    except (OSError, ValueError) as e:
        return [f"{meta_path}: unreadable ({e})"]
    problems = []
    for name, want in meta.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            problems.append(f"{f}: missing")
        elif f.stat().st_size != want["size"]:
            problems.append(f"{f}: {f.stat().st_size} bytes, {want['size']} written (truncated or replaced)")
        elif checksums and _sha256(f) != want["sha256"]:
            problems.append(f"{f}: checksum differs from the one written at save (corrupted)")
    return problems


def _agreed(value: Any) -> Any:
    """Rank 0's value on every rank (the checkpoint choice must be the same everywhere)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- the manager ---------------------------------------------------------------------------------------------------


class CheckpointManager:
    def __init__(self, ckpt_dir: str | Path, keep_last: int):
        self.dir = Path(ckpt_dir)
        self.keep_last = keep_last

    def steps(self) -> list[Path]:
        """Checkpoint directories, oldest first (finished saves; `.partial` ones are not)."""
        return sorted(p for p in self.dir.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))

    def latest(self, checksums: bool = False) -> Path | None:
        """The newest complete checkpoint: the `latest` pointer's if it verifies, else the newest that does (each
        one passed over is logged with the files that are wrong). None when there is no checkpoint at all; a
        ConfigError when there are some but none is complete."""
        ptr = self.dir / "latest"
        candidates = list(reversed(self.steps()))
        if ptr.is_file():
            named = self.dir / ptr.read_text().strip()
            candidates = [named] + [c for c in candidates if c != named]
        skipped: list[str] = []
        for c in candidates:
            problems = checkpoint_problems(c, checksums)
            if not problems:
                if skipped:
                    log.warning("checkpoint: resuming from %s instead of a newer one: %s", c, "; ".join(skipped))
                    print(f"checkpoint: passed over {'; '.join(skipped)}; using {c}", flush=True)
                return c
            skipped += problems
        if skipped:
            raise ConfigError(
                f"{self.dir} holds checkpoints but none is complete ({'; '.join(skipped)}); nothing was deleted. "
                "Resume from a copy of a complete checkpoint (--resume PATH), or start over with --resume never and "
                "a new --output-dir"
            )
        return None

    def save(
        self, engine, named_trainables, step: int, client_state: dict[str, Any], per_rank_state: dict[str, Any]
    ) -> Path:
        """Collective: every rank calls it. Returns the final checkpoint path."""
        rank = _rank()
        tag = f"step_{step:08d}"
        tmp_tag = tag + ".partial"
        if rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob("*.partial"):
                shutil.rmtree(stale, ignore_errors=True)
            if (self.dir / tag).exists():  # re-saving the same step (e.g. signal right after a periodic save)
                shutil.rmtree(self.dir / tag)
        _barrier()
        t0 = time.time()
        engine.save_checkpoint(
            str(self.dir), tag=tmp_tag, client_state=client_state, save_latest=False, exclude_frozen_parameters=True
        )
        consolidated = gather_consolidated(engine, named_trainables)
        tmp = self.dir / tmp_tag
        torch.save({"rng": rng_state(), **per_rank_state}, tmp / f"rank{rank:05d}.pt")
        if rank == 0:
            consolidated["client_state"] = client_state
            consolidated["scheduler"] = engine.lr_scheduler.state_dict() if engine.lr_scheduler else None
            torch.save(consolidated, tmp / "consolidated.pt")
        _barrier()  # every rank's files are closed before rank 0 declares the checkpoint complete
        if rank == 0:
            meta = {
                "step": step,
                "world_size": _world(),
                "zero_stage": engine.zero_optimization_stage(),
                "time": time.time(),
                "save_seconds": round(time.time() - t0, 3),
                "files": file_manifest(tmp),  # what "complete" means when this checkpoint is resumed
            }
            _fsync_write(tmp / "meta.json", json.dumps(meta, indent=2))
            os.replace(tmp, self.dir / tag)
            _fsync_write(self.dir / "latest", tag)
            self._prune()
        _barrier()
        return self.dir / tag

    def resume(self, policy: str, engine, named_trainables) -> tuple[dict[str, Any], dict[str, Any] | None, str] | None:
        """Apply `checkpoint.resume`: auto (the latest here, if any), never (refuse a directory that already holds
        checkpoints), or a checkpoint path. Returns load()'s triple with "how" naming the path, or None."""
        if policy == "never":
            if list(self.dir.glob("step_*")):
                raise ConfigError(
                    f"--resume never, but {self.dir} already holds checkpoints: a fresh run there "
                    "would mix with them (keep-last pruning, latest pointer); use a new --output-dir"
                )
            return None
        if policy == "auto":
            path = _agreed(self.latest(checksums=True) if _rank() == 0 else None)
        else:
            path = Path(policy)
            problems = _agreed(checkpoint_problems(path) if _rank() == 0 else None)
            if problems:
                raise ConfigError(f"--resume {policy}: not a complete checkpoint: {'; '.join(problems)}")
        if path is None:
            return None
        client, per_rank, how = self.load(engine, named_trainables, path)
        return client, per_rank, f"{path} ({how})"

    def _prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints (sizes checked: cheap); a damaged one is not counted
        and is removed only once a newer complete one exists."""
        done = self.steps()
        complete = [p for p in done if not checkpoint_problems(p, checksums=False)]
        if not complete:
            return
        keep = set(complete[-max(1, self.keep_last) :])
        newest = complete[-1]
        for old in done:
            if old not in keep and old.name < newest.name:
                shutil.rmtree(old, ignore_errors=True)

    def load(self, engine, named_trainables, path: Path) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
        """Restore into `engine`. Returns (client_state, this rank's per-rank state or None, how)."""
        meta = json.loads((path / "meta.json").read_text())
        rank, world = _rank(), _world()
        same_layout = meta["world_size"] == world and meta["zero_stage"] == engine.zero_optimization_stage()
        if same_layout:
            # exclude_frozen_parameters left the frozen weights out, hence load_module_strict=False.
            try:
                load_path, client_state = engine.load_checkpoint(
                    str(path.parent), tag=path.name, load_module_strict=False
                )
            except (OSError, RuntimeError, EOFError) as e:  # torch.load of a damaged file names none
                raise RuntimeError(f"checkpoint {path}: loading failed ({type(e).__name__}: {e})") from e
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {path}")
            per_rank = torch.load(path / f"rank{rank:05d}.pt", weights_only=False)
            return client_state, per_rank, "deepspeed"
        # Different world size or ZeRO stage: DeepSpeed's partitioned files do not fit; use the consolidated copy.
        state = torch.load(path / "consolidated.pt", weights_only=False, map_location="cpu")
        restore_consolidated(engine, named_trainables, state)
        if state.get("scheduler") is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(state["scheduler"])
            # LambdaLR.load_state_dict restores last_epoch, but the lr in param groups only updates at the next
            # step(); set it now so the first resumed step uses the right lr.
            for g, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
                g["lr"] = lr
        engine.global_steps = state["client_state"].get("global_step", 0)
        return (
            state["client_state"],
            None,
            f"consolidated (saved at world size {meta['world_size']}, "
            f"ZeRO-{meta['zero_stage']}; now {world}, "
            f"ZeRO-{engine.zero_optimization_stage()})",
        )


def export_adapter(model, consolidated_params: dict[str, torch.Tensor] | None, out_dir: str | Path) -> Path:
    """model.save_adapter with the fp32 master weights (the module holds bf16 copies under DeepSpeed bf16).

    Only global rank 0 calls it."""
    return model.save_adapter(out_dir, state_dict=consolidated_params)
