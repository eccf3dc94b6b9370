"""What a user sees: rank-0 progress bar (on a terminal only), a text log line every N steps, TensorBoard
scalars, metrics.jsonl; and `StepSums`, the one record every logged training number is computed from.

All sinks get the same dict of numbers per logging step, so scripts reading metrics.jsonl and people reading
TensorBoard see identical values. Every MetricsLogger method is a no-op on ranks other than global rank 0.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.training.dist import all_sum


class StepSums:
    """This rank's named sums since the last log line (loss, samples, tokens, ... by name), all-reduced at once.

    The trainer `add`s a number under a name (a float, or a tensor that stays on its device until the log step: no
    host sync per step) and counts `steps`; at a log step `reduce` all-reduces every sum in ONE collective (names in
    sorted order, the same on every rank: every rank adds the same names) and the logged numbers are computed from
    its result. A new logged number is one `add` line and one line where the log step turns its sum into a value."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float | torch.Tensor] = {}
        self.steps = 0
        self.t0 = time.time()

    def add(self, name: str, value: float | torch.Tensor) -> None:
        if torch.is_tensor(value):
            value = value.detach()
        self.sums[name] = value + self.sums[name] if name in self.sums else value

    def seconds(self) -> float:
        return max(1e-9, time.time() - self.t0)

    def reduce(self, device: torch.device) -> dict[str, float | list[float]]:
        """Every sum over all ranks (collective): floats stay floats, tensors come back as lists of floats."""
        names = sorted(self.sums)
        flat: list[float] = []
        sizes: list[int | None] = []
        for n in names:
            v = self.sums[n]
            vals = v.float().flatten().tolist() if torch.is_tensor(v) else [float(v)]
            sizes.append(len(vals) if torch.is_tensor(v) else None)
            flat += vals
        total = all_sum(flat, device) if flat else []
        out: dict[str, float | list[float]] = {}
        at = 0
        for n, size in zip(names, sizes):
            out[n] = total[at] if size is None else total[at : at + size]
            at += 1 if size is None else size
        return out


def gate_bar_image(values: list[float], height: int = 96, bar_w: int = 8) -> np.ndarray:
    """(3, H, W) uint8 bar chart of the per-layer mean |tanh gate| on a 0..1 scale (paper Figure 4)."""
    n = max(1, len(values))
    img = np.full((3, height, n * bar_w), 255, dtype=np.uint8)
    for i, v in enumerate(values):
        h = int(round(min(1.0, max(0.0, float(v))) * (height - 1)))
        if h:
            img[:, height - h :, i * bar_w + 1 : (i + 1) * bar_w - 1] = np.array([31, 119, 180], np.uint8)[
                :, None, None
            ]
    img[:, height - 1, :] = 0  # baseline
    return img


class MetricsLogger:
    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        tensorboard: bool = True,
        progress_bar: bool = True,
        total_steps: int = 0,
        initial_step: int = 0,
        desc: str = "train",
        wandb: dict[str, Any] | None = None,
    ):
        """`wandb`: wandb.init keyword arguments (project, name, dir, config) to also log there, or None."""
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.wandb = None
        self.tb = None
        self.bar = None
        self.jsonl = None
        self.text = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.text = open(self.run_dir / "train.log", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard (~1 s): only when logging to it

            self.tb = SummaryWriter(str(self.run_dir / "tb"))
        if wandb is not None:
            import wandb as wandb_lib  # optional dependency: `pip install pill-train[wandb]`

            self.wandb = wandb_lib.init(resume="allow", **wandb)
        # A carriage-return bar only where a person watches a terminal: in a Slurm or nohup log file it is kilobytes
        # of \r-separated redraws torn into the log lines, so files get the plain log lines alone.
        if progress_bar and _is_terminal(sys.stderr):
            # The bar goes to stderr; log lines go to stdout via tqdm.write so they do not tear the bar.
            self.bar = tqdm(
                total=total_steps,
                initial=initial_step,
                desc=desc,
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
                smoothing=0.1,
            )

    def info(self, msg: str) -> None:
        if not self.enabled:
            return
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)
        self.text.write(line + "\n")
        self.text.flush()

    def progress(self, step: int, loss: float, lr: float, samples_per_s: float | None) -> None:
        """tqdm shows step/total and ETA itself; samples/s is refreshed at logging steps."""
        if self.bar is None:
            return
        self.bar.n = step
        if samples_per_s is not None:
            self._sps = samples_per_s
        self.bar.set_postfix(
            loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{getattr(self, '_sps', 0.0):.1f}", refresh=False
        )
        self.bar.refresh()

    def log(self, step: int, scalars: dict[str, Any], gates: list[float] | None = None) -> None:
        """One logging step: metrics.jsonl row, TensorBoard scalars (+ gate image), one text line."""
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in scalars.items()}}
        if gates is not None:
            row["gate_abs"] = [round(float(g), 6) for g in gates]
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(f"train/{k}", v, step)
            if gates is not None:
                for i, g in enumerate(gates):
                    self.tb.add_scalar(f"gate_abs/layer_{i:02d}", g, step)
                self.tb.add_image("gate_abs/per_layer", gate_bar_image(gates), step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(
                {f"train/{k}": _plain(v) for k, v in scalars.items()}
                | ({f"gate_abs/layer_{i:02d}": g for i, g in enumerate(gates)} if gates else {}),
                step=step,
            )
        keys = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "pad_frac", "skipped_nonfinite")
        parts = [f"step {step}"] + [f"{k} {_fmt(scalars[k])}" for k in keys if k in scalars]
        if gates is not None and gates:
            parts.append(f"gate_abs[last] {gates[-1]:.3f}")
        self.info(" | ".join(parts))

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.jsonl.close()
        self.text.close()


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3e}" if (v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5)) else f"{v:.4f}"
    return str(v)
