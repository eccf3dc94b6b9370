"""PILL on a tiny random Llama: init equals the frozen LLM, backends agree, stages train exactly their set."""

import pytest
import torch

from pipeline.model import PILLConfig, is_trainable, load_pill
from pipeline.model.batch import Batch
from pipeline.model.pill import PILL
from pipeline.training.loss import answer_loss
from tests.helpers import logits_of, loss_of

K, W = 8, 64  # the tiny VPG: 8 query tokens of width 64


def make(dirs, vpg=True, **kw):
    kw.setdefault("attn_backend", "eager")
    cfg = PILLConfig(rank=8, num_query_tokens=K, vpg_width=W, **kw)
    torch.manual_seed(1)
    return load_pill(dirs["llm"], dirs["vpg"] if vpg else None, cfg, dtype=torch.float32)


def randomize(model: PILL, seed=0):
    """Every adapter/gate/projection weight random and non-zero, so no path hides behind a zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(("llm.", "vpg.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def batch_with_images(vocab, B=2, T=40, seed=0):
    """Sample 0: two images at positions 3 and 20; sample 1: text only, right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mm = torch.zeros(B, T, dtype=torch.bool)
    mm[0, 3 : 3 + K] = True
    mm[0, 20 : 20 + K] = True
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 30:] = 0
    labels = torch.full_like(ids, -100)  # only the answer (the last tokens) is in the loss, as in real data
    labels[0, 34:] = ids[0, 34:]
    labels[1, 24:30] = ids[1, 24:30]
    feats = torch.randn(2, K, W, generator=g)
    return dict(input_ids=ids, modality_mask=mm, attention_mask=attn, labels=labels, image_features=feats)


@pytest.mark.parametrize("stage", [1, 2])
def test_text_only_init_equals_frozen_llm(tiny_dirs, stage):
    model = make(tiny_dirs, stage=stage)
    ids = torch.randint(5, 400, (2, 33), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = logits_of(model, input_ids=ids)
        ref = model.llm(ids).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_init_with_images_stage1_equals_llm_stage2_zero_gate(tiny_dirs):
    m1 = make(tiny_dirs, stage=1)
    b = batch_with_images(len(m1.tokenizer))
    emb = m1.llm.get_input_embeddings()(b["input_ids"])
    vis = m1.projection(b["image_features"]).reshape(-1, emb.shape[-1])
    emb = emb.masked_scatter(b["modality_mask"].unsqueeze(-1), vis)
    with torch.no_grad():
        ours1 = logits_of(m1, **b)
        ref = m1.llm(inputs_embeds=emb).logits
        torch.testing.assert_close(ours1, ref, rtol=0, atol=2e-5)

        # Stage 2 at init: the zero gate multiplies every visual value row by 0 -- the same as the frozen LLM
        # with v_proj's output zeroed at visual positions.
        m1.set_stage(2)
        m1.cfg.stage = 2
        ours2 = logits_of(m1, **b)
        keep = (~b["modality_mask"]).unsqueeze(-1).float()
        hooks = [
            layer.self_attn.v_proj.register_forward_hook(lambda mod, inp, out: out * keep)
            for layer in m1.llm.model.layers
        ]
        ref2 = m1.llm(inputs_embeds=emb).logits
        for h in hooks:
            h.remove()
    torch.testing.assert_close(ours2, ref2, rtol=0, atol=2e-5)
    assert (ours2 - ours1).abs().max() > 1e-3, "the zero gate must change outputs after the first visual token"


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("stage", [1, 2])
def test_eager_and_sdpa_agree_in_output_and_every_gradient(tiny_dirs, tiny_gqa_dirs, gqa, stage):
    dirs = tiny_gqa_dirs if gqa else tiny_dirs
    results = {}
    for backend in ("eager", "sdpa"):
        model = make(dirs, stage=stage, attn_backend=backend)
        randomize(model)
        b = batch_with_images(len(model.tokenizer))
        out = model(Batch(**b))
        answer_loss(model, Batch(**b), out).backward()
        results[backend] = (
            model.output_logits(out).detach(),
            {n: p.grad.clone() for n, p in model.trainable_parameters()},
        )
    (le, ge), (ls, gs) = results["eager"], results["sdpa"]
    assert_close_to_scale(ls, le)
    assert ge.keys() == gs.keys() and len(ge) > 0
    for n in ge:
        assert_close_to_scale(gs[n], ge[n], n)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, name: str = "", rel: float = 1e-4) -> None:
    """fp32 reorderings differ by ~1e-6 of a tensor's scale; an elementwise rtol fails on its near-zero entries."""
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale + 1e-8, f"{name}: max |diff| {err:.3g} > {rel} x scale {scale:.3g}"


@pytest.mark.parametrize("stage", [1, 2])
def test_gradients_reach_exactly_the_stage_set(tiny_dirs, stage):
    model = make(tiny_dirs, stage=stage)
    randomize(model)
    b = batch_with_images(len(model.tokenizer))
    loss_of(model, **b).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    expected = {n for n, _ in model.named_parameters() if is_trainable(n, stage)}
    assert {n for n, _ in model.trainable_parameters()} == expected
    if stage == 2:
        # A visual token's last-layer output reaches no loss term (answers come after the prompt), so the last
        # A_v has no gradient in stage 2; stage 1 inverts the last layer's routing for exactly this reason.
        last = len(model.blocks) - 1
        expected = {n for n in expected if not n.startswith(f"blocks.{last}.adapter_v.")}
    assert with_grad == expected, (sorted(expected - with_grad)[:5], sorted(with_grad - expected)[:5])
    assert not any(n.startswith(("llm.", "vpg.")) for n in with_grad)
    groups = {n.split(".")[2] for n in expected if n.startswith("blocks.")}
    assert groups == ({"adapter_v"} if stage == 1 else {"adapter_v", "adapter_t", "attn_adapter", "gate"})


