"""A Conversation through the tokenizer's own chat template (`data.prompt_format: chat_template`).

Messages: the system message (when the task has one), then the user / assistant turns, the `<image>` markers left
inside the user content (tokenize.py expands them to K visual positions). The template renders text; where the
loss goes is found by rendering prefixes of the conversation:

    P_k = render(messages before assistant turn k, add_generation_prompt=True)     the generation prompt
    F_k = render(messages up to and including assistant turn k)

F_k[len(P_k):] is what the model must write for turn k: the assistant content, with whatever the template puts
around it (Llama-2: a space each side), up to and including the first special token after the content (the
end-of-turn: ChatML's `<|im_end|>`, Llama-3's `<|eot_id|>`, Llama-2's `</s>`). Those spans are labelled; the rest
(system, user turns, role headers, ChatML's newline after `<|im_end|>`) is prompt.

A template whose renders are not prefixes of each other (Qwen3 drops the `<think>` block of a turn once a later user
turn follows) is labelled on its render of the whole conversation instead: each assistant content, found after its
user content, through the next special token. A template that drops the system message, changes the content, or
ends an assistant turn with no special token cannot be labelled: a TemplateError names it.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.data.prompts import IMAGE, Conversation, count_markers, tokenizer_name

log = logging.getLogger(__name__)


class TemplateError(ValueError):
    """The tokenizer's chat template cannot render or label a conversation."""


def messages_of(conv: Conversation) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for user, answer in conv.turns:
        msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return msgs


