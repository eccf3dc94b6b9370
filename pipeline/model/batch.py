"""`Batch`: what every method's forward receives, one typed record (the collator builds it; docs/INTERFACES.md).

A frozen dataclass, so a misspelt field is a TypeError naming it (`Batch(image_feature=...)`), and the field list
here is the one list of what a model consumes: the trainer, the bench and the evaluation move a Batch to the device
with `.to(device, dtype)` and pass it on whole, never a hand-kept set of keys.

Legend: B rows, T tokens, N images, K visual tokens per image, W feature width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

IGNORE_INDEX = -100
"""Label of a position that carries no loss (prompt, padding, visual placeholders)."""


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    """(B, T) token ids; K placeholder ids per image where `modality_mask` is True."""
    attention_mask: torch.Tensor | None = None
    """(B, T) 1 = real token, or (B, S) over cached + new tokens in generation; None: all real."""
    modality_mask: torch.Tensor | None = None
    """(B, T) bool: the visual-token positions, K per image, images in row-major order; None: no image."""
    labels: torch.Tensor | None = None
    """(B, T) next-token targets at answer positions, IGNORE_INDEX elsewhere (unshifted: position t predicts t+1)."""
    pixel_values: torch.Tensor | None = None
    """(N, 3, H, W) normalised images for the method's frozen front end."""
    image_features: torch.Tensor | None = None
    """(N, K, W) precomputed front-end features (python -m shards.encode), instead of pixel_values."""
    position_ids: torch.Tensor | None = None
    """(B, T) RoPE positions (packed batches: restarting at every document); None: from the attention mask."""
    cu_seqlens: torch.Tensor | None = None
    """(n_docs + 1,) int32 document boundaries of a packed batch (B == 1); no attention across documents."""
    max_seqlen: int | None = None
    """Longest document of a packed batch (None: computed where a backend needs it)."""
    source: torch.Tensor | None = None
    """(B,) int64: the index of the data source (stages[i].train_shards) each row came from; packed batches: one
    per document, in cu_seqlens order (mixed stages: a loss or a metric per source); None: one source."""
    num_samples: int | None = None
    """Samples in the batch (0 for the collator's dummy row of a batch whose every record failed); None: B."""
    meta: tuple[dict[str, Any], ...] | None = None
    """One dict per sample (key, shard, task + its json) with the collator's with_meta=True; never read by a model."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """A copy on `device`; floating tensors (pixels, features) also cast to `dtype` (the model's) when given."""
        moved = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                v = v.to(device, non_blocking=True)
                if dtype is not None and v.is_floating_point():
                    v = v.to(dtype)
            moved[f.name] = v
        return Batch(**moved)

    def replace(self, **changes: Any) -> Batch:
        """A copy with some fields changed (an unknown field is a TypeError naming it)."""
        return dataclasses.replace(self, **changes)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def samples(self) -> int:
        return self.rows if self.num_samples is None else self.num_samples

    def answer_tokens(self) -> int:
        """Positions the answer loss counts: shifted labels that are not IGNORE_INDEX (one host sync on a device
        batch; none on the collator's CPU copy)."""
        if self.labels is None:
            return 0
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def has_images(self) -> bool:
        return any(t is not None and t.numel() > 0 for t in (self.pixel_values, self.image_features))
