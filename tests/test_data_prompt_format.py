"""data.prompt_format: every task through a tokenizer's own chat template (ChatML, Llama-3, Llama-2, written here as
those families ship them), the loss exactly on the assistant content + its end-of-turn token, auto's choice, and
clear errors for templates that cannot be labelled."""

import logging
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from pipeline.data import DataConfig, render
from pipeline.data.chat_template import TemplateError, end_of_turn_ids
from pipeline.data.eval import chat_prompt, rerender_without_image
from pipeline.data.prompt_cut import Prompt, prompts_from_batch
from pipeline.data.prompts import prompt_format_problem, resolve_prompt_format, saved_chat_template
from pipeline.data.tokenize import IGNORE, conversation_pieces, encode_pieces, encode_prompt
from tests.datagen import make_loader, sqa_meta, tiny_tokenizer, write_sqa_shards

K = 4
REPO = Path(__file__).resolve().parent.parent

# SmolLM2-Instruct's template (ChatML with a default system message when the conversation has none)
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's template
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Llama-2-7b-chat-hf's template
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# Qwen3's template without its tool branches: the last assistant turn after the last user turn gets an (empty)
# <think> block, earlier turns lose it, so a render is not a prefix of the next one
QWEN3 = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}{%- set ns.multi_step_tool = false %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{%- if loop.index0 > ns.last_query_index and loop.last %}"
    "{{- '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message.content }}{%- else %}"
    "{{- '<|im_start|>assistant\n' + message.content }}{%- endif %}{{- '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
FAMILIES = {  # template, extra special tokens, bos, eos, end-of-turn the labels must end with
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], None, "</s>", "<|im_end|>"),
    "llama3": (
        LLAMA3,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|eot_id|>",
    ),
    "llama2": (LLAMA2, [], "<s>", "</s>", "</s>"),
}


def template_tokenizer(cache_dir, family: str, template: str | None = None) -> PreTrainedTokenizerFast:
    """The tiny BPE tokenizer with a family's special tokens, bos/eos and chat template (no hub)."""
    default, extra, bos, eos, _ = FAMILIES[family]
    tok = tiny_tokenizer(cache_dir)
    tok.add_special_tokens({"additional_special_tokens": extra + ["<|end_of_text|>"] * (family == "llama3")})
    tok.bos_token, tok.eos_token = bos, eos
    tok.chat_template = template or default
    tok.name_or_path = f"test-{family}"
    return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tiny_tokenizer(d)
    return d


def _decoded(tok, enc) -> str:
    """The sample's text with each image's K positions shown as one <image>."""
    ids = torch.as_tensor(enc.input_ids).tolist()
    mm = enc.modality_mask.tolist()
    out = "".join("\0" if m else tok.decode([i]) for i, m in zip(ids, mm))
    return out.replace("\0" * K, "<image>")


def _labelled_runs(tok, enc) -> list[str]:
    """Each contiguous run of labelled tokens, decoded (special tokens kept)."""
    runs, cur = [], []
    for i, lab in zip(enc.input_ids.tolist(), enc.labels.tolist()):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def _samples(cfg):
    caption = render({}, "a red circle on white", "caption", 1, cfg)
    sqa = render(sqa_meta(1, hint="a hint", lecture="Lec.", solution="Sol."), None, "scienceqa", 1, cfg)
    chat = render(
        {
            "source": "llava_instruct",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A circle."},
                {"from": "human", "value": "Which colour?"},
                {"from": "gpt", "value": "Red, mostly."},
            ],
        },
        None,
        "chat",
        1,
        cfg,
    )
    two = render(
        {
            "source": "llava_instruct",
            "conversations": [
                {"from": "human", "value": "<image> and <image>: which colours?"},
                {"from": "gpt", "value": "Red, then blue."},
            ],
        },
        None,
        "chat",
        2,
        cfg,
    )
    return {"caption": caption, "scienceqa": sqa, "chat": chat, "two_images": two}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_labels_are_the_answers_plus_end_of_turn(tok_dir, family):
    tok = template_tokenizer(tok_dir, family)
    eot = FAMILIES[family][4]
    cfg = DataConfig(prompt_format="chat_template")
    for task, conv in _samples(cfg).items():
        pieces = conversation_pieces(conv, prompt_format="chat_template", tokenizer=tok)
        enc = encode_pieces([pieces], tok, K, None)[0]
        answers = [a for _, a in conv.turns]
        sep = " " if family == "llama2" else ""  # Llama-2's template writes ' ' + content + ' ' + eos
        assert _labelled_runs(tok, enc) == [f"{sep}{a}{sep}{eot}" for a in answers], (family, task)
        # the whole sequence is the template's own render, up to the last end-of-turn (ChatML's '\n' after it
        # is not part of the sample); every <image> became K visual positions
        rendered = tok.apply_chat_template(_messages(conv), tokenize=False)
        text = _decoded(tok, enc)
        assert rendered.startswith(text) and rendered[len(text) :] in ("", "\n"), (family, task)
        assert int(enc.modality_mask.sum()) == K * text.count("<image>") == K * (2 if task == "two_images" else 1)
        assert not (enc.modality_mask & (enc.labels != IGNORE)).any()
        # the generation prompt is the training prompt up to the (last) answer, token for token
        prompt = encode_prompt(conv, tok, K, "chat_template")
        first_label = int((enc.labels != IGNORE).nonzero()[0][0])
        if len(conv.turns) == 1:
            assert prompt.input_ids.tolist() == enc.input_ids[:first_label].tolist()
        assert _decoded(tok, prompt) == tok.apply_chat_template(
            _messages(conv)[:-1], tokenize=False, add_generation_prompt=True
        )
    assert cfg.system_message in _decoded(tok, encode_prompt(_samples(cfg)["scienceqa"], tok, K, "chat_template"))


