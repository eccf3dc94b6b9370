"""Prompt templates (PILL_SPEC.md "Prompts"): LLaMA-2 chat turns built from a sample's json (+ txt caption).

A rendered sample is `Conversation(system, turns=[(user, answer), ...])`; `<image>` in a user text marks where an
image's K visual positions go (tokenize.py expands it), the i-th marker for the sample's i-th image. Stage 1 and chat
have no system message; ScienceQA has one. One image: LLaVA's convention (a missing marker goes in front, extra
markers are dropped). Several images: the text must hold exactly one marker per image (else image_count_mismatch).

    stage 1:    [INST] <image>\nDescribe the image briefly. [/INST] {caption}
    ScienceQA:  [INST] <<SYS>>\n{system}\n<</SYS>>\n\nImage:<image>\nQuestion: ...\nContext: ...\nOptions: (A) ...
                (B) ...\n [/INST] The answer is A. BECAUSE: {lecture} {solution}        (QCM-ALE; QCM-A stops at '.')
    chat:       [INST] {human 1} [/INST] {gpt 1} </s><s>[INST] {human 2} [/INST] {gpt 2} ...

That is the `llama2` prompt format (the paper's). `chat_template` renders the same Conversation through the
tokenizer's own chat template instead (chat_template.py); `resolve_prompt_format` picks one for `auto`.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.config import PROMPT_FORMATS, DataConfig

IMAGE = "<image>"
LETTERS = string.ascii_uppercase
log = logging.getLogger(__name__)
_LOGGED: set[tuple[str, str]] = set()  # (tokenizer name, choice): the auto choice is logged once per process


class PromptError(ValueError):
    """The sample's json cannot fill the template (reason is a skip-counter name)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Conversation:
    system: str | None
    turns: list[tuple[str, str]]
    """(user text with at most one <image> marker per image, answer text)"""


def detect_task(meta: dict[str, Any]) -> str:
    """From the fields present: a record with choices (or question + answer) is ScienceQA even when a field is
    missing, so the skip names the missing field instead of reading as a caption without text. A conversation is
    chat unless it is LLaVA's caption shape (one human + one gpt turn) about an image the record names (`image` or
    `has_image`): a text-only conversation is an instruction to train on, not a caption whose image is missing."""
    if "choices" in meta or ("question" in meta and "answer" in meta):
        return "scienceqa"
    conv = meta.get("conversations")
    if isinstance(conv, list):
        names_image = bool(meta.get("image")) or bool(meta.get("has_image"))
        if len(conv) > 2 or meta.get("source") == "llava_instruct" or not names_image:
            return "chat"
    return "caption"


