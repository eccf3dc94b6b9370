"""LaVIN against its authors' code: the same random weights in both, the logits compared (docs/peers.md "Fidelity").

    python scripts/lavin_fidelity.py --lavin-src DIR      # DIR: a checkout of luogen1996/LaVIN (dd0a1bf)

The authors' lavin/model.py (Transformer.forward, insert_image_embeds, TransformerBlock, Attention, RMSNorm,
AdapterMLP, RoPE) and lavin/mm_adapter.py (RepAdapter_Router, set_MMAdapter) run unmodified but for three
things that do not change the math: their fairscale / timm / clip imports are stubbed (nothing of them is used
by the training model without its CLIP), `.half()` is a no-op while they run (their fp16 casts: everything is
fp32 here), and the loss is swapped for a hook that keeps the logits. Their CLIP is not run: both sides get the
same CLS features (our LaVIN with `clip_adapters: false`, which reads precomputed features; the CLIP-side
routing is a documented deviation). The LLM is a random tiny Llama-2 (MHA, random norms) in transformers' layout,
its q/k rows permuted back to Meta's interleaved RoPE layout for the authors' side.

Printed: max |ours - theirs| / max |theirs| over the real positions, for an image row and a text-only row
("Image: N/A" prefix, as their generator builds it), at zero init and with every trainable random; and each
side's zero-init text-only row against the frozen LLM.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.model.batch import Batch
from pipeline.model.peers.lavin import LaVIN, LaVINConfig

D, L, H, V, FFN, W, K = 64, 2, 4, 300, 128, 1024, 6


def load_authors(src: Path) -> types.ModuleType:
    """lavin.model and lavin.mm_adapter from the checkout, their unused heavy imports stubbed."""
    stub = types.ModuleType
    mods = {
        "fairscale": stub("fairscale"),
        "fairscale.nn": stub("fairscale.nn"),
        "fairscale.nn.model_parallel": stub("fairscale.nn.model_parallel"),
        "fairscale.nn.model_parallel.initialize": stub("fairscale.nn.model_parallel.initialize"),
        "fairscale.nn.model_parallel.layers": stub("fairscale.nn.model_parallel.layers"),
        "timm": stub("timm"),
        "timm.models": stub("timm.models"),
        "timm.models.layers": stub("timm.models.layers"),
        "clip": stub("clip"),
        "clip.model": stub("clip.model"),
        "lavin": stub("lavin"),
        "lavin.eval_model": stub("lavin.eval_model"),
    }
    for name in ("ParallelEmbedding", "RowParallelLinear", "ColumnParallelLinear"):
        setattr(mods["fairscale.nn.model_parallel.layers"], name, None)
    mods["fairscale.nn"].model_parallel = mods["fairscale.nn.model_parallel"]
    mods["fairscale.nn.model_parallel"].initialize = mods["fairscale.nn.model_parallel.initialize"]
    mods["timm.models.layers"].DropPath = nn.Identity
    mods["clip.model"].ResidualAttentionBlock = type("ResidualAttentionBlock", (nn.Module,), {})
    mods["lavin.eval_model"].TransformerBlock = type("EvalTransformerBlock", (nn.Module,), {})
    mods["lavin"].__path__ = []
    mods["lavin"].eval_model = mods["lavin.eval_model"]
    sys.modules.update(mods)
    for name in ("model", "mm_adapter"):
        spec = importlib.util.spec_from_file_location(f"lavin.{name}", src / "lavin" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[f"lavin.{name}"] = mod
        setattr(mods["lavin"], name, mod)
        spec.loader.exec_module(mod)
    return mods["lavin"]


@contextlib.contextmanager
def fp32_everywhere():
    """Their `.half()` casts (fp16 training) as no-ops: the comparison is of the math, in fp32."""
    half = torch.Tensor.half
    torch.Tensor.half = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.half = half


def meta_layout(w: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half q/k rows -> Meta's interleaved pairs (the inverse of HF's conversion permute)."""
    out, inp = w.shape
    return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def authors_model(lavin, ours: LaVIN, seqlen: int):
    """Their Transformer (without its CLIP) holding our LaVIN's weights."""
    m = lavin.model
    args = m.ModelArgs(dim=D, n_layers=L, n_heads=H, vocab_size=V, norm_eps=1e-5, max_seq_len=seqlen)
    t = m.Transformer.__new__(m.Transformer)
    nn.Module.__init__(t)
    t.params, t.vocab_size, t.n_layers = args, V, L
    t.tok_embeddings = nn.Embedding(V, D)
    t.layers = nn.ModuleList(m.TransformerBlock(i, args) for i in range(L))
    t.norm = m.RMSNorm(D, eps=args.norm_eps)
    t.output = nn.Linear(D, V, bias=False)
    t.freqs_cis = m.precompute_freqs_cis(D // H, seqlen * 2)
    t.adapter_proj = m.AdapterMLP(W, 128, D)
    t.adapter_modality_embedding = nn.Embedding(2, D)
    lavin.mm_adapter.set_MMAdapter(t, "attn", dim=8, s=1, t=10.0)
    llm = ours.llm.model
    with torch.no_grad():
        t.tok_embeddings.weight.copy_(llm.embed_tokens.weight)
        for blk, base, ad in zip(t.layers, llm.layers, ours.adapters):
            a, f = blk.attention, blk.feed_forward
            f.w1, f.w2, f.w3 = base.mlp.gate_proj, base.mlp.down_proj, base.mlp.up_proj  # (their sizes differ)
            a.wq.weight.copy_(meta_layout(base.self_attn.q_proj.weight, H))
            a.wk.weight.copy_(meta_layout(base.self_attn.k_proj.weight, H))
            a.wv.weight.copy_(base.self_attn.v_proj.weight)
            a.wo.weight.copy_(base.self_attn.o_proj.weight)
            blk.attention_norm.weight.copy_(base.input_layernorm.weight)
            blk.ffn_norm.weight.copy_(base.post_attention_layernorm.weight)
            r = blk.adapter_attn
            pairs = ((r.conv_A, ad.down), (r.conv_B, ad.up[0]), (r.conv_D, ad.up[1]), (r.expert_weights, ad.router))
            for dst, src in pairs:
                dst.load_state_dict(src.state_dict())
        t.norm.weight.copy_(llm.norm.weight)
        t.output.weight.copy_(ours.llm.lm_head.weight)
        t.adapter_proj.conv_A.load_state_dict(ours.projection.state_dict())
        t.adapter_proj.conv_B.load_state_dict(ours.projection_out[1].state_dict())
        t.adapter_modality_embedding.load_state_dict(ours.modality_embedding.state_dict())
    return t.eval()


def theirs_logits(t, bos_rest: torch.Tensor, prefix: torch.Tensor, feats, has_image: bool) -> torch.Tensor:
    """Logits at [BOS, prefix, (image), rest] from their forward (their positions 1.. = after the modality token)."""
    kept = []
    t.criterion = lambda out, labels: kept.append(out) or out.sum()
    pad = torch.zeros(prefix.numel() + K + 2, dtype=torch.long)  # their insert truncates to the input length
    examples = torch.cat([bos_rest, pad])[None]
    t.backbone = types.SimpleNamespace(encode_image=lambda images: feats)
    with fp32_everywhere(), torch.no_grad():
        t(examples, torch.zeros_like(examples), None, prefix, prefix, [1 if has_image else 0])
    n = bos_rest.numel() + prefix.numel() + (K if has_image else 0)
    return kept[0].view(1, examples.shape[1] - 1, V)[:, 1 : 1 + n]


def ours_logits(model: LaVIN, bos_rest, prefix, feats, has_image: bool) -> torch.Tensor:
    parts = [bos_rest[:1], prefix] + ([torch.zeros(K, dtype=torch.long)] if has_image else []) + [bos_rest[1:]]
    ids = torch.cat(parts)[None]
    mm = torch.zeros_like(ids, dtype=torch.bool)
    if has_image:
        mm[0, 1 + prefix.numel() : 1 + prefix.numel() + K] = True
    batch = Batch(input_ids=ids, modality_mask=mm, image_features=feats if has_image else None)
    with torch.no_grad():
        return model.output_logits(model(batch))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lavin-src", type=Path, required=True, help="checkout of luogen1996/LaVIN (dd0a1bf)")
    args = p.parse_args(argv)
    if not (args.lavin_src / "lavin" / "model.py").is_file():
        p.error(f"--lavin-src {args.lavin_src}: no lavin/model.py there (a checkout of luogen1996/LaVIN)")
    lavin = load_authors(args.lavin_src)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=H, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    llm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for q in llm.parameters():
            if q.dim() == 1:  # the norms: random, so a missing one shows
                q.copy_(1 + 0.3 * torch.randn_like(q))
    model = LaVIN(llm, LaVINConfig(clip_adapters=False, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    bos_rest = torch.randint(3, V, (40,), generator=g)
    prefix_img, prefix_txt = torch.randint(3, V, (3,), generator=g), torch.randint(3, V, (5,), generator=g)
    feats = torch.randn(1, K, W, generator=g)
    t = authors_model(lavin, model, 64)
    frozen = llm(torch.cat([bos_rest[:1], prefix_txt, bos_rest[1:]])[None]).logits.detach()
    ours0 = rel(ours_logits(model, bos_rest, prefix_txt, feats, False), frozen)
    theirs0 = rel(theirs_logits(t, bos_rest, prefix_txt, feats, False), frozen)
    print(f"zero init, text-only row vs the frozen LLM: ours {ours0:.2e}  theirs {theirs0:.2e}")
    for label in ("zero init", "every trainable random"):
        if label != "zero init":
            with torch.no_grad():
                for name, q in model.named_parameters():
                    if model.is_trainable(name, 2):
                        q.copy_(torch.randn(q.shape, generator=g) * 0.2)
            t = authors_model(lavin, model, 64)
        for row, prefix, img in (("image", prefix_img, True), ("text-only", prefix_txt, False)):
            ours = ours_logits(model, bos_rest, prefix, feats, img)
            theirs = theirs_logits(t, bos_rest, prefix, feats, img)
            print(f"{label}, {row} row: ours vs the authors' max relative difference {rel(ours, theirs):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
