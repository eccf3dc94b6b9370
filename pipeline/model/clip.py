"""The peers' frozen visual front end: CLIP ViT-L/14 through transformers' `CLIPVisionModel`, from a local dir.

LLaMA-Adapter, LaVIN, LLaMA-Excitor and IAA all read a frozen CLIP ViT-L/14 (PEERS_SPEC.md), each a different
part of it: CLS states after chosen blocks (LLaMA-Adapter's multi-scale global feature, LaVIN's six visual
tokens) or patch states (Excitor, IAA; LLaVA's convention: the penultimate block, CLS dropped). `CLIPFrontEnd`
runs the encoder block by block (calling each frozen layer's submodules, so ZeRO-3 hooks fire) and returns every
block's output, optionally with an adapter in front of each block's attention (LaVIN adapts CLIP too).

Sources: a transformers CLIP vision checkpoint dir (CLIPVisionModel or a full CLIPModel's vision tower), or
"tiny": a random CLIP ViT (`pipeline.model.tiny.build_tiny_clip`) built once under $PILL_TINY_DIR by
pipeline.model.frozen.load_clip.
Images use the data pipeline's normalisation, which is CLIP's (pipeline.constants).

Legend: N images, P patches (+1 CLS at index 0), W CLIP width, L blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

TINY_CLIP_VERSION = 1
# ViT-L/14 at 224 px (openai/clip-vit-large-patch14): the shape the peers' trainable counts assume.
VIT_L14 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=768,
)
BlockAdapter = Callable[[int, torch.Tensor], torch.Tensor]
"""(block index, layer-normed block input (N, P+1, W)) -> the input the block's attention reads."""


class CLIPFrontEnd(nn.Module):
    """pixel_values (N, 3, S, S) -> the output of every CLIP block. Always frozen (adapters live outside it)."""

    def __init__(self, model: CLIPVisionModel):
        super().__init__()
        self.model = model
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> CLIPFrontEnd:
        return super().train(False)  # frozen: CLIP's dropout (0 in the released configs) stays off

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None) -> CLIPFrontEnd:
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP front end: {path.resolve()} has no config.json (give a local transformers "
                "CLIP vision checkpoint dir, or 'tiny')"
            )
        kw = {"dtype": dtype} if dtype is not None else {}
        return cls(CLIPVisionModel.from_pretrained(str(path), local_files_only=True, **kw))

    @classmethod
    def from_config(cls, config: CLIPVisionConfig) -> CLIPFrontEnd:
        return cls(CLIPVisionModel(config))

    # ---- shape ---------------------------------------------------------------------------------------------------
    @property
    def config(self) -> CLIPVisionConfig:
        return self.model.config

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    # ---- forward -------------------------------------------------------------------------------------------------
    def _vision(self) -> nn.Module:
        return getattr(self.model, "vision_model", self.model)

    def blocks(self, pixel_values: torch.Tensor, adapter: BlockAdapter | None = None) -> list[torch.Tensor]:
        """[output of block 1, ..., block L], each (N, P+1, W). No grad unless an adapter is given."""
        vm = self._vision()
        dtype = vm.embeddings.patch_embedding.weight.dtype
        with torch.set_grad_enabled(adapter is not None and torch.is_grad_enabled()):
            h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(dtype)))
            outs = []
            for i, layer in enumerate(vm.encoder.layers):
                a = layer.layer_norm1(h)
                if adapter is not None:
                    a = adapter(i, a)
                h = h + layer.self_attn(hidden_states=a, attention_mask=None)[0]
                h = h + layer.mlp(layer.layer_norm2(h))
                outs.append(h)
        return outs

    def cls_features(
        self, pixel_values: torch.Tensor, layers: list[int], adapter: BlockAdapter | None = None
    ) -> torch.Tensor:
        """(N, len(layers), W): the CLS state after each listed block (1-based, as the papers count them)."""
        outs = self.blocks(pixel_values, adapter)
        return torch.stack([outs[i - 1][:, 0] for i in layers], dim=1)

    def patch_features(self, pixel_values: torch.Tensor, layer: int = -2) -> torch.Tensor:
        """(N, P, W): patch states (CLS dropped) after block `layer` (negative: from the end, -2 = penultimate)."""
        outs = self.blocks(pixel_values)
        return outs[layer if layer < 0 else layer - 1][:, 1:]


def evenly_spaced_layers(depth: int, n: int) -> list[int]:
    """n 1-based block indices ending at the last block, equally spaced: (4, 8, ..., 24) for 24 blocks, n=6."""
    if not 1 <= n <= depth:
        raise ValueError(f"cannot take {n} evenly spaced blocks of a {depth}-block CLIP")
    return [round(depth * (k + 1) / n) for k in range(n)]


def check_layers(layers: list[int], depth: int, field: str) -> None:
    bad = [i for i in layers if not 1 <= i <= depth]
    if bad or not layers:
        raise ValueError(f"{field}={layers}: CLIP blocks are numbered 1..{depth}")


def meta_clip(preset: dict | None = None) -> CLIPFrontEnd:
    """A CLIP front end on the meta device (no weights): for parameter counts (pipeline.params)."""
    with torch.device("meta"):
        return CLIPFrontEnd.from_config(CLIPVisionConfig(**(preset or VIT_L14)))


# ---- tiny random CLIP for tests and the demo ------------------------------------------------------------------------
def tiny_clip_config() -> CLIPVisionConfig:
    # Six blocks so LaVIN's "every fourth of 24 blocks" has a tiny analogue (one CLS per block); 32 px patches at
    # 224 px give 49 patch tokens, few enough for IAA's visual tokens to fit the demo's 160-token prompts.
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        image_size=224,
        patch_size=32,
        projection_dim=64,
        initializer_range=0.02,
    )


# ---- precomputed features (shards.encode --clip) -------------------------------------------------------------------
class CLIPFeatures(nn.Module):
    """The frozen CLIP features a peer reads, for `shards.encode --clip DIR --clip-features SPEC`.

    SPEC: "cls:4,8,12" (CLS states after those 1-based blocks: LLaMA-Adapter's multi-scale global feature, LaVIN's
    visual tokens), "patch:-2" (patch states of one block, CLS dropped: Excitor, IAA), or "method:<name>" (what that
    peer's default config reads on this CLIP: resolved by pipeline.model.methods.feature_spec first). Same
    interface as the BLIP-2 VPG: (N, 3, S, S) -> (N, K, W)."""

    def __init__(self, front_end: CLIPFrontEnd, spec: str):
        super().__init__()
        self.front_end = front_end
        self.spec = spec
        kind, _, arg = spec.partition(":")
        if kind == "cls":
            self.layers = [int(i) for i in arg.split(",") if i]
            check_layers(self.layers, front_end.num_layers, f"--clip-features {spec}")
        elif kind == "patch":
            self.layer = int(arg or -2)
            if not (-front_end.num_layers <= self.layer <= front_end.num_layers and self.layer != 0):
                raise ValueError(
                    f"--clip-features {spec}: block {self.layer} is not one of CLIP's {front_end.num_layers}"
                )
        else:
            raise ValueError(f"--clip-features {spec!r}: expected cls:<blocks> or patch:<block>")
        self.kind = kind

    @property
    def image_size(self) -> int:
        return self.front_end.image_size

    @property
    def width(self) -> int:
        return self.front_end.width

    @property
    def num_query_tokens(self) -> int:
        return len(self.layers) if self.kind == "cls" else self.front_end.num_patches

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.kind == "cls":
            return self.front_end.cls_features(pixel_values, self.layers)
        return self.front_end.patch_features(pixel_values, self.layer)
