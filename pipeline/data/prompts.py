"""Prompt templates (PILL_SPEC.md "Prompts"): LLaMA-2 chat turns built from a sample's json (+ txt caption).

A rendered sample is `Conversation(system, turns=[(user, answer), ...])`; `<image>` in a user text marks where the
image's K visual positions go (tokenize.py expands it). Stage 1 and chat have no system message; ScienceQA has one.

    stage 1:    [INST] <image>\nDescribe the image briefly. [/INST] {caption}
    ScienceQA:  [INST] <<SYS>>\n{system}\n<</SYS>>\n\nImage:<image>\nQuestion: ...\nContext: ...\nOptions: (A) ...
                (B) ...\n [/INST] The answer is A. BECAUSE: {lecture} {solution}        (QCM-ALE; QCM-A stops at '.')
    chat:       [INST] {human 1} [/INST] {gpt 1} </s><s>[INST] {human 2} [/INST] {gpt 2} ...
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from pipeline.data.config import DataConfig

IMAGE = "<image>"
LETTERS = string.ascii_uppercase


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
    if "choices" in meta and "answer" in meta and "question" in meta:
        return "scienceqa"
    conv = meta.get("conversations")
    if isinstance(conv, list) and (len(conv) > 2 or meta.get("source") == "llava_instruct"):
        return "chat"
    return "caption"


def scienceqa_user(meta: dict[str, Any], has_image: bool, use_captions: bool) -> str:
    choices = meta["choices"]
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise PromptError("bad_choices", repr(choices))
    ctx = str(meta.get("hint") or "").strip()
    if use_captions and meta.get("caption"):
        ctx = f"{ctx} {meta['caption']}".strip()
    options = " ".join(f"({LETTERS[i]}) {c}" for i, c in enumerate(choices))
    image = f"Image:{IMAGE}\n" if has_image else "Image:N/A.\n"
    return f"{image}Question: {meta['question']}\nContext: {ctx or 'N/A'}\nOptions: {options}\n"


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


def render(meta: dict[str, Any], txt: str | None, task: str, has_image: bool, cfg: DataConfig) -> Conversation:
    """Fill the task's template; raises PromptError for samples that cannot be used."""
    task = detect_task(meta) if task == "auto" else task
    if task == "scienceqa":
        for f in ("question", "choices", "answer"):
            if f not in meta:
                raise PromptError("missing_field", f)
        return Conversation(cfg.system_message, [(scienceqa_user(meta, has_image, cfg.use_captions),
                                                  scienceqa_answer(meta, cfg.sqa_format))])
    if task == "caption":
        conv = meta.get("conversations")
        caption = (txt or "").strip() or str(meta.get("caption") or "").strip()
        instruction = f"{IMAGE}\n{cfg.caption_instruction}"
        if isinstance(conv, list) and len(conv) >= 2:
            instruction = str(conv[0].get("value", instruction))
            caption = caption or str(conv[1].get("value", "")).strip()
        if not caption:
            raise PromptError("empty_answer", "no caption")
        return Conversation(None, [(with_image_marker(instruction, has_image), caption)])
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
                raise PromptError("empty_answer", f"turn {i + 1}")
            turns.append((str(h.get("value", "")), str(g["value"]).strip()))
        turns[0] = (with_image_marker(turns[0][0], has_image), turns[0][1])
        for k in range(1, len(turns)):  # one image per sample: later markers are text noise
            turns[k] = (turns[k][0].replace(IMAGE, "").strip(), turns[k][1])
        return Conversation(None, turns)
    raise PromptError("bad_task", task)


def with_image_marker(text: str, has_image: bool) -> str:
    """Exactly one marker when there is an image (LLaVA puts it first when missing), none otherwise."""
    if not has_image:
        return text.replace(IMAGE, "").strip()
    if IMAGE not in text:
        return f"{IMAGE}\n{text}"
    first = text.index(IMAGE) + len(IMAGE)
    return text[:first] + text[first:].replace(IMAGE, "")
