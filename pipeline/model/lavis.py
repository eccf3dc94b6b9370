"""LAVIS-format BLIP-2 checkpoints mapped onto transformers' BLIP-2 module names, without importing LAVIS.

LAVIS 1.0.2 pins transformers < 4.27, so we read its `.pth` files directly:
- the Q-former file PILL uses (blip2_pretrained_flant5xxl.pth): `Qformer.bert.*`, `query_tokens`,
  `ln_vision.*` (the ViT's final LayerNorm), plus projections into the LLM that we do not use;
- EVA ViT-g (eva_vit_g.pth): `blocks.{i}.*`, `patch_embed.*`, `pos_embed`, `cls_token`. BLIP-2 drops the
  last block (39 of 40), so blocks past the configured depth are ignored.
Keys that belong to parts PILL never runs (text embeddings, the LLM projection, ITM/ITC heads) are dropped;
anything else unknown is an error that lists the keys, so a wrong file never loads half-way.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

_IGNORED = re.compile(
    r"^(t5_proj|opt_proj|llm_proj|vision_proj|text_proj|itm_head|temp|t5_model|opt_model|llm_model|"
    r"Qformer\.cls|Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)|"
    r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.)"
)
_VIT_IGNORED = re.compile(r"^(head\.|norm\.|fc_norm\.|lm_head\.|rel_pos_bias\.)")


def _load_pth(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LAVIS checkpoint {path} does not exist")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return obj.get("model", obj) if isinstance(obj, dict) else obj


def _map_qformer_key(key: str) -> str:
    key = key.replace("Qformer.bert.embeddings.LayerNorm", "qformer.layernorm")
    key = key.replace("Qformer.bert.", "qformer.")
    key = key.replace(".attention.self.", ".attention.attention.").replace(
        ".crossattention.self.", ".crossattention.attention."
    )
    return key


def _map_vit_key(key: str) -> str | None:
    key = key.removeprefix("visual_encoder.")
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    if key in fixed:
        return "vision_model." + fixed[key]
    m = re.match(r"blocks\.(\d+)\.(.*)", key)
    if not m:
        return None
    rest = m.group(2).replace("norm1.", "layer_norm1.").replace("norm2.", "layer_norm2.")
    rest = re.sub(r"^attn\.", "self_attn.", rest)
    rest = rest.replace("self_attn.proj.", "self_attn.projection.")
    return f"vision_model.encoder.layers.{m.group(1)}.{rest}"


def lavis_to_hf(
    qformer_pth: str | Path, vit_pth: str | Path | None, vit_depth: int, expected: set[str] | None = None
) -> dict[str, torch.Tensor]:
    """Merge a LAVIS Q-former file and an EVA ViT file into one transformers-named VPG state dict.

    With `expected` (the VPG's own key names), a key that maps to nothing there is reported under its
    original LAVIS name."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected: list[str] = []
    sources = [("qformer", qformer_pth)] + ([("vit", vit_pth)] if vit_pth is not None else [])
    for kind, path in sources:
        for key, t in _load_pth(path).items():
            if _IGNORED.match(key):
                continue
            before = set(out)
            if key == "query_tokens":
                out["query_tokens"] = t
            elif key.startswith("ln_vision."):
                out["vision_model.post_layernorm." + key.split(".", 1)[1]] = t
            elif key.startswith("Qformer.bert."):
                out[_map_qformer_key(key)] = t
            elif kind == "vit" or key.startswith("visual_encoder."):
                bare = key.removeprefix("visual_encoder.")
                if _VIT_IGNORED.match(bare):
                    continue
                m = re.match(r"blocks\.(\d+)\.", bare)
                if m and int(m.group(1)) >= vit_depth:
                    continue  # BLIP-2 uses the second-last block's output
                mapped = _map_vit_key(key)
                if mapped is None:
                    unexpected.append(f"{path}:{key}")
                else:
                    out[mapped] = t
            else:
                unexpected.append(f"{path}:{key}")
            origin.update({k: f"{path}:{key}" for k in set(out) - before})
    if expected is not None:
        bias = re.compile(r"(.*self_attn\.)(q_bias|v_bias)$")
        unexpected += sorted(origin[k] for k in out if k not in expected and not bias.match(k))
    if unexpected:
        raise ValueError(f"LAVIS checkpoint has {len(unexpected)} unexpected key(s): {unexpected}")
    # LAVIS keeps q and v biases apart and has no k bias; transformers stores one qkv bias.
    for i in range(vit_depth):
        pre = f"vision_model.encoder.layers.{i}.self_attn."
        qb, vb = out.pop(pre + "q_bias", None), out.pop(pre + "v_bias", None)
        if qb is not None and vb is not None:
            out[pre + "qkv.bias"] = torch.cat([qb, torch.zeros_like(vb), vb])
    return out


def hf_to_lavis(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The inverse mapping (Q-former file, ViT file); used by tests to build LAVIS-layout checkpoints."""
    qformer, vit = {}, {}
    inverse_fixed = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    }
    for key, t in state.items():
        if key == "query_tokens":
            qformer[key] = t
        elif key.startswith("vision_model.post_layernorm."):
            qformer["ln_vision." + key.rsplit(".", 1)[1]] = t
        elif key.startswith("qformer."):
            k = key.replace("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm")
            k = k.replace("qformer.", "Qformer.bert.")
            k = k.replace(".attention.attention.", ".attention.self.").replace(
                ".crossattention.attention.", ".crossattention.self."
            )
            qformer[k] = t
        else:
            k = key.removeprefix("vision_model.")
            if k in inverse_fixed:
                vit[inverse_fixed[k]] = t
                continue
            m = re.match(r"encoder\.layers\.(\d+)\.(.*)", k)
            rest = (
                m.group(2)
                .replace("layer_norm1.", "norm1.")
                .replace("layer_norm2.", "norm2.")
                .replace("self_attn.qkv.", "attn.qkv.")
                .replace("self_attn.projection.", "attn.proj.")
            )
            if rest == "attn.qkv.bias":
                d = t.shape[0] // 3
                vit[f"blocks.{m.group(1)}.attn.q_bias"] = t[:d]
                vit[f"blocks.{m.group(1)}.attn.v_bias"] = t[2 * d :]
            else:
                vit[f"blocks.{m.group(1)}.{rest}"] = t
    return qformer, vit
