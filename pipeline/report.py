"""Pictures and a summary of one training run: ``python -m pipeline.report RUN_DIR [--out DIR]``.

Reads the metrics that pipeline/train.py writes: RUN_DIR/metrics.jsonl for a one-stage run, RUN_DIR/stage{N}/
metrics.jsonl for a multi-stage run (the embedded default). One JSON object per logging step: ``step``, ``loss``,
``lr``, throughput keys ``*per_s*``, ``samples``, and in stage 2 the per-layer mean |tanh gate|, either as the
list ``gate_abs`` (what the trainer writes) or as ``gate/layer_{i}`` keys. Also read when present:
RUN_DIR/config.json, RUN_DIR/stage*/result.json, RUN_DIR/summary.txt and RUN_DIR/eval.json (scores from
pipeline.eval, one dict or ``{name: scores}``). Writes into --out (default RUN_DIR):
- ``loss.png``: training loss (and lr) per step, one panel per stage;
- ``gates.png``: the paper's Figure 4, mean |tanh gate| per layer at the last logged step, plus its course;
- ``retention.png`` (runs with eval.retention_every): per stage, the loss beside text retention against the step
  (``retention/identical`` % of greedy answers equal to the frozen LLM's, ``retention/mean_kl`` nats/token);
- ``report.md``: config, data counts, throughput, evaluation tables.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes or in CI
import matplotlib.pyplot as plt

from pipeline.eval import mme_scoring, sqa_scoring

GATE_KEY = re.compile(r"^gate/layer_(\d+)$")
CONFIG_FILES = ("config.json", "config.yaml", "config.yml")


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is this a run directory written by pipeline/train.py?")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not JSON ({err.msg})") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'step' field")
        if isinstance(rec.get("gate_abs"), list):  # the trainer's form -> one key per layer
            rec.update({f"gate/layer_{i}": g for i, g in enumerate(rec.pop("gate_abs"))})
        records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def find_metrics(run_dir: Path) -> list[tuple[str | None, Path]]:
    """(stage label, metrics.jsonl) pairs: the run dir's own file, else one per stage{N}/ subfolder."""
    if (run_dir / "metrics.jsonl").is_file():
        return [(None, run_dir / "metrics.jsonl")]
    found = sorted(p for p in run_dir.glob("stage*/metrics.jsonl"))
    if not found:
        raise FileNotFoundError(
            f"{run_dir / 'metrics.jsonl'} not found (nor {run_dir}/stage*/metrics.jsonl): "
            "is this a run directory written by pipeline/train.py?"
        )
    return [(p.parent.name.removeprefix("stage"), p) for p in found]


def read_run(run_dir: Path) -> list[dict]:
    """Every metrics record of the run; records of a stage{N}/ file get stage=N unless they carry one."""
    records = []
    for stage, path in find_metrics(run_dir):
        for rec in read_metrics(path):
            if stage is not None:
                rec.setdefault("stage", stage)
            records.append(rec)
    return records


def _by_stage(records: list[dict], key: str) -> dict[object, list[tuple[float, float]]]:
    series: dict[object, list] = defaultdict(list)
    for rec in records:
        value = rec.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            series[rec.get("stage", "all")].append((rec["step"], value))
    return dict(series)


