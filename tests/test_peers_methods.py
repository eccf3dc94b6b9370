"""Each peer's own invariant: zero-init (or the frozen path) equals the frozen LLM, and Excitor's convex mix."""

import pytest
import torch

from pipeline.model.attention import AttnMask
from pipeline.model.batch import Batch
from pipeline.model.peers.excitor import excitor_attention
from pipeline.training.loss import answer_loss
from tests.test_peers_models import clip_dir, image_batch, logits, make, randomize  # noqa: F401  (fixture)


def text_ids(seed=3, B=2, T=25):
    return torch.randint(5, 400, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama_adapter", "excitor"])
def test_image_at_init_equals_the_frozen_llm_without_the_placeholders(name, tiny_dirs, clip_dir):  # noqa: F811
    """Zero gates: the image has no effect yet, and the hidden placeholders none at all (keys masked, RoPE
    positions not advanced): the text positions equal the frozen LLM on the prompt with them cut out."""
    model = make(name, tiny_dirs, clip_dir).eval()
    b = image_batch(model)
    keep = ~b.modality_mask[0]
    with torch.no_grad():
        ours = logits(model, b.replace(labels=None))[0, keep]
        ref = model.llm(b.input_ids[:1, keep]).logits[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=2e-5)


def test_lavin_at_init_is_the_frozen_llm_on_its_visual_tokens(tiny_dirs, clip_dir):  # noqa: F811
    """Zero-init up-projections: CLIP and the LLM layers are untouched, and the modality token is masked from every
    later token (the authors' lavin/model.py:319-320), so the frozen LLM run on the batch's embeddings with the
    visual tokens written in is exactly LaVIN at init, image row and text row alike."""
    model = make("lavin", tiny_dirs, clip_dir).eval()
    b = image_batch(model)
    with torch.no_grad():
        ours = logits(model, b)
        emb = model.llm.get_input_embeddings()(b.input_ids)
        feats = model.vpg.cls_features(b.pixel_values, model.cfg.clip_layers)  # the frozen CLIP, no adapter
        vis = model.projection_out(model.projection(feats)).reshape(-1, emb.shape[-1])
        emb = emb.masked_scatter(b.modality_mask.unsqueeze(-1), vis)
        ref = model.llm(inputs_embeds=emb, attention_mask=b.attention_mask).logits
    real = b.attention_mask.bool()  # (row 1's right padding is no one's business)
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=2e-5)
    randomize(model)
    with torch.no_grad():
        assert (logits(model, b) - ours).abs().max() > 1e-3


def test_lavin_modality_token_routes_and_is_never_attended(tiny_dirs, clip_dir):  # noqa: F811
    """With every trainable random: the modality embedding changes the output only through the routers (swapping
    the two embeddings changes the logits), and the text never attends to it: with equal expert weights forced,
    the output no longer depends on it at all."""
    model = make("lavin", tiny_dirs, clip_dir, dropout=0.0)
    randomize(model)
    model.eval()
    b = image_batch(model)
    with torch.no_grad():
        ours = logits(model, b)
        model.modality_embedding.weight.copy_(model.modality_embedding.weight.flip(0))
        assert (logits(model, b) - ours).abs().max() > 1e-3  # the routing weights follow the token
        for adapter in (*model.adapters, *model.clip_adapters):
            adapter.router.weight.zero_()  # routing weights 1/2, 1/2 whatever the token
            adapter.router.bias.zero_()
        before = logits(model, b)
        model.modality_embedding.weight.normal_()
        torch.testing.assert_close(logits(model, b), before, rtol=0, atol=0)


def test_iaa_text_rows_take_the_frozen_path_whatever_the_trainables(tiny_dirs, clip_dir):  # noqa: F811
    model = make("iaa", tiny_dirs, clip_dir)
    randomize(model)
    model.eval()
    b = image_batch(model)
    with torch.no_grad():
        out = logits(model, b.replace(labels=None))
        text_row = model.llm(b.input_ids[1:, :-4]).logits  # row 1's real tokens (the last 4 are pads)
        torch.testing.assert_close(out[1:, :-4], text_row, rtol=0, atol=2e-5)
        assert (out[0] - model.llm(b.input_ids[:1]).logits[0]).abs().max() > 1e-2  # the image path differs


