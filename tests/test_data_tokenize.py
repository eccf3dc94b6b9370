"""Prompt templates and tokenisation: exact prompt text, K visual positions, answer-only labels, truncation that
never cuts an image."""

import pytest
import torch

from pipeline.data import DataConfig, render
from pipeline.data.prompts import PromptError, with_image_marker
from pipeline.data.tokenize import IGNORE, conversation_pieces, encode_pieces, encode_prompt, placeholder_id
from tests.datagen import sqa_meta, tiny_tokenizer

K = 8


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _cfg(**kw):
    return DataConfig(**kw)


def _text(tok, ids, mm=None):
    ids = torch.as_tensor(ids)
    if mm is not None:
        ids = torch.where(torch.as_tensor(mm), torch.full_like(ids, -1), ids)
    out = []
    for i in ids.tolist():
        if i == -1:
            out.append("<IMG>")
            continue
        out.append(tok.decode([i]))
    return "".join(out).replace("<IMG>" * K, "<image>")


def test_scienceqa_prompt_labels_and_visual_positions(tok):
    cfg = _cfg(max_length=512)
    meta = sqa_meta(1, hint="a hint", lecture="Lec.", solution="Sol.")
    conv = render(meta, None, "scienceqa", True, cfg)
    enc = encode_pieces([conversation_pieces(conv)], tok, K, cfg.max_length)[0]
    text = _text(tok, enc.input_ids, enc.modality_mask)
    assert text == (
        "<s>[INST] <<SYS>>\n" + cfg.system_message + "\n<</SYS>>\n\nImage:<image>\nQuestion: Question "
        "number 1?\nContext: a hint\nOptions: (A) red (B) blue (C) green\n [/INST]The answer is B. "
        "BECAUSE: Lec. Sol.</s>"
    )
    assert int(enc.modality_mask.sum()) == K
    assert (enc.input_ids[enc.modality_mask] == placeholder_id(tok)).all()
    lab = enc.labels[enc.labels != IGNORE]
    assert tok.decode(lab) == "The answer is B. BECAUSE: Lec. Sol.</s>" and lab[-1] == tok.eos_token_id
    # labelled positions are exactly the tail (answer + EOS), never visual
    first = int((enc.labels != IGNORE).nonzero()[0][0])
    assert (enc.labels[first:] != IGNORE).all() and not enc.modality_mask[first:].any()
    # generation prompt = training prompt up to the answer
    prompt = encode_prompt(conv, tok, K)
    assert (prompt.input_ids == enc.input_ids[:first]).all()


def test_scienceqa_without_image_and_qcm_a(tok):
    cfg = _cfg(sqa_format="QCM-A")
    conv = render(sqa_meta(2, has_image=False, solution="S"), None, "scienceqa", False, cfg)
    enc = encode_pieces([conversation_pieces(conv)], tok, K, cfg.max_length)[0]
    text = _text(tok, enc.input_ids)
    assert "Image:N/A.\nQuestion" in text and text.endswith("[/INST]The answer is C.</s>")
    assert not enc.modality_mask.any() and enc.n_images == 0
    with pytest.raises(PromptError):
        render(sqa_meta(2, answer=7), None, "scienceqa", True, cfg)


def test_caption_and_chat_templates(tok):
    cfg = _cfg()
    meta = {
        "conversations": [
            {"from": "human", "value": "Say what you see.\n<image>"},
            {"from": "gpt", "value": "from json"},
        ]
    }
    conv = render(meta, "a red circle", "caption", True, cfg)
    assert conv.system is None and conv.turns == [("Say what you see.\n<image>", "a red circle")]
    conv = render({}, "img2dataset caption", "caption", True, cfg)  # no conversations: default instruction
    enc = encode_pieces([conversation_pieces(conv)], tok, K, 64)[0]
    assert _text(tok, enc.input_ids, enc.modality_mask) == (
        "<s>[INST]<image>\nDescribe the image briefly. [/INST]img2dataset caption</s>"
    )
    chat = {
        "source": "llava_instruct",
        "conversations": [
            {"from": "human", "value": "<image>\nQ1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2 <image>"},
            {"from": "gpt", "value": "A2"},
        ],
    }
    conv = render(chat, None, "auto", True, cfg)
    enc = encode_pieces([conversation_pieces(conv)], tok, K, 512)[0]
    assert int(enc.modality_mask.sum()) == K  # one image: the second marker is dropped
    lab = enc.labels.copy()
    lab[lab == IGNORE] = tok.pad_token_id
    assert tok.decode(lab, skip_special_tokens=False).replace("<pad>", "") == "A1</s>A2</s>"
    assert _text(tok, enc.input_ids, enc.modality_mask).count("<s>[INST]") == 2
    assert with_image_marker("no marker", True) == "<image>\nno marker"
    assert with_image_marker("x <image> y", False) == "x  y".strip()


def test_truncation_never_cuts_an_image(tok):
    cfg = _cfg()
    meta = {
        "conversations": [
            {"from": "human", "value": "Look at this long instruction please <image>"},
            {"from": "gpt", "value": "a caption with several words in it"},
        ]
    }
    pieces = [conversation_pieces(render(meta, None, "caption", True, cfg))]
    full = encode_pieces(pieces, tok, K, None)[0]
    start = int(full.modality_mask.nonzero()[0][0])
    # cut inside the image: the whole image goes, and with it every answer token -> skipped (None)
    assert encode_pieces(pieces, tok, K, start + 3)[0] is None
    # cut inside the answer: image intact, answer shortened
    first_label = int((full.labels != IGNORE).nonzero()[0][0])
    part = encode_pieces(pieces, tok, K, first_label + 2)[0]
    assert len(part.input_ids) == first_label + 2 and int(part.modality_mask.sum()) == K and part.n_images == 1
    assert (part.labels != IGNORE).sum() == 2
    # an image after some answer tokens (multi-turn): cut inside it keeps the first turn, drops the image whole
    chat = {
        "source": "llava_instruct",
        "conversations": [{"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"}],
    }
    conv = render(chat, None, "chat", True, cfg)  # image marker goes first in turn 1
    conv.turns = [("Q1", "A1"), ("<image>\nQ2", "A2")]
    pc = [conversation_pieces(conv)]
    fullc = encode_pieces(pc, tok, K, None)[0]
    s = int(fullc.modality_mask.nonzero()[0][0])
    cut = encode_pieces(pc, tok, K, s + K - 1)[0]
    assert len(cut.input_ids) == s and cut.n_images == 0 and not cut.modality_mask.any()
    assert (cut.labels != IGNORE).any()


def test_constants_agree_with_the_model(tok):
    """pipeline.constants is the one source; the model exports the same values (until it imports them itself)."""
    from pipeline import constants
    from pipeline.data.transforms import default_mean_std
    from pipeline.model import IMAGE_MEAN, IMAGE_STD, image_placeholder_id

    assert tuple(IMAGE_MEAN) == constants.IMAGE_MEAN and tuple(IMAGE_STD) == constants.IMAGE_STD
    assert default_mean_std() == (constants.IMAGE_MEAN, constants.IMAGE_STD)
    assert placeholder_id(tok) == image_placeholder_id(tok) == constants.image_placeholder_id(tok)