def render_text(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises TemplateError / TypeError / the template's own raise_exception
        roles = "/".join(m["role"] for m in messages)
        raise TemplateError(
            f"the chat_template of tokenizer {tokenizer_name(tokenizer)} fails on a {roles} "
            f"conversation: {type(e).__name__}: {e}"
        ) from e


def special_strings(tokenizer: Any) -> list[str]:
    """Every special token's text (bos/eos/pad/unk, additional and added special tokens), longest first."""
    out = set(getattr(tokenizer, "all_special_tokens", []) or [])
    out |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((s for s in out if s), key=len, reverse=True)


def split_assistant(span: str, answer: str, tokenizer: Any) -> int:
    """Length of the labelled part of an assistant span: through the first special token after the content."""
    pos = span.find(answer)
    if pos < 0:
        raise TemplateError(
            f"the chat_template of tokenizer {tokenizer_name(tokenizer)} changes the assistant "
            f"content (rendered {span[:80]!r}, content {answer[:80]!r})"
        )
    start = pos + len(answer)
    hits = [(i, s) for s in special_strings(tokenizer) if (i := span.find(s, start)) >= 0]
    if not hits:
        raise TemplateError(
            f"the chat_template of tokenizer {tokenizer_name(tokenizer)} ends an assistant turn with "
            f"no special token ({span[start : start + 40]!r} after the content): the model could not "
            "learn where to stop; use data.prompt_format=llama2"
        )
    i, s = min(hits, key=lambda h: (h[0], -len(h[1])))
    return i + len(s)


class NotPrefixStable(TemplateError):
    """A render does not start with the render of the conversation before it."""


def _check_prefix(tokenizer: Any, head: str, text: str, what: str) -> None:
    if not text.startswith(head):
        raise NotPrefixStable(
            f"the chat_template of tokenizer {tokenizer_name(tokenizer)} is not prefix-stable: "
            f"{what} does not start with the render before it ({head[-60:]!r} vs "
            f"{text[max(0, len(head) - 60) : len(head)]!r})"
        )


def template_spans(conv: Conversation, tokenizer: Any, with_answer: bool = True) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) spans in order; with_answer=False stops at the last
    generation prompt. Text after the last end-of-turn is left out (nothing to learn, generation stops before).
    A template that rewrites earlier turns once a later one follows (Qwen3 drops past turns' <think> blocks) is
    labelled on its render of the whole conversation instead (`_whole_render_spans`)."""
    msgs = messages_of(conv)
    try:
        spans = _prefix_spans(conv, tokenizer, msgs, with_answer)
    except NotPrefixStable:
        if with_answer:
            spans = _whole_render_spans(conv, tokenizer, msgs)
        else:  # the template's own generation prompt after the earlier turns, as it renders them
            spans = [(render_text(tokenizer, msgs[:-1], add_generation_prompt=True), False)]
    if conv.system and conv.system.strip() not in spans[0][0]:
        raise TemplateError(
            f"the chat_template of tokenizer {tokenizer_name(tokenizer)} drops the system message "
            "(ScienceQA's instructions); set data.prompt_format=llama2 or a template that keeps it"
        )
    return spans


def _prefix_spans(conv: Conversation, tokenizer: Any, msgs: list[dict], with_answer: bool) -> list[tuple[str, bool]]:
    """Turn by turn: P_k, then F_k[len(P_k):] through the end-of-turn (module docstring)."""
    n_sys = int(bool(conv.system))
    spans: list[tuple[str, bool]] = []
    done = ""
    for k, (_, answer) in enumerate(conv.turns):
        prompt = render_text(tokenizer, msgs[: n_sys + 2 * k + 1], add_generation_prompt=True)
        _check_prefix(tokenizer, done, prompt, f"the generation prompt of turn {k + 1}")
        spans.append((prompt[len(done) :], False))
        if k == len(conv.turns) - 1 and not with_answer:
            break
        full = render_text(tokenizer, msgs[: n_sys + 2 * k + 2], add_generation_prompt=False)
        _check_prefix(tokenizer, prompt, full, f"the render with assistant turn {k + 1}")
        n = split_assistant(full[len(prompt) :], answer, tokenizer)
        spans.append((full[len(prompt) : len(prompt) + n], True))
        done = full[: len(prompt) + n]
    return spans


def _whole_render_spans(conv: Conversation, tokenizer: Any, msgs: list[dict]) -> list[tuple[str, bool]]:
    """The whole conversation rendered once; each assistant content (found after its user content, in order)
    through the next special token is labelled, everything else (headers, a <think> block) is prompt."""
    full = render_text(tokenizer, msgs, add_generation_prompt=False)
    spans: list[tuple[str, bool]] = []
    cursor = 0
    for k, (user, answer) in enumerate(conv.turns):
        u = full.find(user.strip(), cursor)
        if u < 0:
            raise TemplateError(
                f"the chat_template of tokenizer {tokenizer_name(tokenizer)} is not prefix-stable and changes "
                f"the user content of turn {k + 1}: labels cannot be placed, use data.prompt_format=llama2"
            )
        start = full.find(answer, u + len(user.strip()))
        start = start if start >= 0 else u + len(user.strip())  # split_assistant names the changed content
        n = split_assistant(full[start:], answer, tokenizer)
        spans += [(full[cursor:start], False), (full[start : start + n], True)]
        cursor = start + n
    return spans


def template_pieces(conv: Conversation, tokenizer: Any, with_answer: bool = True) -> list[tuple]:
    """tokenize.py's pieces: prompt text split at the `<image>` markers, answers as trained text."""
    pieces: list[tuple] = []
    for text, trained in template_spans(conv, tokenizer, with_answer):
        parts = [text] if trained else text.split(IMAGE)
        for j, part in enumerate(parts):
            if j:
                pieces.append(("image",))
            if part:
                pieces.append(("text", part, trained))
    n_img = sum(p[0] == "image" for p in pieces)
    if n_img != count_markers(conv):
        raise TemplateError(
            f"the chat_template of tokenizer {tokenizer_name(tokenizer)} renders {n_img} {IMAGE} "
            f"markers for {count_markers(conv)} images (a marker in the system message, or one "
            "dropped)"
        )
    return pieces


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids the template ends an assistant turn with (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`), found by
    rendering a probe conversation; [] without a template or when it cannot render one (logged)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    try:
        prompt = render_text(tokenizer, msgs[:1], add_generation_prompt=True)
        full = render_text(tokenizer, msgs, add_generation_prompt=False)
        _check_prefix(tokenizer, prompt, full, "the probe's render with the assistant turn")
        n = split_assistant(full[len(prompt) :], "Hello.", tokenizer)
    except TemplateError as e:
        log.warning("no end-of-turn token from the chat template: %s", e)
        return []
    span = full[len(prompt) : len(prompt) + n]
    ids = tokenizer.convert_tokens_to_ids([s for s in special_strings(tokenizer) if span.endswith(s)][:1])
    return [int(i) for i in ids if i is not None]