def _messages(conv):
    msgs = [{"role": "system", "content": conv.system}] if conv.system else []
    for u, a in conv.turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


def test_template_that_rewrites_earlier_turns(tok_dir):
    """Qwen3: one turn is labelled after the generation prompt (the empty <think> block is what the model writes);
    several turns are labelled on the whole render, each answer + <|im_end|>, the sequence being the template's own."""
    tok = template_tokenizer(tok_dir, "chatml", template=QWEN3)
    for task, conv in _samples(DataConfig()).items():
        enc = encode_pieces([conversation_pieces(conv, prompt_format="chat_template", tokenizer=tok)], tok, K, None)[0]
        runs = _labelled_runs(tok, enc)
        if len(conv.turns) == 1:
            assert runs == [f"<think>\n\n</think>\n\n{conv.turns[0][1]}<|im_end|>"], task
        else:
            assert runs == [f"{a}<|im_end|>" for _, a in conv.turns], task
        rendered = tok.apply_chat_template(_messages(conv), tokenize=False)
        assert _decoded(tok, enc) == rendered.removesuffix("\n"), task
        prompt = encode_prompt(conv, tok, K, "chat_template")
        assert _decoded(tok, prompt) == tok.apply_chat_template(
            _messages(conv)[:-1], tokenize=False, add_generation_prompt=True
        ), task


def test_llama2_format_unchanged_and_auto_choice(tok_dir, caplog):
    plain = tiny_tokenizer(tok_dir)
    chatml, llama2 = template_tokenizer(tok_dir, "chatml"), template_tokenizer(tok_dir, "llama2")
    with caplog.at_level(logging.INFO, logger="pipeline.data.prompts"):
        assert resolve_prompt_format("auto", plain) == "llama2"  # no template
        assert resolve_prompt_format("auto", llama2) == "llama2"  # Llama-2's own [INST] template
        assert resolve_prompt_format("auto", chatml) == "chat_template"
        assert resolve_prompt_format("auto", chatml) == "chat_template"
    logged = [r.getMessage() for r in caplog.records if "test-chatml" in r.getMessage()]
    assert len(logged) == 1 and "chat_template" in logged[0]  # once, naming the tokenizer
    assert resolve_prompt_format("llama2", chatml) == "llama2"
    with pytest.raises(ValueError, match="has no chat_template"):
        resolve_prompt_format("chat_template", plain)
    with pytest.raises(ValueError, match="data.prompt_format must be auto|llama2|chat_template"):
        DataConfig(prompt_format="chatml")
    # llama2 on a ChatML tokenizer: exactly the paper's rendering (it needs a bos: Qwen's tokenizer has none)
    conv = _samples(DataConfig())["scienceqa"]
    with pytest.raises(ValueError, match="llama2 needs the tokenizer's bos_token_id .* test-chatml has bos=None"):
        encode_pieces([conversation_pieces(conv, prompt_format="llama2", tokenizer=chatml)], chatml, K, None)
    chatml.bos_token = "<s>"
    a = encode_pieces([conversation_pieces(conv, prompt_format="llama2", tokenizer=chatml)], chatml, K, None)[0]
    b = encode_pieces([conversation_pieces(conv)], plain, K, None)[0]
    assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()


