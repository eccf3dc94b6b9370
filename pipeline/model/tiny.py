"""Tiny random models built and saved locally, for tests and the embedded default (no hub access).

The tokenizer is a byte-level BPE trained in a second on a fixed corpus (prompt templates, the demo's words),
with Llama's special tokens and BOS prepended; the LLM is a transformers LlamaForCausalLM; the VPG is
transformers' BLIP-2 vision model + Q-former at 224 px. Everything is deterministic given the seed, and saved
in the same formats as real checkpoints so the real loading code is exercised. `build_once` is the cache every
materialised source uses (these, the CLIP of the peers, GGUF conversions): built under a file lock, appearing whole.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from pipeline.model.clip import tiny_clip_config
from pipeline.model.vpg import VPG

TINY_RECIPE_VERSION = 3  # bump when a tiny model's recipe changes, so cached directories are rebuilt
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
_CORPUS = [
    "[INST] <<SYS>>\nYou are a helpful assistant. Answer the question about the image.\n<</SYS>>\n\n",
    "Image:<image>\nImage:N/A.\nQuestion: What is shown?\nContext: N/A\nOptions: (A) red (B) green (C) blue "
    "(D) yellow (E) purple\n [/INST] The answer is A. The answer is B. The answer is C. The answer is D. "
    "The answer is E.",
    "Describe the image briefly. A photo of a red circle. A blue square on the left. A green triangle on the right.",
    "Which colour is the shape? Which shape is in the image? How many shapes are there? Is the shape on the "
    "left or the right? circle square triangle star one two three four left right top bottom large small",
    "Lecture: Solution: The shape is red. There are two shapes. A cat sits on a mat. the of and to in is it",
    "0 1 2 3 4 5 6 7 8 9 . , ; : ! ? ( ) [ ] { } < > / \\ - _ = + * & % $ # @ ' \"",
]


def build_once(out: Path, build: Callable[[Path], Path]) -> Path:
    """`build(tmp_dir)` into `out` unless it holds a config.json. Ranks that start together: one builds under an
    exclusive file lock, the others wait for it; the directory appears whole (a rename) or not at all."""
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f"{out.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").is_file():
                tmp = build(out.with_name(f"{out.name}.tmp{os.getpid()}"))
                if not (tmp / "config.json").is_file():
                    raise RuntimeError(f"building {out} wrote no config.json in {tmp}")
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
    return out


def save_on_any_rank(model: PreTrainedModel, out_dir: str | Path) -> None:
    """model.save_pretrained(out_dir) on whichever rank runs it. transformers >= 5 writes nothing on a
    torch.distributed rank other than 0, and build_once builds on the rank that takes its lock first."""
    model.should_save_on_this_rank = lambda is_main_process: is_main_process
    model.save_pretrained(str(out_dir))


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A random CLIPVisionModel (pipeline.model.clip.tiny_clip_config) saved with save_pretrained (the real loading
    code reads it back)."""
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    save_on_any_rank(CLIPVisionModel(tiny_clip_config()), out_dir)
    return out_dir


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=2048,
    )
    fast.save_pretrained(str(out_dir))
    return out_dir


def build_tiny_llm(
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    n_kv_heads: int | None = None,
    intermediate_size: int = 128,
    seed: int = 0,
    initializer_range: float | None = None,
) -> Path:
    """A random LlamaForCausalLM (+ its tokenizer) saved with save_pretrained.

    Weights ~ N(0, 1/d) by default (not transformers' 0.02): at d=64, 0.02 makes every frozen projection shrink
    its input ~8x, so the adapters, which act only through the frozen sublayers, barely move the logits and the
    demo cannot learn. A trained LLM's sublayers have O(1) gain; 1/sqrt(d) gives a random one the same."""
    out_dir = Path(out_dir)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else build_tiny_tokenizer(out_dir)
    tok = PreTrainedTokenizerFast.from_pretrained(str(tok_dir))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=n_kv_heads or num_heads,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        initializer_range=initializer_range or hidden_size**-0.5,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    save_on_any_rank(model, out_dir)
    tok.save_pretrained(str(out_dir))
    return out_dir


def tiny_vpg_config(width: int = 64, num_query_tokens: int = 8, patch_size: int = 16) -> Blip2Config:
    # transformers' Blip2VisionConfig defaults to initializer_range=1e-10: a ViT built from it maps every image
    # to (almost) the same features, so the tiny VPG sets 0.02 explicitly. The random Q-former gets 0.1: at 0.02
    # its cross-attention adds a ~2% image-dependent part to the layer-normed queries (measured: a linear probe
    # on the features cannot tell the shape's colour), at 0.1 the between-image std is ~0.6 and colour is 100%.
    vision = Blip2VisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=224,
        patch_size=patch_size,
        initializer_range=0.02,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=width,
        cross_attention_frequency=1,
        initializer_range=0.1,
    )
    return Blip2Config(
        vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), num_query_tokens=num_query_tokens
    )


def build_tiny_vpg(out_dir: str | Path, *, width: int = 64, num_query_tokens: int = 8, seed: int = 0) -> Path:
    """A random BLIP-2 ViT + Q-former saved as a transformers BLIP-2 checkpoint dir (vision/qformer keys)."""
    torch.manual_seed(seed)
    vpg = VPG(tiny_vpg_config(width, num_query_tokens))
    vpg.vision_model.apply(vpg.vision_model._init_weights)
    vpg.qformer.apply(vpg.qformer._init_weights)
    torch.nn.init.normal_(vpg.query_tokens, std=vpg.config.initializer_range)
    vpg.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_pill_dirs(root: str | Path, **llm_kwargs) -> dict[str, Path]:
    """{"llm": dir, "vpg": dir} under root, rebuilt only when the recipe changed (tests share them)."""
    root = Path(root)
    recipe = json.dumps({"v": TINY_RECIPE_VERSION, **llm_kwargs}, sort_keys=True)
    key = hashlib.sha1(recipe.encode()).hexdigest()[:10]
    llm_dir, vpg_dir = root / f"llm-{key}", root / f"vpg-{TINY_RECIPE_VERSION}"
    build_once(llm_dir, lambda tmp: build_tiny_llm(tmp, **llm_kwargs))
    build_once(vpg_dir, build_tiny_vpg)
    return {"llm": llm_dir, "vpg": vpg_dir}
