"""KV-cache decoding equals the full forward: gates and routing apply to cached visual keys/values."""

import torch

from pipeline.model import PILLConfig, load_pill
from pipeline.model.batch import Batch


def test_cached_decode_equals_full_forward_with_left_padding(tiny_gqa_dirs):
    cfg = PILLConfig(stage=2, rank=8, num_query_tokens=8, vpg_width=64, attn_backend="sdpa")
    model = load_pill(tiny_gqa_dirs["llm"], None, cfg, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    B, T = 2, 24
    ids = torch.randint(5, 400, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, :5] = 0  # left padding, as batched generation uses
    mm = torch.zeros(B, T, dtype=torch.bool)
    mm[0, 2:10] = True
    mm[1, 7:15] = True
    feats = torch.randn(2, 8, 64, generator=g)
    with torch.no_grad():
        full = model.output_logits(
            model(Batch(ids, attention_mask=attn, modality_mask=mm, image_features=feats), use_cache=True)
        )
        prefix = 16
        first = Batch(
            ids[:, :prefix], attention_mask=attn[:, :prefix], modality_mask=mm[:, :prefix], image_features=feats
        )
        out = model(first, use_cache=True)
        steps = [model.output_logits(out)]
        cache = out.kv_cache
        for t in range(prefix, T):
            step = Batch(ids[:, t : t + 1], attention_mask=attn[:, : t + 1], modality_mask=mm[:, t : t + 1])
            out = model(step, cache=cache, use_cache=True)
            cache = out.kv_cache
            steps.append(model.output_logits(out))
    stepped = torch.cat(steps, dim=1)
    real = attn.bool()
    torch.testing.assert_close(stepped[real], full[real], rtol=1e-4, atol=1e-5)
    assert cache[0][0].shape[1] == T and cache[0][2].shape == (B, T, 4)  # gate per query head, cached
