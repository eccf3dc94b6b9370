"""What loss.text_kl costs, measured A/B in one process (so both sides see the same machine load).

    python scripts/text_kl_cost.py [--rounds 5 --steps 4 --batch 8 --seq 128 --text-rows 0.5 --threads 1]

The demo's tiny PILL (stage 2, rank 16, tiny VPG on 224 px images) trains with AdamW on fixed synthetic batches of
`--batch` rows of `--seq` tokens, a share `--text-rows` of them text-only (a replay mix; the rest carry one image).
Each round times `--steps` training steps (forward, loss, backward, optimizer step) for each variant in turn: the
answer cross-entropy alone, + TextKL on text-only rows, + TextKL on every text position. Prints samples/s per variant
(median over rounds) and the ratio to the plain loss as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pipeline.model import PILLConfig, load_method
from pipeline.model.batch import IGNORE_INDEX, Batch
from pipeline.training.loss import training_loss

VARIANTS = {"off": (0.0, "text_rows"), "text_rows": (0.5, "text_rows"), "all_text": (0.5, "all_text")}


def synthetic_batches(model, n: int, rows: int, seq: int, text_share: float) -> list[Batch]:
    """`n` batches: the last round(rows x text_share) rows text-only, the others one image at position 3."""
    g = torch.Generator().manual_seed(0)
    K = model.cfg.num_query_tokens
    n_image = rows - round(rows * text_share)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 400, (rows, seq), generator=g)
        mm = torch.zeros_like(ids, dtype=torch.bool)
        mm[:n_image, 3 : 3 + K] = True
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[:, -8:] = ids[:, -8:]
        pixels = torch.randn(n_image, 3, 224, 224, generator=g)
        out.append(
            Batch(
                input_ids=ids, attention_mask=torch.ones_like(ids), modality_mask=mm, labels=labels, pixel_values=pixels
            )
        )
    return out


def time_steps(model, opt, loss, batches: list[Batch]) -> float:
    """Seconds for one training step per batch."""
    t0 = time.perf_counter()
    for b in batches:
        result = loss(model, model(b), b, loss.counts(b), 1)
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--text-rows", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = load_method("pill", "tiny", "tiny", PILLConfig(stage=2, rank=16), dtype=torch.float32).train()
    opt = torch.optim.AdamW([q for _, q in model.trainable_parameters()], lr=1e-4)
    batches = synthetic_batches(model, a.steps, a.batch, a.seq, a.text_rows)
    losses = {name: training_loss(*VARIANTS[name]) for name in VARIANTS}
    time_steps(model, opt, losses["all_text"], batches[:1])  # warm-up
    per_s: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(a.rounds):
        for name, loss in losses.items():
            per_s[name].append(a.steps * a.batch / time_steps(model, opt, loss, batches))
    med = {name: statistics.median(v) for name, v in per_s.items()}
    report = {
        "samples_per_s": {k: round(v, 2) for k, v in med.items()},
        "relative_to_off": {k: round(v / med["off"], 3) for k, v in med.items()},
        "rounds": {k: [round(x, 2) for x in v] for k, v in per_s.items()},
        "args": vars(a),
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