def test_iaa_stages(tiny_dirs, clip_dir):  # noqa: F811
    model = make("iaa", tiny_dirs, clip_dir, stage=1)
    assert {n.split(".")[0] for n, _ in model.trainable_parameters()} == {"projection", "projection_out"}
    model.set_stage(2)
    assert {n.split(".")[0] for n, _ in model.trainable_parameters()} == {
        "projection",
        "projection_out",
        "adaptors",
        "mm_embed",
        "mm_norm",
        "mm_head",
    }
    assert model.insert_after == [0, 1]  # IAA-14's pattern on a 2-layer LLM
    from pipeline.model.peers.iaa import iaa_layers

    assert iaa_layers(32) == [0, 1, 5, 6, 10, 11, 15, 16, 20, 21, 25, 26, 30, 31]
    # adaptors start as copies of the frozen layer they follow
    a, f = model.adaptors[1], model.llm.model.layers[1]
    torch.testing.assert_close(a.self_attn.q_proj.weight, f.self_attn.q_proj.weight, rtol=0, atol=0)


def test_excitor_output_rows_are_convex_combinations_of_the_value_rows():
    """The paper's invariant: with the excitor on (any gate, any excitor keys), attention only re-weights the
    ORIGINAL values. With V = the identity, each output row IS its attention weights: >= 0, summing to 1, zero on
    future keys."""
    g = torch.Generator().manual_seed(0)
    B, T, H = 2, 9, 3
    q = torch.randn(B, T, H, T, generator=g)
    k = torch.randn(B, T, H, T, generator=g)
    key_ex = torch.randn(B, T, H, T, generator=g) * 3
    v = torch.eye(T).expand(B, H, T, T).permute(0, 2, 1, 3)  # (B, T, H, T): value row j = e_j
    for backend in ("eager", "sdpa"):
        w = excitor_attention(q, k, v, key_ex, torch.tensor(2.5), AttnMask(causal=True), T**-0.5, backend)
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(B, T, H))
        assert w.transpose(1, 2).triu(1).abs().max() == 0  # (B, H, Tq, Tk): nothing on future keys
        plain = excitor_attention(q, k, v, key_ex, torch.tensor(0.0), AttnMask(causal=True), T**-0.5, backend)
        assert (w - plain).abs().max() > 1e-2  # the excitor did change the weights


def test_excitor_eager_and_sdpa_agree_in_output_and_gradients(tiny_dirs, clip_dir):  # noqa: F811
    res = {}
    for backend in ("eager", "sdpa"):
        model = make("excitor", tiny_dirs, clip_dir, attn_backend=backend)
        randomize(model)
        b = image_batch(model)
        out = model(b)
        answer_loss(model, b, out).backward()
        res[backend] = (model.output_logits(out).detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()})
    (le, ge), (ls, gs) = res["eager"], res["sdpa"]
    torch.testing.assert_close(ls, le, rtol=1e-4, atol=1e-5)
    for n in ge:
        torch.testing.assert_close(gs[n], ge[n], rtol=1e-3, atol=1e-6, msg=n)


def test_iaa_text_only_batch_still_backpropagates(tiny_dirs, clip_dir):  # noqa: F811
    """A micro-batch of text rows only (e.g. images truncated away) takes the frozen path: its loss must still be a
    tensor DeepSpeed can call backward() on, with zero gradients for the trainables."""
    model = make("iaa", tiny_dirs, clip_dir)
    model.train()
    ids = text_ids()
    labels = ids.clone()
    loss = answer_loss(model, Batch(input_ids=ids, labels=labels))
    assert loss.requires_grad
    loss.backward()
    for p in (model.projection.weight, model.mm_head.weight):
        assert p.grad is not None and p.grad.abs().sum() == 0
    torch.testing.assert_close(loss.detach(), model.llm(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama_adapter", "lavin", "excitor", "iaa"])
def test_a_cache_continues_only_the_mode_that_wrote_it(name, tiny_dirs, clip_dir):  # noqa: F811
    """A KV cache written under adapters_off() holds the frozen LLM's keys (no prompt state, no routes): continuing
    it with the adapters on (or the other way round) is an error naming the mode, not a silently mixed decode."""
    model = make(name, tiny_dirs, clip_dir).eval()
    ids = text_ids()
    with torch.no_grad():
        with model.adapters_off():
            off = model(Batch(input_ids=ids), use_cache=True).kv_cache
        on = model(Batch(input_ids=ids), use_cache=True).kv_cache
        step = Batch(input_ids=ids[:, :1], attention_mask=torch.ones(ids.shape[0], ids.shape[1] + 1))
        with pytest.raises(ValueError, match="written with the adapters off"):
            model(step, cache=off, use_cache=True)
        with model.adapters_off(), pytest.raises(ValueError, match="written with the adapters on"):
            model(step, cache=on, use_cache=True)
        with model.adapters_off():  # the frozen decode continues its own cache
            model(step, cache=off, use_cache=True)
