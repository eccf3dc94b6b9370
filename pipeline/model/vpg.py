"""The frozen Visual Prompt Generator: BLIP-2's ViT + Q-former + K learned queries (transformers' modules).

Three ways in:
- `VPG.from_pretrained(dir)`: a transformers BLIP-2 checkpoint directory (config.json + safetensors). Only the
  `vision_model.*`, `qformer.*` and `query_tokens` tensors are read, so a Blip2ForConditionalGeneration
  checkpoint works without loading its language model.
- `VPG.from_lavis(qformer_pth, vit_pth, config_dir)`: LAVIS `.pth` files mapped onto the same modules
  (see pipeline.model.lavis); LAVIS itself is not imported.
- no VPG at all: the model takes precomputed Q-former features (N, K, width) as `image_features`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

from pipeline.constants import IMAGE_MEAN, IMAGE_STD  # noqa: F401  (BLIP-2's normalisation, one source)
from pipeline.model.lavis import lavis_to_hf

VPG_PREFIXES = ("vision_model.", "qformer.", "query_tokens")


class VPG(nn.Module):
    """pixel_values (N, 3, S, S) -> Q-former features (N, K, width). Always frozen."""

    def __init__(self, config: Blip2Config):
        super().__init__()
        self.config = config
        self.vision_model = Blip2VisionModel(config.vision_config)
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VPG:
        # Frozen: the Q-former's dropout must never randomise the features, whatever mode the parent is in.
        return super().train(False)

    @property
    def width(self) -> int:
        return self.config.qformer_config.hidden_size

    @property
    def num_query_tokens(self) -> int:
        return self.config.num_query_tokens

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        image_embeds = self.vision_model(pixel_values=pixel_values.to(dtype)).last_hidden_state  # (N, P+1, Wv)
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        out = self.qformer(
            query_embeds=queries,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device),
        ).last_hidden_state
        return out[:, : self.num_query_tokens]  # (N, K, width)

    # ---- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def from_config_dir(cls, path: str | Path) -> VPG:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"VPG: no config.json in {path} (expected a transformers BLIP-2 checkpoint dir)")
        return cls(Blip2Config.from_pretrained(str(path), local_files_only=True))

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VPG:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"VPG: checkpoint directory {path} does not exist")
        vpg = cls.from_config_dir(path)
        state = _read_safetensors_prefixes(path, VPG_PREFIXES)
        _load_strict(vpg, state, f"VPG checkpoint {path}")
        return vpg

    def save_pretrained(self, path: str | Path) -> None:
        """config.json + model.safetensors with transformers' BLIP-2 key names (vision/qformer/queries only)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(str(path))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))

    @classmethod
    def from_lavis(cls, qformer_pth: str | Path, vit_pth: str | Path | None, config_dir: str | Path) -> VPG:
        vpg = cls.from_config_dir(config_dir)
        state = lavis_to_hf(qformer_pth, vit_pth, vpg.config.vision_config.num_hidden_layers, set(vpg.state_dict()))
        _load_strict(vpg, state, f"LAVIS checkpoints {qformer_pth}, {vit_pth}")
        return vpg


def _read_safetensors_prefixes(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(path.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"VPG: no *.safetensors weights in {path}")
    state = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefixes):
                    state[key] = f.get_tensor(key)
    return state


def _load_strict(vpg: VPG, state: dict[str, torch.Tensor], source: str) -> None:
    expected = vpg.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the BLIP-2 VPG; missing={missing[:20]} "
            f"({len(missing)} in all), unexpected={unexpected[:20]} ({len(unexpected)} in all)"
        )
    bad = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if bad:
        shapes = [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in bad[:10]]
        raise ValueError(f"{source}: shape mismatch (key, file, model): {shapes}")
    vpg.load_state_dict(state, strict=True)