def test_stage1_last_layer_routing_flag(tiny_dirs):
    """With the flag off, stage 1 leaves the last layer's A_v without gradient (the reason the flag exists)."""
    for flag, expect_grad in ((True, True), (False, False)):
        model = make(tiny_dirs, stage=1, invert_last_layer_routing=flag)
        randomize(model)
        loss_of(model, **batch_with_images(len(model.tokenizer))).backward()
        last = model.blocks[-1].adapter_v.u.weight.grad
        assert (last is not None and last.abs().sum() > 0) == expect_grad


def test_pixels_through_vpg_equal_precomputed_features(tiny_dirs):
    model = make(tiny_dirs, stage=2)
    randomize(model)
    b = batch_with_images(len(model.tokenizer))
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    b.pop("image_features")
    with torch.no_grad():
        feats = model.vpg(pixels)
        a = logits_of(model, **b, pixel_values=pixels)
        c = logits_of(model, **b, image_features=feats)
    assert feats.shape == (2, K, W)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    model.train()
    assert not model.vpg.training and not model.llm.training  # Q-former dropout stays off


@pytest.mark.parametrize(
    "variant",
    [dict(momae=False), dict(mag=False), dict(adapter_act="gelu"), dict(adapter_act="none"), dict(attn_adapter=False)],
)
def test_ablation_variants_run_and_keep_init_identity(tiny_dirs, variant):
    model = make(tiny_dirs, stage=2, **variant)
    ids = torch.randint(5, 400, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, input_ids=ids), model.llm(ids).logits, rtol=0, atol=2e-5)
    randomize(model)
    loss_of(model, **batch_with_images(len(model.tokenizer))).backward()
    names = {n.split(".")[2] for n, _ in model.trainable_parameters() if n.startswith("blocks.")}
    assert ("adapter_ffn" in names) == (variant.get("momae") is False)
    assert ("gate" in names) == variant.get("mag", True)
    assert ("attn_adapter" in names) == variant.get("attn_adapter", True)


def test_save_and_reload_trainables_only_bit_exact(tiny_dirs, tmp_path):
    model = make(tiny_dirs, stage=2)
    randomize(model, seed=7)
    path = model.save_adapter(tmp_path / "export")
    size = (path / "adapter_model.safetensors").stat().st_size
    n_trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert size < n_trainable * 4 + 64 * 1024  # trainables only, fp32, plus a small header
    other = make(tiny_dirs, stage=2)
    other.load_adapter(path)
    for (n, p), (n2, p2) in zip(model.trainable_parameters(), other.trainable_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    b = batch_with_images(len(model.tokenizer))
    with torch.no_grad():
        assert torch.equal(logits_of(model, **b), logits_of(other, **b))
    # A stage-1 export loads into a stage-2 model (stage 2 starts from stage 1) and sets only P and A_v.
    s1 = make(tiny_dirs, stage=1)
    randomize(s1, seed=9)
    s1.save_adapter(tmp_path / "s1")
    fresh = make(tiny_dirs, stage=2)
    before = fresh.blocks[0].attn_adapter.d1.weight.clone()
    assert fresh.load_adapter(tmp_path / "s1")["pill_config"]["stage"] == 1
    assert torch.equal(fresh.projection.weight, s1.projection.weight)
    assert torch.equal(fresh.blocks[1].adapter_v.u.weight, s1.blocks[1].adapter_v.u.weight)
    assert torch.equal(fresh.blocks[0].attn_adapter.d1.weight, before)


def test_adapter_from_different_config_is_rejected(tiny_dirs, tmp_path):
    model = make(tiny_dirs, stage=2)
    model.save_adapter(tmp_path / "e")
    other = make(tiny_dirs, stage=2, momae=False)
    with pytest.raises(ValueError, match="missing=.*adapter_ffn"):
        other.load_adapter(tmp_path / "e")


def test_save_adapter_with_external_master_weights(tiny_dirs, tmp_path):
    """The trainer exports DeepSpeed's fp32 master copies through save_adapter(state_dict=...)."""
    model = make(tiny_dirs, stage=1)
    master = {n: torch.full_like(p, 0.5) for n, p in model.trainable_parameters()}
    model.save_adapter(tmp_path / "m", state_dict=master)
    other = make(tiny_dirs, stage=1)
    other.load_adapter(tmp_path / "m")
    assert all(torch.equal(p, master[n]) for n, p in other.trainable_parameters())
    with pytest.raises(ValueError, match="missing=.*projection.weight"):
        model.save_adapter(tmp_path / "bad", state_dict={k: v for k, v in master.items() if k != "projection.weight"})


@pytest.mark.parametrize("stage", [1, 2])
def test_a_batch_without_images_gives_gradients_to_the_same_parameters(tiny_dirs, stage):
    """ZeRO-2 reduces gradients in hook order: a rank whose micro-batch has no image (ScienceQA has text-only
    questions) must produce a gradient, zero where unused, for exactly the parameters the other ranks do."""
    model = make(tiny_dirs, stage=stage)
    randomize(model)
    b = batch_with_images(len(model.tokenizer))
    with_img = dict(b)
    loss_of(model, **with_img).backward()
    seen_with = {n for n, p in model.trainable_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    text_only = {k: v for k, v in b.items() if k not in ("image_features", "pixel_values")}
    text_only["modality_mask"] = torch.zeros_like(b["modality_mask"])
    loss_of(model, **text_only).backward()
    seen_without = {n for n, p in model.trainable_parameters() if p.grad is not None}
    assert seen_without == seen_with, sorted(seen_with ^ seen_without)
    assert model.projection.weight.grad.abs().sum() == 0
