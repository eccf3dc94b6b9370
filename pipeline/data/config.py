"""Configuration of the data pipeline (dataclasses, validated on construction).

`DataConfig` is the user-facing `data:` section of a training YAML (every field settable from YAML / `--set`).
What changes per stage or per rank (the sources, batch size, K, seed, rank) are arguments of `build_loader`, which
bundles them with the DataConfig into one `LoaderSpec` for the workers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, get_args

TASKS = ("auto", "caption", "scienceqa", "chat")
SQA_FORMATS = ("QCM-A", "QCM-ALE")
IMAGE_INPUTS = ("auto", "pixels", "features")
OVERFLOW = ("truncate", "skip", "error")
PromptFormat = Literal["auto", "llama2", "chat_template"]
PROMPT_FORMATS: tuple[str, ...] = get_args(PromptFormat)
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
    """The `data:` section of a training YAML."""

    max_length: int = 512
    """tokens per sample, visual positions included; truncation never cuts an image"""
    num_workers: int = 1
    """DataLoader worker processes per rank (0: read in the training process)"""
    shuffle_buffer: int = 1000
    """sample shuffle window per worker (0 disables); the epoch stays an exact permutation (docs/data.md)"""
    shuffle_shards: bool = True
    resampled: bool = False
    """draw shards with replacement (infinite stream); needs samples_per_epoch"""
    image_input: str = "auto"
    """pixels: use `{key}.jpg|png` (VPG runs in the model); features: use `{key}.feat.npy|pth` (precomputed);
    auto: features when the sample has them, else pixels"""
    image_size: int = 224
    image_mean: tuple[float, float, float] | None = None
    """None: pipeline.constants.IMAGE_MEAN (BLIP-2/CLIP)"""
    image_std: tuple[float, float, float] | None = None
    sqa_format: str = "QCM-ALE"
    use_captions: bool = False
    """ScienceQA context = hint + image caption (json field `caption`)"""
    system_message: str = DEFAULT_SYSTEM
    caption_instruction: str = "Describe the image briefly."
    """stage-1 instruction when a sample has no LLaVA conversation (e.g. img2dataset output)"""
    prompt_format: PromptFormat = "auto"
    """llama2: the paper's `[INST] ... [/INST]` turns; chat_template: the tokenizer's own chat template; auto:
    llama2 for a tokenizer without a template or with LLaMA-2's `[INST]` one, else chat_template (docs/data.md)"""
    pack: bool = False
    """concatenate the batch into one row with cu_seqlens / position_ids instead of padding"""
    log_skips: int = 20
    """log the first N skips per reason and worker with shard and key (all are counted)"""
    on_overflow: str = "truncate"
    """a sample longer than max_length: truncate (counted per source: samples, answer tokens lost), skip (counted
    as too_long) or error (stop, naming the shard and key)"""
    max_image_pixels: int = 64_000_000
    """images with more pixels (width x height, read from the header before decoding) are refused and counted as
    image_too_large: a small PNG can decode to gigabytes"""

    def __post_init__(self) -> None:
        for name, lo in (
            ("max_length", 8),
            ("num_workers", 0),
            ("shuffle_buffer", 0),
            ("image_size", 8),
            ("log_skips", 0),
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"data.{name} must be an integer >= {lo}, got {v!r}")
        if self.on_overflow not in OVERFLOW:
            raise ValueError(f"data.on_overflow must be {'|'.join(OVERFLOW)}, got {self.on_overflow!r}")
        px = self.max_image_pixels
        if isinstance(px, bool) or not isinstance(px, int) or px < 1:
            raise ValueError(f"data.max_image_pixels must be an integer >= 1, got {self.max_image_pixels!r}")
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"data.image_input must be {'|'.join(IMAGE_INPUTS)}, got {self.image_input!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"data.prompt_format must be {'|'.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if self.sqa_format not in SQA_FORMATS:
            raise ValueError(f"data.sqa_format must be {'|'.join(SQA_FORMATS)}, got {self.sqa_format!r}")
        for name in ("image_mean", "image_std"):
            v = getattr(self, name)
            if v is None:
                continue
            if len(v) != 3 or not all(isinstance(x, (int, float)) for x in v):
                raise ValueError(f"data.{name} must be three numbers (R, G, B), got {v!r}")
            if name == "image_std" and min(v) <= 0:
                raise ValueError(f"data.image_std must be > 0 per channel, got {v!r}")
            setattr(self, name, tuple(float(x) for x in v))
        for name in ("system_message", "caption_instruction"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"data.{name} must be a string, got {getattr(self, name)!r}")


@dataclass
class LoaderSpec:
    """Everything one rank's loader needs: the data config plus the per-stage / per-rank arguments of
    build_loader. Internal (built by build_loader); the workers read it."""

    data: DataConfig
    sources: list[SourceConfig]
    batch_size: int
    """samples per batch before bad samples are dropped (a batch never grows back; see docs/data.md)"""
    num_query_tokens: int
    """K: placeholder positions per image"""
    seed: int = 0
    samples_per_epoch: int | None = None
    """global samples per epoch over all ranks; None: the shard counts (index / img2dataset stats / tar scan)"""
    rank: int | None = None
    """None: $RANK (else 0). Passed explicitly so webdataset's single_node_only splitter never runs"""
    world_size: int | None = None
    global_batch: int | None = None
    """samples per optimizer step over all ranks (micro-batch x world x accumulation); a mix of sources holds per
    global batch (pipeline.data.mix). None: batch_size x world_size"""

    def __post_init__(self) -> None:
        if isinstance(self.sources, SourceConfig):
            self.sources = [self.sources]
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("build_loader: sources is empty")
        for name, lo in (("batch_size", 1), ("num_query_tokens", 1)):
            if getattr(self, name) < lo:
                raise ValueError(f"build_loader: {name} must be >= {lo}, got {getattr(self, name)}")
        if self.data.max_length <= self.num_query_tokens + 4:
            raise ValueError(
                f"data.max_length {self.data.max_length} leaves no room for text around "
                f"{self.num_query_tokens} visual positions"
            )
        if self.data.resampled and not self.samples_per_epoch:
            raise ValueError("data.resampled needs samples_per_epoch (the stream is infinite)")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.rank is None:
            self.rank = int(os.environ.get("RANK", 0))
        if self.world_size is None:
            self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, world_size={self.world_size})")
        per_micro = self.batch_size * self.world_size
        if self.global_batch is None:
            self.global_batch = per_micro
        if self.global_batch < 1 or self.global_batch % per_micro:
            raise ValueError(
                f"global_batch {self.global_batch} is not a multiple of batch_size x world_size = {per_micro}"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique, got {names}")

    @property
    def workers_for_split(self) -> int:
        """num_workers=0 reads in the main process: one reader."""
        return max(1, self.data.num_workers)