def plot_loss(records: list[dict], out: Path) -> Path | None:
    """loss (left axis) and lr (right axis) per step, one panel per stage; None without loss values."""
    loss = _by_stage(records, "loss")
    if not loss:
        return None
    lr = _by_stage(records, "lr")
    fig, axes = plt.subplots(1, len(loss), figsize=(5.5 * len(loss), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], sorted(loss, key=str)):
        steps, values = zip(*loss[stage])
        ax.plot(steps, values, color="tab:blue", lw=1.2, label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("training loss" if stage == "all" else f"stage {stage}")
        if stage in lr:
            twin = ax.twinx()
            twin.plot(*zip(*lr[stage]), color="tab:orange", lw=0.8, alpha=0.7)
            twin.set_ylabel("lr", color="tab:orange")
        ax.grid(alpha=0.3)
    return _save(fig, out / "loss.png")


def plot_retention(records: list[dict], out: Path) -> Path | None:
    """Per stage, the loss (left) beside retention/identical and retention/mean_kl (right) against the step; None
    when no record carries retention figures."""
    same = _by_stage(records, "retention/identical")
    if not same:
        return None
    kl, loss = _by_stage(records, "retention/mean_kl"), _by_stage(records, "loss")
    stages = sorted(same, key=str)
    fig, axes = plt.subplots(len(stages), 2, figsize=(11, 3.6 * len(stages)), squeeze=False)
    for (ax_loss, ax_ret), stage in zip(axes, stages):
        title = "" if stage == "all" else f"stage {stage}: "
        if stage in loss:
            ax_loss.plot(*zip(*loss[stage]), color="tab:blue", lw=1.2)
        ax_loss.set(xlabel="step", ylabel="loss", title=f"{title}training loss")
        ax_ret.plot(*zip(*same[stage]), "o-", color="tab:green", lw=1.2, ms=3)
        ax_ret.set(xlabel="step", ylabel="identical answers (%)", ylim=(-5, 105), title=f"{title}text retention")
        if stage in kl:
            twin = ax_ret.twinx()
            twin.plot(*zip(*kl[stage]), "s--", color="tab:red", lw=1, ms=3)
            twin.set_ylabel("mean KL (nats/token)", color="tab:red")
            # a KL is >= 0; without a floor an all-zero curve (text path untouched) is drawn mid-axis among negatives
            top = max(v for _, v in kl[stage])
            twin.set_ylim(bottom=0, top=1.05 * top if top > 0 else 0.05)
        for ax in (ax_loss, ax_ret):
            ax.grid(alpha=0.3)
    return _save(fig, out / "retention.png")


def _save(fig, path: Path) -> Path:
    """Lay the figure out, write it at 120 dpi and close it (pyplot keeps every open figure alive)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def gate_table(records: list[dict]) -> tuple[list[int], list[tuple[float, list[float]]]]:
    """(layers, [(step, [value per layer])]) over the records that carry every layer's gate."""
    layers = sorted({int(m.group(1)) for rec in records for k in rec if (m := GATE_KEY.match(k))})
    rows = [
        (rec["step"], [float(rec[f"gate/layer_{i}"]) for i in layers])
        for rec in records
        if layers and all(f"gate/layer_{i}" in rec for i in layers)
    ]
    return layers, rows


def plot_gates(records: list[dict], out: Path) -> Path | None:
    """Figure 4: mean |tanh gate| per layer at the last logged step (bars), and per layer over steps (lines)."""
    layers, rows = gate_table(records)
    if not rows:
        return None
    fig, (ax_bar, ax_line) = plt.subplots(1, 2, figsize=(11, 3.8))
    last_step, last = rows[-1]
    ax_bar.bar(layers, last, color="tab:green")
    ax_bar.set_xticks(layers)  # layers are integers; matplotlib would otherwise tick at halves
    ax_bar.set_xlabel("layer")
    ax_bar.set_ylabel("mean |tanh gate|")
    ax_bar.set_title(f"attention gate per layer (step {last_step})")
    cmap = plt.get_cmap("viridis")
    steps = [s for s, _ in rows]
    for j in range(len(layers)):
        ax_line.plot(steps, [v[j] for _, v in rows], color=cmap(j / max(1, len(layers) - 1)), lw=1)
    ax_line.set_xlabel("step")
    ax_line.set_ylabel("mean |tanh gate|")
    ax_line.set_title("course per layer (dark = first, yellow = last)")
    for ax in (ax_bar, ax_line):
        ax.grid(alpha=0.3)
    return _save(fig, out / "gates.png")


def _throughput(records: list[dict]) -> dict[str, float]:
    """Mean of each ``*per_s*`` / ``throughput*`` key over the second half of its records (after warm-up)."""
    keys = sorted({k for rec in records for k in rec if "per_s" in k or k.startswith("throughput")})
    result = {}
    for key in keys:
        values = [rec[key] for rec in records if isinstance(rec.get(key), (int, float))]
        tail = values[len(values) // 2 :]
        if tail:
            result[key] = sum(tail) / len(tail)
    return result


def eval_markdown(evals: dict) -> str:
    """Top-level scalars as a list (the trainer's accuracy / accuracy_no_image / chance / n), then a table per
    nested evaluation: multiple-choice scores, MME scores, or the raw JSON of anything else."""
    if "categories" in evals and "accuracy" in evals:  # one score dict, not {name: scores}
        evals = {"evaluation": evals}
    scalars = {k: v for k, v in evals.items() if not isinstance(v, dict)}
    parts = [("\n".join(f"- {k}: {v}" for k, v in scalars.items()) + "\n")] if scalars else []
    for name, scores in evals.items():
        if not isinstance(scores, dict):
            continue
        if "categories" in scores and "accuracy" in scores:
            parts.append(sqa_scoring.markdown_table(scores, title=name))
        elif "perception" in scores and "subtasks" in scores:
            parts.append(f"### {name}\n\n" + mme_scoring.markdown_table(scores))
        else:
            parts.append(f"### {name}\n\n```json\n{json.dumps(scores, indent=2)}\n```\n")
    return "\n".join(parts)


def summary_markdown(run_dir: Path, records: list[dict], evals: dict | None, images: list[Path]) -> str:
    lines = [f"# Run report: {run_dir}", ""]
    config = next((run_dir / n for n in CONFIG_FILES if (run_dir / n).is_file()), None)
    if config is not None:
        lines += [f"## Config ({config.name})", "", "```", config.read_text(encoding="utf-8").rstrip(), "```", ""]
    for result in sorted(run_dir.glob("stage*/result.json")) + (
        [run_dir / "result.json"] if (run_dir / "result.json").is_file() else []
    ):
        r = json.loads(result.read_text(encoding="utf-8"))
        lines += [f"## {result.parent.name if result.parent != run_dir else 'stage'} result", ""]
        lines += [f"- {k}: {v}" for k, v in r.items()] + [""]
    if (run_dir / "summary.txt").is_file():
        text = (run_dir / "summary.txt").read_text(encoding="utf-8").rstrip()
        lines += ["## Trainer summary (summary.txt)", "", "```", text, "```", ""]
    lines += ["## Training", "", f"- logged steps: {len(records)} (last step {records[-1]['step']})"]
    for stage, series in sorted(_by_stage(records, "loss").items(), key=lambda kv: str(kv[0])):
        first, final = series[0][1], series[-1][1]
        label = "loss" if stage == "all" else f"stage {stage} loss"
        lines.append(f"- {label}: first {first:.4f}, last {final:.4f}, min {min(v for _, v in series):.4f}")
    last_of_stage = {rec.get("stage", "all"): rec for rec in records}
    for stage, rec in sorted(last_of_stage.items(), key=lambda kv: str(kv[0])):
        label = "" if stage == "all" else f"stage {stage} "
        for key in ("samples", "tokens", "epoch"):
            if key in rec:
                lines.append(f"- {label}{key} seen (last record): {rec[key]}")
        for key, value in _throughput([r for r in records if r.get("stage", "all") == stage]).items():
            lines.append(f"- {label}{key} (mean over the second half): {value:.2f}")
    for stage, series in sorted(_by_stage(records, "retention/identical").items(), key=lambda kv: str(kv[0])):
        kl = dict(_by_stage(records, "retention/mean_kl").get(stage, []))
        label = "" if stage == "all" else f"stage {stage} "
        course = ", ".join(f"step {s:g}: {v:.0f}% / {kl.get(s, float('nan')):.4g}" for s, v in series)
        lines.append(f"- {label}text retention (identical % / mean KL nats per token): {course}")
    layers, rows = gate_table(records)
    if rows:
        values = ", ".join(f"{v:.3f}" for v in rows[-1][1])
        lines.append(f"- mean |tanh gate| per layer 0..{layers[-1]} at step {rows[-1][0]}: {values}")
    lines += [""] + [f"![{p.stem}]({p.name})" for p in images] + [""]
    lines += ["## Evaluation", ""]
    lines.append(eval_markdown(evals) if evals else "No eval.json in the run directory.\n")
    return "\n".join(lines)


def make_report(run_dir: str | Path, out: str | Path | None = None) -> dict[str, Path]:
    """Write loss.png, gates.png and retention.png (when gates / retention were logged) and report.md; returns
    what was written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    out = Path(out) if out else run_dir
    out.mkdir(parents=True, exist_ok=True)
    records = read_run(run_dir)
    evals = None
    if (run_dir / "eval.json").is_file():
        evals = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    written = {}
    for name, fn in (("loss", plot_loss), ("gates", plot_gates), ("retention", plot_retention)):
        path = fn(records, out)
        if path is not None:
            written[name] = path
    md = out / "report.md"
    md.write_text(summary_markdown(run_dir, records, evals, list(written.values())), encoding="utf-8")
    written["summary"] = md
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run directory holding metrics.jsonl (and eval.json)")
    parser.add_argument("--out", default=None, help="output folder (default: the run directory)")
    args = parser.parse_args(argv)
    for name, path in make_report(args.run_dir, args.out).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
