"""Conversations -> token ids, labels and modality_mask, for a whole batch with one tokenizer call.

Layout of prompt_format "llama2" (LLaMA-2 chat; <s>/</s> are the tokenizer's BOS/EOS ids, never tokenised text):
    <s>[INST] {sys block}{user text} [/INST]{answer}</s><s>[INST] {user 2} [/INST]{answer 2}</s> ...
prompt_format "chat_template": the tokenizer's own template renders the text (chat_template.py says where the labels
go); its special tokens are tokenised from that text.
Each `<image>` marker becomes K placeholder positions (`image_placeholder_id`, overwritten by the model), with
modality_mask True there. Labels equal input_ids on answer tokens and their EOS, -100 elsewhere (HF shift convention:
the model shifts). Text pieces are tokenised separately (boundaries at images and answers), so the prompt used at
generation (`encode_prompt`) is token-for-token the training prompt.

Truncation to max_length drops trailing tokens but never part of an image: a cut inside a visual run moves to the run's
start and that image is dropped. A sample left without any answer token is skipped ("too_long").
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.constants import image_placeholder_id
from pipeline.data.chat_template import template_pieces
from pipeline.data.prompts import IMAGE, Conversation, resolve_prompt_format

IGNORE = -100
SYS_BLOCK = "<<SYS>>\n{}\n<</SYS>>\n\n"


placeholder_id = image_placeholder_id  # the model's rule, from the dependency-free constants module


@dataclass
class Encoded:
    input_ids: np.ndarray  # (L,) int64
    labels: np.ndarray  # (L,) int64
    modality_mask: np.ndarray  # (L,) bool
    n_images: int  # images kept after truncation (0 or 1 per marker)
    cut_tokens: int = 0  # tokens dropped by truncation to max_length
    cut_answer_tokens: int = 0  # of which answer (trained) tokens


# piece kinds: ("bos",), ("eos", train), ("text", str, train), ("image",)
def conversation_pieces(
    conv: Conversation, with_answer: bool = True, prompt_format: str = "llama2", tokenizer: Any = None
) -> list[tuple]:
    """The pieces of a conversation in a prompt format (auto and chat_template need the tokenizer)."""
    if prompt_format != "llama2":
        if tokenizer is None:
            raise ValueError(f"prompt_format {prompt_format!r} needs the tokenizer")
        if resolve_prompt_format(prompt_format, tokenizer) == "chat_template":
            return template_pieces(conv, tokenizer, with_answer)
    return llama2_pieces(conv, with_answer)


def llama2_pieces(conv: Conversation, with_answer: bool = True) -> list[tuple]:
    pieces: list[tuple] = []
    for k, (user, answer) in enumerate(conv.turns):
        last = k == len(conv.turns) - 1
        sys = SYS_BLOCK.format(conv.system) if (k == 0 and conv.system) else ""
        head = f"[INST] {sys}"
        parts = user.split(IMAGE)
        pieces.append(("bos",))
        for j, part in enumerate(parts):
            text = (head if j == 0 else "") + part + (" [/INST]" if j == len(parts) - 1 else "")
            if j < len(parts) - 1:
                text = text.rstrip(" ")
            if text:
                pieces.append(("text", text, False))
            if j < len(parts) - 1:
                pieces.append(("image",))
        if last and not with_answer:
            break
        pieces.append(("text", answer, True))
        pieces.append(("eos", True))
    return pieces


def encode_pieces(
    batch_pieces: list[list[tuple]],
    tokenizer: Any,
    num_query_tokens: int,
    max_length: int | None,
) -> list[Encoded | None]:
    """One batched tokenizer call for every text piece of the batch; None for samples truncated to no answer."""
    ids_list = _tokenize([p for pieces in batch_pieces for p in pieces if p[0] == "text"], tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    needs = {p[0] for pieces in batch_pieces for p in pieces} & {"bos", "eos"}
    if ("bos" in needs and bos is None) or ("eos" in needs and eos is None):
        raise ValueError(
            f"prompt_format llama2 needs the tokenizer's bos_token_id and eos_token_id (LLaMA-style <s> "
            f"and </s>); {getattr(tokenizer, 'name_or_path', '')} has bos={bos} eos={eos}"
        )
    ph = placeholder_id(tokenizer)
    K = num_query_tokens
    out: list[Encoded | None] = []
    t = 0
    for pieces in batch_pieces:
        ids: list[int] = []
        train: list[bool] = []
        vis: list[bool] = []
        img_starts: list[int] = []
        for p in pieces:
            if p[0] == "text":
                seg = ids_list[t]
                t += 1
                ids += seg
                train += [p[2]] * len(seg)
                vis += [False] * len(seg)
            elif p[0] == "image":
                img_starts.append(len(ids))
                ids += [ph] * K
                train += [False] * K
                vis += [True] * K
            else:
                ids.append(bos if p[0] == "bos" else eos)
                train.append(p[0] == "eos" and p[1])
                vis.append(False)
        n_img = len(img_starts)
        cut_tokens = cut_answer = 0
        if max_length is not None and len(ids) > max_length:
            cut = max_length
            for s in img_starts:
                if s < cut < s + K:  # never a partial image
                    cut = s
            n_img = sum(1 for s in img_starts if s + K <= cut)
            cut_tokens, cut_answer = len(ids) - cut, sum(train[cut:])
            ids, train, vis = ids[:cut], train[:cut], vis[:cut]
        arr = np.asarray(ids, dtype=np.int64)
        tr = np.asarray(train, dtype=bool)
        if max_length is not None and not tr.any() and any(_trained(p) for p in pieces):
            out.append(None)
            continue
        out.append(Encoded(arr, np.where(tr, arr, IGNORE), np.asarray(vis, dtype=bool), n_img, cut_tokens, cut_answer))
    return out


def _trained(piece: tuple) -> bool:
    return (piece[0] == "eos" and piece[1]) or (piece[0] == "text" and piece[2])


_PROMPT_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {prompt text: ids}
_PROMPT_CACHE_SIZE = 4096


def _tokenize(text_pieces: list[tuple], tokenizer: Any) -> list[list[int]]:
    """Token ids of every text piece, one batched tokenizer call for those not cached. Prompt pieces (not
    trained on) repeat across samples (`[INST] ...`, the system block, the caption instruction), so their ids are
    kept per tokenizer; answers are always tokenised."""
    cache = _PROMPT_IDS.setdefault(tokenizer, {})
    out: list[list[int] | None] = [None] * len(text_pieces)
    todo = []
    for i, (_, text, train) in enumerate(text_pieces):
        hit = None if train else cache.get(text)
        if hit is None:
            todo.append(i)
        else:
            out[i] = hit
    if todo:
        ids = tokenizer([text_pieces[i][1] for i in todo], add_special_tokens=False)["input_ids"]
        if len(cache) > _PROMPT_CACHE_SIZE:
            cache.clear()
        for i, seg in zip(todo, ids):
            out[i] = seg
            if not text_pieces[i][2]:
                cache[text_pieces[i][1]] = seg
    return out  # type: ignore[return-value]


def encode_prompt(conv: Conversation, tokenizer: Any, num_query_tokens: int, prompt_format: str = "auto") -> Encoded:
    """The generation prompt: everything up to the last answer (llama2: the last `[/INST]`; a template: its
    generation prompt), no answer, no truncation."""
    pieces = conversation_pieces(conv, with_answer=False, prompt_format=prompt_format, tokenizer=tokenizer)
    return encode_pieces([pieces], tokenizer, num_query_tokens, None)[0]
