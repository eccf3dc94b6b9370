"""Peers against their authors' code: the same random weights in both, the logits compared (docs/peers.md
"Fidelity").

    python scripts/fidelity.py lavin --src DIR           # DIR: a checkout of luogen1996/LaVIN (dd0a1bf)
    python scripts/fidelity.py llama_adapter --src DIR   # DIR: a checkout of OpenGVLab/LLaMA-Adapter (521a09d)

Both run the authors' blocks (TransformerBlock, Attention with their RoPE, RMSNorm, FeedForward) holding our
weights: a random tiny Llama-2 (MHA, random norms) in transformers' layout, its q/k rows permuted back to Meta's
interleaved RoPE layout for their side; `.half()` is a no-op while their code runs (their fp16 casts: everything
is fp32 here). Printed: max |ours - theirs| / max |theirs|, at zero init and with every trainable random, and each
side's zero-init text-only row against the frozen LLM.

LaVIN: lavin/model.py (Transformer.forward, insert_image_embeds, AdapterMLP) and lavin/mm_adapter.py
(RepAdapter_Router, set_MMAdapter) unmodified but for their fairscale / timm / clip imports, stubbed (nothing of
them is used by the training model without its CLIP), and the loss swapped for a hook that keeps the logits. Their
CLIP is not run: both sides get the same CLS features (our LaVIN with `clip_adapters: false`; the CLIP-side
routing is a documented deviation). An image row and a text-only row ("Image: N/A" prefix, as their generator
builds it).

LLaMA-Adapter: alpaca_finetuning_v1/llama/model.py (the text-only V1: adaption prompts in the top layers, one
zero-init tanh gate per head, a separate softmax over the prompts) unmodified; its Transformer.forward is
re-stated here in its own 10 lines because it reshapes the prompts with a hard-coded 4096 (LLaMA-7B's width).
Our LLaMA-Adapter with `multimodal: false` (the image MLP is a reconstruction, not in their code).
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
from pipeline.model.peers.llama_adapter import LlamaAdapter, LlamaAdapterConfig

D, L, H, V, FFN, W, K = 64, 3, 4, 300, 128, 1024, 6
PROMPTS, ADAPTED = 10, 2  # LLaMA-Adapter: prompt length, adapted top layers (of L)


def load_lavin(src: Path) -> types.ModuleType:
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


def copy_block(blk: nn.Module, base: nn.Module) -> None:
    """A transformers Llama decoder layer's weights into the authors' TransformerBlock (Meta's layout)."""
    a, f = blk.attention, blk.feed_forward
    f.w1, f.w2, f.w3 = base.mlp.gate_proj, base.mlp.down_proj, base.mlp.up_proj  # (their hidden sizes differ)
    a.wq.weight.copy_(meta_layout(base.self_attn.q_proj.weight, H))
    a.wk.weight.copy_(meta_layout(base.self_attn.k_proj.weight, H))
    a.wv.weight.copy_(base.self_attn.v_proj.weight)
    a.wo.weight.copy_(base.self_attn.o_proj.weight)
    blk.attention_norm.weight.copy_(base.input_layernorm.weight)
    blk.ffn_norm.weight.copy_(base.post_attention_layernorm.weight)


def copy_ends(t: nn.Module, llm: nn.Module) -> None:
    """Embedding, final norm and LM head into the authors' Transformer."""
    t.tok_embeddings.weight.copy_(llm.model.embed_tokens.weight)
    t.norm.weight.copy_(llm.model.norm.weight)
    t.output.weight.copy_(llm.lm_head.weight)


def tiny_llama() -> LlamaForCausalLM:
    """A random tiny Llama-2 (MHA, untied) with random norms, so a missing one shows."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=FFN, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=H, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    llm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for q in llm.parameters():
            if q.dim() == 1:
                q.copy_(1 + 0.3 * torch.randn_like(q))
    return llm


def randomize(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for name, q in model.named_parameters():
            if model.is_trainable(name, model.cfg.stage):
                q.copy_(torch.randn(q.shape, generator=g) * 0.2)


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
    with torch.no_grad():
        copy_ends(t, ours.llm)
        for blk, base, ad in zip(t.layers, ours.llm.model.layers, ours.adapters):
            copy_block(blk, base)
            r = blk.adapter_attn
            pairs = ((r.conv_A, ad.down), (r.conv_B, ad.up[0]), (r.conv_D, ad.up[1]), (r.expert_weights, ad.router))
            for dst, src in pairs:
                dst.load_state_dict(src.state_dict())
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


def compare_lavin(src: Path) -> None:
    lavin = load_lavin(src)
    llm = tiny_llama()
    model = LaVIN(llm, LaVINConfig(clip_adapters=False, dropout=0.0)).eval()
    g = torch.Generator().manual_seed(1)
    bos_rest = torch.randint(3, V, (40,), generator=g)
    prefix_img, prefix_txt = torch.randint(3, V, (3,), generator=g), torch.randint(3, V, (5,), generator=g)
    feats = torch.randn(1, K, W, generator=g)
    t = authors_model(lavin, model, 64)
    with torch.no_grad():
        frozen = llm(torch.cat([bos_rest[:1], prefix_txt, bos_rest[1:]])[None]).logits
    ours0 = rel(ours_logits(model, bos_rest, prefix_txt, feats, False), frozen)
    theirs0 = rel(theirs_logits(t, bos_rest, prefix_txt, feats, False), frozen)
    print(f"lavin: zero init, text-only row vs the frozen LLM: ours {ours0:.2e}  theirs {theirs0:.2e}")
    for label in ("zero init", "every trainable random"):
        if label != "zero init":
            randomize(model, g)
            t = authors_model(lavin, model, 64)
        for row, prefix, img in (("image", prefix_img, True), ("text-only", prefix_txt, False)):
            ours = ours_logits(model, bos_rest, prefix, feats, img)
            theirs = theirs_logits(t, bos_rest, prefix, feats, img)
            print(f"lavin: {label}, {row} row: ours vs the authors' max relative difference {rel(ours, theirs):.2e}")


def load_module(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def adapter_theirs(m: types.ModuleType, ours: LlamaAdapter, ids: torch.Tensor) -> torch.Tensor:
    """Their Transformer (alpaca_finetuning_v1/llama/model.py) with our weights, its forward to the logits."""
    args = m.ModelArgs(dim=D, n_layers=L, n_heads=H, vocab_size=V, norm_eps=1e-5, adapter_len=PROMPTS)
    args.adapter_layer = ADAPTED
    t = m.Transformer(args)
    with torch.no_grad():
        copy_ends(t, ours.llm)
        for blk, base in zip(t.layers, ours.llm.model.layers):
            copy_block(blk, base)
        t.adapter_query.weight.copy_(ours.prompts.weight)
        for blk, gate in zip(t.layers[-ADAPTED:], ours.gates):
            blk.attention.gate.copy_(gate.view(1, H, 1, 1))
    # Their Transformer.forward to the logits, its prompt reshape at this width (theirs hard-codes 4096).
    seqlen = ids.shape[1]
    with fp32_everywhere(), torch.no_grad():
        h = t.tok_embeddings(ids)
        freqs_cis = t.freqs_cis[:seqlen]
        mask = torch.triu(torch.full((1, 1, seqlen, seqlen), float("-inf")), diagonal=1).type_as(h)
        for layer in t.layers[: -1 * ADAPTED]:
            h = layer(h, 0, freqs_cis, mask)
        adapter = t.adapter_query.weight.reshape(-1, PROMPTS, D).unsqueeze(1)
        for i, layer in enumerate(t.layers[-1 * ADAPTED :]):
            h = layer(h, 0, freqs_cis, mask, adapter[i].half())
        return t.output(t.norm(h))


def compare_llama_adapter(src: Path) -> None:
    m = load_module(src / "alpaca_finetuning_v1" / "llama" / "model.py", "llama_adapter_v1_model")
    llm = tiny_llama()
    cfg = LlamaAdapterConfig(multimodal=False, adapter_layers=ADAPTED, prompt_len=PROMPTS)
    model = LlamaAdapter(llm, cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 40), generator=g)
    with torch.no_grad():
        frozen = llm(ids).logits
        ours = model.output_logits(model(Batch(input_ids=ids)))
    theirs = adapter_theirs(m, model, ids)
    print(f"llama_adapter: zero init vs the frozen LLM: ours {rel(ours, frozen):.2e}  theirs {rel(theirs, frozen):.2e}")
    print(f"llama_adapter: zero init: ours vs the authors' max relative difference {rel(ours, theirs):.2e}")
    randomize(model, g)
    with torch.no_grad():
        ours = model.output_logits(model(Batch(input_ids=ids)))
    theirs = adapter_theirs(m, model, ids)
    print(f"llama_adapter: every trainable random: ours vs the authors' {rel(ours, theirs):.2e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=["lavin", "llama_adapter"])
    p.add_argument("--src", type=Path, required=True, help="checkout of the authors' repository")
    args = p.parse_args(argv)
    need = {"lavin": "lavin/model.py", "llama_adapter": "alpaca_finetuning_v1/llama/model.py"}[args.method]
    if not (args.src / need).is_file():
        p.error(f"--src {args.src}: no {need} there (a checkout of the authors' repository)")
    {"lavin": compare_lavin, "llama_adapter": compare_llama_adapter}[args.method](args.src)
    return 0


if __name__ == "__main__":
    sys.exit(main())
