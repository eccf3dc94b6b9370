"""Configuration of the data pipeline (dataclasses, validated on construction)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

TASKS = ("auto", "caption", "scienceqa", "chat")
SQA_FORMATS = ("QCM-A", "QCM-ALE")
DEFAULT_SYSTEM = (
    "You are a helpful assistant. Look at the image (if any), read the question, context and options, "
    "and answer with the letter of the correct option."
)


@dataclass
class SourceConfig:
    shards: str | list[str]
    """brace pattern (`dir/train-{000000..000002}.tar`), a list of them, a directory (all its `*.tar`), or a
    `*-index.json` written by the shard builders"""
    task: str = "auto"
    """prompt template: caption (stage 1), scienceqa, chat (multi-turn), auto (from the sample's json fields)"""
    weight: float = 1.0
    """relative sampling weight when several sources are mixed"""
    name: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"SourceConfig.task must be one of {TASKS}, got {self.task!r}")
        if not self.weight > 0:
            raise ValueError(f"SourceConfig.weight must be > 0, got {self.weight}")
        if not self.shards:
            raise ValueError("SourceConfig.shards is empty")
        self.name = self.name or (self.shards if isinstance(self.shards, str) else self.shards[0])


@dataclass
class DataConfig:
    sources: list[SourceConfig]
    batch_size: int = 4
    """samples per batch before bad samples are dropped (a batch never grows back; see docs/data.md)"""
    max_len: int = 512
    """tokens per sample, visual positions included; truncation never cuts an image"""
    num_query_tokens: int = 32
    """K: placeholder positions per image"""
    image_size: int = 224
    image_mean: tuple[float, float, float] | None = None
    """None: pipeline.model.IMAGE_MEAN (BLIP-2/CLIP)"""
    image_std: tuple[float, float, float] | None = None
    seed: int = 0
    shuffle_buffer: int = 1000
    """sample shuffle buffer per worker (0 disables)"""
    shuffle_shards: bool = True
    resampled: bool = False
    """draw shards with replacement (infinite stream); needs samples_per_epoch"""
    samples_per_epoch: int | None = None
    """global samples per epoch over all ranks; None: the shard counts (index / img2dataset stats / tar scan)"""
    num_workers: int = 2
    rank: int | None = None
    """None: $RANK (else 0). Passed explicitly so webdataset's single_node_only splitter never runs"""
    world_size: int | None = None
    pack: bool = False
    """concatenate the batch into one row with cu_seqlens / position_ids instead of padding"""
    sqa_format: str = "QCM-ALE"
    use_captions: bool = False
    """ScienceQA context = hint + image caption (json field `caption`)"""
    system_message: str = DEFAULT_SYSTEM
    caption_instruction: str = "Describe the image briefly."
    """stage-1 instruction when a sample has no LLaVA conversation (e.g. img2dataset output)"""
    image_input: str = "auto"
    """pixels: use `{key}.jpg|png` (VPG runs in the model); features: use `{key}.feat.npy|pth` (precomputed);
    auto: features when the sample has them, else pixels"""
    log_skips: int = 20
    """log the first N skips per reason and worker with shard and key (all are counted)"""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.sources, SourceConfig):
            self.sources = [self.sources]
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("DataConfig.sources is empty")
        for name, v, lo in (("batch_size", self.batch_size, 1), ("max_len", self.max_len, 8),
                            ("num_query_tokens", self.num_query_tokens, 1), ("image_size", self.image_size, 8),
                            ("shuffle_buffer", self.shuffle_buffer, 0), ("num_workers", self.num_workers, 0)):
            if v < lo:
                raise ValueError(f"DataConfig.{name} must be >= {lo}, got {v}")
        if self.max_len <= self.num_query_tokens + 4:
            raise ValueError(f"max_len {self.max_len} leaves no room for text around {self.num_query_tokens} "
                             "visual positions")
        if self.image_input not in ("auto", "pixels", "features"):
            raise ValueError(f"DataConfig.image_input must be auto, pixels or features, got {self.image_input!r}")
        if self.sqa_format not in SQA_FORMATS:
            raise ValueError(f"DataConfig.sqa_format must be one of {SQA_FORMATS}, got {self.sqa_format!r}")
        if self.resampled and not self.samples_per_epoch:
            raise ValueError("DataConfig.resampled needs samples_per_epoch (the stream is infinite)")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, world_size={self.world_size})")

    @property
    def workers_for_split(self) -> int:
        """num_workers=0 reads in the main process: one reader."""
        return max(1, self.num_workers)