def test_templates_that_cannot_be_labelled_are_named(tok_dir):
    conv = _samples(DataConfig())["chat"]
    rewrites = "{% for m in messages %}{% if loop.last %}[last]{% endif %}{{ m['content'] | upper }}</s>{% endfor %}"
    tok = template_tokenizer(tok_dir, "llama2", template=rewrites)
    with pytest.raises(
        TemplateError, match="tokenizer test-llama2 is not prefix-stable and changes the user content of turn 1"
    ):
        conversation_pieces(conv, prompt_format="chat_template", tokenizer=tok)
    no_system = (
        "{% for m in messages %}{% if m['role'] != 'system' %}<|im_start|>{{ m['role'] }}\n"
        "{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = template_tokenizer(tok_dir, "chatml", template=no_system)
    sqa = _samples(DataConfig())["scienceqa"]
    with pytest.raises(TemplateError, match="tokenizer test-chatml drops the system message"):
        conversation_pieces(sqa, prompt_format="chat_template", tokenizer=tok)
    no_stop = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = template_tokenizer(tok_dir, "chatml", template=no_stop)
    with pytest.raises(TemplateError, match="no special token"):
        conversation_pieces(conv, prompt_format="chat_template", tokenizer=tok)
    assert end_of_turn_ids(tok) == []


def test_end_of_turn_ids(tok_dir):
    for family, (_, _, _, _, eot) in FAMILIES.items():
        tok = template_tokenizer(tok_dir, family)
        assert end_of_turn_ids(tok) == [tok.convert_tokens_to_ids(eot)], family
    assert end_of_turn_ids(tiny_tokenizer(tok_dir)) == []


def test_loader_renders_with_the_configured_format(tok_dir, tmp_path):
    """data.prompt_format reaches the collator: a ChatML tokenizer's batches hold its template, labels on the
    answers + <|im_end|>, and the prompt cut from the batch is the template's generation prompt."""
    tok = template_tokenizer(tok_dir, "chatml")
    urls = write_sqa_shards(tmp_path / "s", 1, 3)
    batch = next(
        iter(
            make_loader(
                tok,
                urls,
                batch_size=3,
                num_query_tokens=K,
                shuffle_buffer=0,
                prompt_format="auto",
                sqa_format="QCM-A",
                num_workers=0,
            )
        )
    )
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for b, meta in enumerate(batch.meta):
        lab = batch.labels[b][batch.labels[b] != IGNORE].tolist()
        assert tok.decode(lab) == f"The answer is {'ABC'[meta['answer']]}.<|im_end|>" and lab[-1] == im_end
    prompts = prompts_from_batch(batch, K)
    assert tok.decode(prompts[0].input_ids).endswith(
        "Options: (A) red (B) blue (C) green\n<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_prompt_and_rerender_follow_the_format(tiny_dirs, tok_dir):
    """The free-form / text-only prompt and the 'without image' re-render use the model tokenizer's format."""
    from pipeline.model import PILLConfig, load_pill

    model = load_pill(tiny_dirs["llm"], None, cfg=PILLConfig(stage=2, num_query_tokens=K, vpg_width=64))
    tok = model.tokenizer = template_tokenizer(tok_dir, "chatml")
    q = "What is the capital of France?"
    p = chat_prompt(model, q)
    assert tok.decode(p.input_ids) == tok.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )
    assert not any(p.modality_mask) and p.images is None
    p = chat_prompt(model, q, system="Answer in one word.")
    assert tok.decode(p.input_ids) == (
        f"<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
    )
    p = chat_prompt(model, "Describe it.", torch.zeros(1, K, 64))
    assert sum(p.modality_mask) == K and p.image_kind == "image_features"
    text = tok.decode([i for i, m in zip(p.input_ids, p.modality_mask) if not m])
    assert text.endswith("<|im_start|>user\n\nDescribe it.<|im_end|>\n<|im_start|>assistant\n")  # image first
    meta = {**sqa_meta(1), "task": "scienceqa"}
    p = rerender_without_image(Prompt([0], [False], meta=meta), model)
    text = tok.decode(p.input_ids)
    assert "Image:N/A.\nQuestion: Question number 1?" in text and text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n" + DataConfig().system_message)
    tok.bos_token = "<s>"  # llama2 needs one
    assert tok.decode(chat_prompt(model, q, prompt_format="llama2").input_ids) == f"<s>[INST] {q} [/INST]"


def test_prompt_format_checked_before_any_model_load(tok_dir, tmp_path, capsys):
    """A bad value fails at config load, and chat_template with a template-less tokenizer fails from the tokenizer's
    files in the launch checks and the eval CLIs, before a model is loaded, naming the field."""
    from pipeline.generate import main as generate_main
    from pipeline.train import check_paths
    from pipeline.training.config import ConfigError, load_config

    plain, chatml = tmp_path / "plain", tmp_path / "chatml"
    tiny_tokenizer(tok_dir).save_pretrained(str(plain))
    template_tokenizer(tok_dir, "chatml").save_pretrained(str(chatml))
    assert saved_chat_template(plain) == "" and saved_chat_template(chatml) == FAMILIES["chatml"][0]
    assert saved_chat_template("tiny") is None  # materialised later: the collator checks it
    assert prompt_format_problem("chat_template", chatml) is None and prompt_format_problem("auto", plain) is None
    assert "data.prompt_format=chat_template but the tokenizer in" in prompt_format_problem("chat_template", plain)
    with pytest.raises(ConfigError, match="data.prompt_format must be auto|llama2|chat_template, got 'chatml'"):
        load_config(REPO / "configs" / "demo.yaml", ["data.prompt_format=chatml"])
    (plain / "config.json").write_text("{}")
    cfg = load_config(REPO / "configs" / "demo.yaml", [f"model.llm_path={plain}", "data.prompt_format=chat_template"])
    with pytest.raises(ConfigError, match=f"data.prompt_format=chat_template but the tokenizer in {plain} has no"):
        check_paths(cfg)
    with pytest.raises(SystemExit):
        generate_main(["--llm", str(plain), "--prompt", "Hi", "--prompt-format", "chat_template"])
    assert f"--prompt-format=chat_template but the tokenizer in {plain} has no chat_template" in capsys.readouterr().err
