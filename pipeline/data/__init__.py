"""WebDataset streaming for PILL: shard lists, prompt templates, tokenisation, collation / packing.

Trainer API (docs/data.md):
    loader = build_loader(DataConfig(max_length=512), tokenizer,       # DataConfig: the YAML's `data:` section
                          sources=[SourceConfig("shards/demo/train-index.json", task="scienceqa")],
                          batch_size=4, num_query_tokens=K, seed=0, rank=rank, world_size=world)
    for batch in loader: ...            # one epoch; len(loader) batches on every rank
    loader.state_dict() / loader.load_state_dict(sd)   # resume mid-epoch, same sample sequence
    loader.skipped()                    # {reason: count} on this rank, all workers; reasons in SKIP_REASONS
"""

from pipeline.data.config import DataConfig, SourceConfig
from pipeline.data.eval import iter_eval_samples
from pipeline.data.loader import PillDataset, PillLoader, build_loader
from pipeline.data.prompts import Conversation, detect_task, render
from pipeline.data.records import SKIP_REASONS
from pipeline.data.tokenize import Encoded, encode_prompt, placeholder_id

__all__ = [
    "Conversation",
    "DataConfig",
    "Encoded",
    "PillDataset",
    "PillLoader",
    "SKIP_REASONS",
    "SourceConfig",
    "build_loader",
    "detect_task",
    "encode_prompt",
    "iter_eval_samples",
    "placeholder_id",
    "render",
]
