"""The loss of a step is the token mean over the global batch; activation checkpointing changes no number."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from pipeline.model import PILLConfig, load_pill
from pipeline.model.batch import Batch
from pipeline.training.activation_checkpointing import apply_activation_checkpointing
from pipeline.training.loss import Loss, answer_loss
from pipeline.training.metrics import StepSums


def _model(tiny_dirs, stage: int = 2):
    torch.manual_seed(0)
    model = load_pill(
        tiny_dirs["llm"], None, PILLConfig(stage=stage, rank=4, num_query_tokens=8, vpg_width=64), dtype=torch.float32
    )
    with torch.no_grad():  # leave the zero init, so every trainable tensor gets a gradient
        for _, p in model.trainable_parameters():
            p.normal_(0, 0.05)
    return model


def _batch(seed: int, answer_len: int, T: int = 24):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (1, T), generator=g)
    mm = torch.zeros(1, T, dtype=torch.bool)
    mm[0, 2:10] = True
    labels = torch.full_like(ids, -100)
    labels[0, T - answer_len :] = ids[0, T - answer_len :]
    return Batch(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        modality_mask=mm,
        labels=labels,
        image_features=torch.randn(1, 8, 64, generator=g),
        num_samples=1,
    )


def _grads(model):
    return {n: p.grad.clone() for n, p in model.trainable_parameters()}


def test_checkpointing_gives_the_same_loss_and_gradients(tiny_dirs):
    model = _model(tiny_dirs)
    b = _batch(0, 7)
    plain = answer_loss(model, b)
    plain.backward()
    ref = _grads(model)
    model.zero_grad()
    assert apply_activation_checkpointing(model, every_n_layers=1) == len(model.blocks)
    ckpt = answer_loss(model, b)
    ckpt.backward()
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
    for n, g in _grads(model).items():
        torch.testing.assert_close(g, ref[n], rtol=1e-6, atol=1e-7, msg=n)


def test_checkpointing_every_n_layers_and_names_unchanged(tiny_dirs):
    model = _model(tiny_dirs)
    names = [n for n, _ in model.named_parameters()]
    assert apply_activation_checkpointing(model, every_n_layers=2) == (len(model.blocks) + 1) // 2
    assert [n for n, _ in model.named_parameters()] == names
    with pytest.raises(ValueError):
        apply_activation_checkpointing(model, every_n_layers=0)


def test_loss_weights_every_answer_token_of_the_global_batch_equally(tiny_dirs, dist_world_of_one):
    """1 rank x accumulation 4 (the real DeepSpeed engine and train_step) == one big batch, and == 4 ranks x 1
    (DeepSpeed averages gradients over ranks: the mean of per-rank gradients computed with the same rule)."""
    import deepspeed

    from pipeline.training.loop import NonFiniteGuard, TrainState, train_step

    lengths = [1, 3, 9, 14]  # QCM-ALE answers vary a lot: a per-micro-batch mean would over-weight the short ones
    batches = [_batch(i, n) for i, n in enumerate(lengths)]
    base = _model(tiny_dirs)
    n_total = sum(b.answer_tokens() for b in batches)
    assert n_total == sum(lengths)

    # One big batch: the mean over all answer tokens.
    big = copy.deepcopy(base)
    keys = ("input_ids", "attention_mask", "modality_mask", "labels", "image_features")
    cat = Batch(**{k: torch.cat([getattr(b, k) for b in batches]) for k in keys})
    loss = answer_loss(big, cat)
    loss.backward()
    ref_grads, ref_loss = _grads(big), float(loss.detach())

    # Four ranks x accumulation 1: each rank's loss normalised by the global count over 4 micro-batches (the
    # trainer's Loss); DeepSpeed averages the ranks' gradients.
    ranks = [copy.deepcopy(base) for _ in batches]
    for m, b in zip(ranks, batches):
        Loss()(m, m(b), b, [n_total], micro_batches=4).loss.backward()
    mean_grads = {n: sum(_grads(m)[n] for m in ranks) / 4 for n in ref_grads}
    for n, g in mean_grads.items():
        torch.testing.assert_close(g, ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)

    # One rank x accumulation 4 through the real engine: SGD with lr 1 turns the applied gradient into -delta w.
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.trainable_parameters()}
    opt = torch.optim.SGD([p for _, p in model.trainable_parameters()], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    engine, _, _, sched = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=sched,
        config={
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 4,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 0},
            "bf16": {"enabled": False},
        },
    )
    ctx = SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0)
    st = SimpleNamespace(
        plan=SimpleNamespace(grad_accum=4),
        engine=engine,
        model=model,
        loss=Loss(),
        scheduler=sched,
        float_dtype=torch.float32,
        data=SimpleNamespace(n_sources=1),  # one source: no per-source sums
    )
    guard = NonFiniteGuard(
        SimpleNamespace(optim=SimpleNamespace(max_nonfinite_in_a_row=3)),
        0,
        ctx,
        TrainState(),
        SimpleNamespace(info=print),
    )
    sums = StepSums()
    train_step(st, iter(batches), ctx, guard, sums)
    logged = sums.reduce(ctx.device)
    assert sums.steps == 1 and logged["samples"] == 4
    assert logged["loss"] / 4 == pytest.approx(ref_loss, rel=1e-5)  # the logged loss: the same token mean
    for n, p in model.trainable_parameters():
        torch.testing.assert_close(before[n] - p.detach(), ref_grads[n], rtol=1e-4, atol=1e-7, msg=n)
    engine.destroy()
