"""The model's `triton` backends (kernels/) match the `eager` reference in loss and every trainable gradient.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py sets it before triton is imported), fp32.
"""

import os

import pytest
import torch

from pipeline.model import PILLConfig, load_pill
from pipeline.model.batch import Batch
from pipeline.training.loss import answer_loss
from tests.helpers import loss_of
from tests.test_model_pill import assert_close_to_scale, batch_with_images, randomize

needs_triton = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="no CUDA and TRITON_INTERPRET is not 1: the kernels would fall back",
)


@needs_triton
@pytest.mark.parametrize("stage", [1, 2])
def test_triton_backends_match_eager(tiny_gqa_dirs, stage):
    results = {}
    for attn, adapter in (("eager", "eager"), ("triton", "triton")):
        cfg = PILLConfig(
            stage=stage, rank=8, num_query_tokens=8, vpg_width=64, attn_backend=attn, adapter_backend=adapter
        )
        torch.manual_seed(1)
        model = load_pill(tiny_gqa_dirs["llm"], None, cfg, dtype=torch.float32)
        randomize(model)
        loss = loss_of(model, **batch_with_images(len(model.tokenizer)))
        loss.backward()
        results[attn] = (loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()})
    (le, ge), (lt, gt) = results["eager"], results["triton"]
    assert_close_to_scale(lt, le, "loss")
    assert ge.keys() == gt.keys()
    for n in ge:
        assert_close_to_scale(gt[n], ge[n], n)


@needs_triton
def test_triton_packed_batch_matches_eager(tiny_dirs):
    """Packed sequences (cu_seqlens): the varlen kernel never attends across documents, like the dense mask."""
    outs = {}
    for backend in ("eager", "triton"):
        cfg = PILLConfig(stage=2, rank=8, num_query_tokens=8, vpg_width=64, attn_backend=backend)
        torch.manual_seed(1)
        model = load_pill(tiny_dirs["llm"], None, cfg, dtype=torch.float32)
        randomize(model)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(5, 400, (1, 30), generator=g)
        mm = torch.zeros(1, 30, dtype=torch.bool)
        mm[0, 2:10] = True
        cu = torch.tensor([0, 13, 30], dtype=torch.int32)
        pos = torch.cat([torch.arange(13), torch.arange(17)])[None]
        batch = Batch(
            ids,
            modality_mask=mm,
            labels=ids,
            image_features=torch.randn(1, 8, 64, generator=g),
            cu_seqlens=cu,
            max_seqlen=17,
            position_ids=pos,
        )
        out = model(batch)
        answer_loss(model, batch, out).backward()
        outs[backend] = (model.output_logits(out).detach(), model.projection.weight.grad.clone())
    assert_close_to_scale(outs["triton"][0], outs["eager"][0], "logits")
    assert_close_to_scale(outs["triton"][1], outs["eager"][1], "projection grad")


@needs_triton
@pytest.mark.parametrize("stage, builds", [(1, 2), (2, 1)])
def test_route_schedule_is_built_once_per_forward(tiny_dirs, monkeypatch, stage, builds):
    """Every layer shares one expert schedule (stage 1's inverted last layer gets a second one)."""
    from pipeline.model import adapters

    calls = []
    real = adapters.build_route_schedule  # patched where the model looks it up
    monkeypatch.setattr(adapters, "build_route_schedule", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = PILLConfig(
        stage=stage, rank=4, num_query_tokens=8, vpg_width=64, attn_backend="eager", adapter_backend="triton"
    )
    model = load_pill(tiny_dirs["llm"], None, cfg, dtype=torch.float32)
    model(Batch(**batch_with_images(len(model.tokenizer))))
    assert len(calls) == builds


@pytest.mark.parametrize("attn, adapter", [("sdpa", "eager"), ("triton", "triton")])
def test_a_pill_block_compiles_without_graph_breaks(tiny_dirs, attn, adapter):
    """torch.compile(fullgraph=True) captures a whole PILL decoder layer, the kernels included (torch.library ops);
    aot_eager traces forward and backward without generating code, so the test needs no compiler."""
    from pipeline.model.attention import AttnMask

    cfg = PILLConfig(stage=2, rank=4, num_query_tokens=8, vpg_width=64, attn_backend=attn, adapter_backend=adapter)
    model = load_pill(tiny_dirs["llm"], None, cfg, dtype=torch.float32)
    randomize(model)
    block, base = model.blocks[0], model.llm.model.layers[0]
    block.attn_backend, block.adapter_backend = attn, adapter
    torch.manual_seed(0)
    x = torch.randn(2, 12, model.llm.config.hidden_size, requires_grad=True)
    mm = torch.zeros(2, 12, dtype=torch.bool)
    mm[:, 1:9] = True
    pos = model.llm.model.rotary_emb(x, torch.arange(12).expand(2, 12))

    def layer(x):
        return block(x, base, pos, mm, AttnMask(causal=True))[0]

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x), layer(x)
    assert_close_to_scale(out, ref, "block output")
    (g_c,) = torch.autograd.grad(out.sum(), x)
    (g_r,) = torch.autograd.grad(ref.sum(), x)
    assert_close_to_scale(g_c, g_r, "input gradient")
