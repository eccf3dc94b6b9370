"""PILL plugged into a frozen transformers Llama-family causal LM.

The frozen LLM keeps its weights, rotary embedding, norms, FFN and tokenizer; PILL owns the decoder-layer
forward (pipeline.model.block) so that its adapters and gate sit exactly where PILL_SPEC.md puts them. Visual
tokens: each image's K Q-former features, projected by P, overwrite the K placeholder positions that
`modality_mask` marks, image after image in row-major (batch, then time) order.

Legend: B batch, T tokens, D d_model, N images, K visual tokens per image, W Q-former width, V vocab.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.attention import AttnMask
from pipeline.model.block import KVCache, PILLBlock
from pipeline.model.config import PILLConfig
from pipeline.model.vpg import VPG

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_STAGE_MODULES = {
    1: ("adapter_v", "adapter_ffn"),
    2: ("adapter_v", "adapter_t", "adapter_ffn", "attn_adapter", "gate"),
}


def is_trainable(name: str, stage: int) -> bool:
    """The one predicate that decides both requires_grad and what save_adapter writes."""
    if name.startswith("projection."):
        return True
    m = re.match(r"blocks\.\d+\.([a-z_]+)\.", name)
    return bool(m) and m.group(1) in _STAGE_MODULES[stage]


@dataclass
class PILLOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, T, V)
    past_key_values: list[KVCache] | None = None


class PILL(nn.Module):
    def __init__(self, llm: nn.Module, cfg: PILLConfig, vpg: VPG | None = None, tokenizer=None):
        super().__init__()
        check_llm(llm.config, source="PILL(llm=...)")
        if vpg is not None and (vpg.width != cfg.vpg_width or vpg.num_query_tokens != cfg.num_query_tokens):
            raise ValueError(
                f"VPG gives {vpg.num_query_tokens} x {vpg.width} features per image but PILLConfig expects "
                f"num_query_tokens={cfg.num_query_tokens}, vpg_width={cfg.vpg_width} (the projection P's input)")
        self.cfg = cfg
        self.llm = llm
        self.vpg = vpg
        self.tokenizer = tokenizer
        c = llm.config
        self.projection = nn.Linear(cfg.vpg_width, c.hidden_size, bias=False)
        nn.init.normal_(self.projection.weight, std=cfg.projection_init_std)
        n = c.num_hidden_layers
        self.blocks = nn.ModuleList(
            PILLBlock(cfg, c.hidden_size, c.num_attention_heads, is_last=(i == n - 1)) for i in range(n))
        self.llm.requires_grad_(False)
        self.set_stage(cfg.stage)
        self.train(self.training)

    # ---- stages and parameters -----------------------------------------------------------------------------------
    def set_stage(self, stage: int) -> None:
        """requires_grad on exactly the stage's trainable set (PILL_SPEC.md's table); the rest is frozen."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.cfg.stage = stage
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name, stage))

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> PILL:
        super().train(mode)
        self.llm.eval()  # frozen: no dropout, whatever the config says (the VPG keeps itself in eval mode)
        return self

    def gate_magnitudes(self) -> list[float]:
        """Mean |tanh gate| over visual tokens and heads per layer, from the last forward (paper Fig. 4)."""
        return [float(b.last_gate_abs) if b.last_gate_abs is not None else 0.0 for b in self.blocks]

    # ---- forward -------------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None):
        """(N, K, W) Q-former features, or None when the batch has no image."""
        if image_features is not None:
            return image_features if image_features.numel() else None
        if pixel_values is None or pixel_values.numel() == 0:
            return None
        if self.vpg is None:
            raise ValueError("batch has pixel_values but the model was built without a VPG: give vpg_path, "
                             "or train on precomputed-feature shards (python -m shards.encode)")
        return self.vpg(pixel_values)

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T) or (B, S) with a cache; 1 = real token
        modality_mask: torch.Tensor | None = None,  # (B, T) bool
        labels: torch.Tensor | None = None,  # (B, T), -100 = ignored
        pixel_values: torch.Tensor | None = None,  # (N, 3, H, W)
        image_features: torch.Tensor | None = None,  # (N, K, W)
        position_ids: torch.Tensor | None = None,  # (B, T)
        cu_seqlens: torch.Tensor | None = None,  # (n_docs + 1,) int32, packed batches (B == 1)
        max_seqlen: int | None = None,
        past_key_values: list[KVCache] | None = None,
        use_cache: bool = False,
        **unused,
    ) -> PILLOutput:
        B, T = input_ids.shape
        if modality_mask is None:
            modality_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        modality_mask = modality_mask.bool()
        x = self.llm.get_input_embeddings()(input_ids)  # (B, T, D)

        feats = self.encode_images(pixel_values, image_features)  # (N, K, W)
        if feats is not None:
            vis = self.projection(feats.to(self.projection.weight.dtype)).to(x.dtype).reshape(-1, x.shape[-1])
            torch._assert_async(modality_mask.sum() == vis.shape[0],
                                "modality_mask must mark exactly N_images * K visual tokens")
            x = x.masked_scatter(modality_mask.unsqueeze(-1), vis)

        past_len = past_key_values[0][0].shape[1] if past_key_values else 0
        cached = past_key_values is not None or use_cache
        if position_ids is None:
            if cached and attention_mask is not None:  # left padding in batched generation
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=x.device).expand(B, T)
        mask = AttnMask(causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if cu_seqlens is not None:
            mask.doc_ids = torch.searchsorted(cu_seqlens[1:].long(), torch.arange(T, device=x.device),
                                              right=True)[None].expand(B, T)
        if cached and attention_mask is not None:
            mask.key_padding = attention_mask.bool()
        # Without a cache, batches are right-padded: under a causal mask a real token never sees a pad (pads
        # come after it), so no padding mask is needed and every backend takes its unmasked fast path.
        position_embeddings = self.llm.model.rotary_emb(x, position_ids)

        new_cache = []
        for i, (block, base) in enumerate(zip(self.blocks, self.llm.model.layers)):
            x, layer_cache = block(x, base, position_embeddings, modality_mask, mask,
                                   past_key_values[i] if past_key_values else None)
            new_cache.append(layer_cache)
        logits = self.llm.lm_head(self.llm.model.norm(x))  # (B, T, V)

        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return PILLOutput(loss=loss, logits=logits, past_key_values=new_cache if use_cache else None)

    # ---- trainable-weights-only save / load ----------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if is_trainable(n, self.cfg.stage)}

    def save_adapter(self, path: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """adapter_model.safetensors (the stage's trainable weights, fp32) + adapter_config.json.

        `state_dict` overrides the module's own values (e.g. DeepSpeed's fp32 master weights when the module holds
        bf16 copies); its keys must be exactly the stage's trainable set."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        own = self.adapter_state_dict()
        if state_dict is not None and set(state_dict) != set(own):
            raise ValueError(f"save_adapter: state_dict keys differ from the stage-{self.cfg.stage} trainable set: "
                             f"missing={sorted(set(own) - set(state_dict))[:5]} "
                             f"extra={sorted(set(state_dict) - set(own))[:5]}")
        state = {n: t.float().contiguous().cpu() for n, t in (state_dict or own).items()}
        tmp = path / (ADAPTER_WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(path / ADAPTER_WEIGHTS)
        c = self.llm.config
        meta = {"format": "pill-adapter-v1", "pill_config": self.cfg.to_dict(),
                "llm": {"model_type": c.model_type, "hidden_size": c.hidden_size,
                        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads},
                "keys": sorted(state)}
        (path / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))
        return path

    def load_adapter(self, path: str | Path) -> dict:
        """Load weights saved by save_adapter (any stage) onto this model; returns the saved config."""
        from safetensors.torch import load_file

        path = Path(path)
        for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            if not (path / f).is_file():
                raise FileNotFoundError(f"PILL adapter: {path / f} does not exist")
        meta = json.loads((path / ADAPTER_CONFIG).read_text())
        c = self.llm.config
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
            if meta["llm"][field] != getattr(c, field):
                raise ValueError(f"{path / ADAPTER_CONFIG}: llm.{field}={meta['llm'][field]} but the loaded LLM "
                                 f"has {getattr(c, field)}: the adapter was trained on a different LLM")
        state = load_file(str(path / ADAPTER_WEIGHTS))
        own = dict(self.named_parameters())
        saved_stage = meta["pill_config"]["stage"]
        expected = {n for n in own if is_trainable(n, saved_stage)}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{path / ADAPTER_WEIGHTS}: missing={missing[:10]} unexpected={unexpected[:10]} "
                             "(was it saved with a different PILLConfig: momae / mag / attn_adapter / adapter_act?)")
        with torch.no_grad():
            for n, t in state.items():
                if tuple(t.shape) != tuple(own[n].shape):
                    raise ValueError(f"{path / ADAPTER_WEIGHTS}: {n} has shape {tuple(t.shape)}, "
                                     f"model expects {tuple(own[n].shape)} (different rank?)")
                own[n].copy_(t.to(own[n].dtype))
        return meta


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (0 if there is none)."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    shift_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return total / (shift_labels != -100).sum().clamp(min=1)


def check_llm(config, source: str) -> None:
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type={getattr(config, 'model_type', None)!r} is not a Llama-architecture "
                         f"causal LM; PILL plugs into {SUPPORTED_MODEL_TYPES}")


def image_placeholder_id(tokenizer) -> int:
    """Token id written at visual positions before their embeddings are overwritten (never a new vocab entry)."""
    for tid in (tokenizer.unk_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    return 0
