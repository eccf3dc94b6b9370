"""WebDataset streaming for PILL: shard lists, prompt templates, tokenisation, collation / packing.

Trainer API (docs/data.md):
    loader = build_loader(DataConfig(sources=[SourceConfig("shards/demo/train-index.json", task="scienceqa")],
                                     batch_size=4, num_query_tokens=K), tokenizer)
    for batch in loader: ...            # one epoch; len(loader) batches on every rank
    loader.state_dict() / loader.load_state_dict(sd)   # resume mid-epoch, same sample sequence
    loader.skipped()                    # {reason: count} on this rank, all workers
"""

from pipeline.data.config import DataConfig, SourceConfig
from pipeline.data.eval import iter_eval_samples
from pipeline.data.loader import PillDataset, PillLoader, build_loader
from pipeline.data.prompts import Conversation, detect_task, render
from pipeline.data.tokenize import Encoded, encode_prompt, placeholder_id

__all__ = [
    "Conversation",
    "DataConfig",
    "Encoded",
    "PillDataset",
    "PillLoader",
    "SourceConfig",
    "build_loader",
    "detect_task",
    "encode_prompt",
    "iter_eval_samples",
    "placeholder_id",
    "render",
]