def scienceqa_user(meta: dict[str, Any], n_images: int, use_captions: bool) -> str:
    choices = meta["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise PromptError("bad_choices", repr(choices))
    ctx = str(meta.get("hint") or "").strip()
    if use_captions and meta.get("caption"):
        ctx = f"{ctx} {meta['caption']}".strip()
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    image = f"Image:{IMAGE * n_images}\n" if n_images else "Image:N/A.\n"
    # The template places the images; a literal marker in the record's text must not become one.
    text = f"Question: {meta['question']}\nContext: {ctx or 'N/A'}\nOptions: {options}\n".replace(IMAGE, "image")
    return image + text


def scienceqa_answer(meta: dict[str, Any], fmt: str) -> str:
    a = meta["answer"]
    if not isinstance(a, int) or not 0 <= a < len(meta["choices"]):
        raise PromptError("empty_answer", f"answer {a!r}")
    out = f"The answer is {LETTERS[a]}."
    if fmt == "QCM-ALE":
        because = " ".join(str(meta.get(k) or "").strip() for k in ("lecture", "solution")).strip()
        if because:
            out += f" BECAUSE: {because}"
    return out


def render(meta: dict[str, Any], txt: str | None, task: str, n_images: int | bool, cfg: DataConfig) -> Conversation:
    """Fill the task's template for a sample with n_images images (a bool means 0 or 1); raises PromptError for
    samples that cannot be used."""
    n = int(n_images)
    task = detect_task(meta) if task == "auto" else task
    if task == "scienceqa":
        for f in ("question", "choices", "answer"):
            if f not in meta:
                raise PromptError("missing_field", f"ScienceQA record without '{f}' (has {sorted(meta)[:12]})")
        return Conversation(
            cfg.system_message, [(scienceqa_user(meta, n, cfg.use_captions), scienceqa_answer(meta, cfg.sqa_format))]
        )
    if task == "caption":
        conv = meta.get("conversations")
        caption = (txt or "").strip() or str(meta.get("caption") or "").strip()
        instruction = f"{IMAGE * max(n, 1)}\n{cfg.caption_instruction}"
        if isinstance(conv, list) and len(conv) >= 2:
            instruction = str(conv[0].get("value", instruction))
            caption = caption or str(conv[1].get("value", "")).strip()
        if not caption:
            raise PromptError("empty_answer", "no caption (txt, json 'caption' or a gpt turn)")
        return Conversation(None, with_image_markers([(instruction, caption)], n))
    if task == "chat":
        conv = meta.get("conversations")
        if not isinstance(conv, list) or len(conv) < 2:
            raise PromptError("bad_conversation", "needs human/gpt turns")
        turns = []
        for i in range(0, len(conv) - 1, 2):
            h, g = conv[i], conv[i + 1]
            if h.get("from") != "human" or g.get("from") != "gpt":
                raise PromptError("bad_conversation", f"turn {i}: {h.get('from')}/{g.get('from')}")
            if not str(g.get("value", "")).strip():
                raise PromptError("empty_answer", f"conversations[{i + 1}] (gpt) is empty")
            turns.append((str(h.get("value", "")), str(g["value"]).strip()))
        return Conversation(None, with_image_markers(turns, n))
    raise PromptError("bad_task", task)


def count_markers(conv: Conversation) -> int:
    return sum(u.count(IMAGE) for u, _ in conv.turns)


def with_image_markers(turns: list[tuple[str, str]], n_images: int) -> list[tuple[str, str]]:
    """The user texts with exactly n_images markers in all (see the module docstring for the rules)."""
    found = sum(u.count(IMAGE) for u, _ in turns)
    if n_images <= 1:
        out = [
            (with_image_marker(u, bool(n_images) and k == _first_marked(turns)), a) for k, (u, a) in enumerate(turns)
        ]
        return out
    if found != n_images:
        raise PromptError("image_count_mismatch", f"{n_images} images but {found} {IMAGE} markers in the text")
    return turns


def _first_marked(turns: list[tuple[str, str]]) -> int:
    """The turn that keeps the single image: the first with a marker, else the first."""
    return next((k for k, (u, _) in enumerate(turns) if IMAGE in u), 0)


def with_image_marker(text: str, has_image: bool) -> str:
    """Exactly one marker when there is an image (LLaVA puts it first when missing), none otherwise."""
    if not has_image:
        return text.replace(IMAGE, "").strip()
    if IMAGE not in text:
        return f"{IMAGE}\n{text}"
    first = text.index(IMAGE) + len(IMAGE)
    return text[:first] + text[first:].replace(IMAGE, "")


def tokenizer_name(tokenizer: Any) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def chat_template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template source ('' when it has none; several named templates are joined)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template or ""


def resolve_prompt_format(setting: str, tokenizer: Any) -> str:
    """`data.prompt_format` -> "llama2" or "chat_template".

    auto: "llama2" when the tokenizer has no chat template, or when its template is LLaMA-2's own `[INST]` turn
    format (Llama-2-chat, Mistral-Instruct: the paper's prompts are that format); else "chat_template". The auto
    choice is logged once (INFO), naming the tokenizer."""
    if setting not in PROMPT_FORMATS:
        raise ValueError(f"data.prompt_format must be {'|'.join(PROMPT_FORMATS)}, got {setting!r}")
    template = chat_template_text(tokenizer)
    if setting == "chat_template" and not template:
        raise ValueError(
            f"data.prompt_format=chat_template but the tokenizer {tokenizer_name(tokenizer)} has no chat_template"
        )
    if setting != "auto":
        return setting
    if not template:
        choice, why = "llama2", "it has no chat_template"
    elif "[INST]" in template:
        choice, why = "llama2", "its chat_template is the LLaMA-2 [INST] format"
    else:
        choice, why = "chat_template", "it has a chat_template of its own"
    if (tokenizer_name(tokenizer), choice) not in _LOGGED:
        _LOGGED.add((tokenizer_name(tokenizer), choice))
        log.info("data.prompt_format=auto -> %s for tokenizer %s (%s)", choice, tokenizer_name(tokenizer), why)
    return choice


def saved_chat_template(llm_dir: str | Path) -> str | None:
    """The chat template of the tokenizer saved in `llm_dir`, read from its files without loading it (the check runs
    before any model load): chat_template.jinja, chat_template.json or tokenizer_config.json's "chat_template"
    (a string, or a list of named templates); "" when it has none. None when `llm_dir` is not a local directory (a
    named source such as "tiny" or a .gguf file, materialised later: the collator checks it then)."""
    d = Path(llm_dir)
    if not d.is_dir():
        return None
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = d / name
        template = json.loads(f.read_text(encoding="utf-8")).get("chat_template") if f.is_file() else None
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = "\n".join(str(t.get("template", "")) for t in template)
        if template:
            return str(template)
    return ""


def prompt_format_problem(setting: str, llm_dir: str | Path) -> str | None:
    """What is wrong with `data.prompt_format` for the LLM in `llm_dir` (None: nothing that can be seen from its
    files), for the checks before launch."""
    if setting not in PROMPT_FORMATS:
        return f"data.prompt_format must be {'|'.join(PROMPT_FORMATS)}, got {setting!r}"
    if setting == "chat_template" and saved_chat_template(llm_dir) == "":
        return (
            f"data.prompt_format=chat_template but the tokenizer in {llm_dir} has no chat_template; use "
            "data.prompt_format=llama2 (or auto)"
        )
    return None
