"""KV-cache generation: cached + batched (left-padded) decoding equals uncached step-by-step argmax decoding."""

import pytest
import torch

from pipeline.data.prompt_cut import Prompt
from pipeline.generate import (
    GenerationConfig,
    generate,
    generate_ids,
    load_trained,
    select_next,
    stop_ids,
)
from pipeline.model.base import MethodOutput
from pipeline.model.batch import Batch
from tests.test_model_pill import assert_close_to_scale


def _perturb(model, seed=0, std=0.3):
    """Random non-zero adapters and gates, so visual tokens, gates and routing all change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    """A stage-2 tiny PILL with random trainables, saved and reloaded through the export path."""
    from pipeline.model import PILLConfig, load_pill

    cfg = PILLConfig(stage=2, rank=4, num_query_tokens=8, vpg_width=64, attn_backend="eager")
    model = load_pill(tiny_dirs["llm"], tiny_dirs["vpg"], cfg=cfg)
    _perturb(model)
    export = model.save_adapter(tmp_path_factory.mktemp("export"))
    return load_trained(tiny_dirs["llm"], export, tiny_dirs["vpg"])


def _prompts(model, n_text=(5, 9, 3), with_image=(True, False, True), seed=0, kind="image_features"):
    g = torch.Generator().manual_seed(seed)
    K, ph = model.cfg.num_query_tokens, model.tokenizer.unk_token_id
    prompts = []
    for i, (n, img) in enumerate(zip(n_text, with_image)):
        text = torch.randint(4, len(model.tokenizer), (n,), generator=g).tolist()
        ids = [model.tokenizer.bos_token_id] + ([ph] * K if img else []) + text
        mask = [False] + [True] * (K if img else 0) + [False] * n
        shape = (1, 3, 224, 224) if kind == "pixel_values" else (1, K, model.cfg.vpg_width)
        images = torch.randn(shape, generator=g) if img else None
        prompts.append(Prompt(ids, mask, images, image_kind=kind, key=str(i)))
    return prompts


def test_export_roundtrip_keeps_stage_and_gates(trained):
    assert trained.cfg.stage == 2 and trained.cfg.gate_active
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if ".gate." in n)


@pytest.mark.parametrize(
    "backend, kind", [("eager", "image_features"), ("sdpa", "image_features"), ("sdpa", "pixel_values")]
)
def test_cached_batched_equals_uncached(trained, backend, kind):
    trained.cfg.attn_backend = backend
    prompts = _prompts(trained, kind=kind)
    cfg = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    cached = generate_ids(trained, prompts, cfg)
    reference = generate_ids(trained, prompts, GenerationConfig(max_new_tokens=6, stop_at_eos=False, use_cache=False))
    assert cached == reference
    assert all(len(row) == 6 for row in cached)
    # a row's result does not depend on its batch neighbours (left padding is masked out)
    assert generate_ids(trained, prompts[1:2], cfg) == cached[1:2]


def test_cache_logits_match_full_forward(trained):
    """Logits of a cached decode step equal the last-position logits of a full forward, gates included."""
    p = _prompts(trained, n_text=(6,), with_image=(True,), kind="pixel_values")[0]
    ids = torch.tensor([p.input_ids + [17, 23]])
    mm = torch.tensor([p.modality_mask + [False, False]])
    with torch.no_grad():
        full = trained.output_logits(trained(Batch(ids, modality_mask=mm, pixel_values=p.images)))
        out = trained(Batch(ids[:, :-2], modality_mask=mm[:, :-2], pixel_values=p.images), use_cache=True)
        attn = torch.ones_like(ids)
        step = Batch(ids[:, -2:-1], attention_mask=attn[:, :-1], modality_mask=mm[:, -2:-1])
        out = trained(step, cache=out.kv_cache, use_cache=True)
        step = Batch(ids[:, -1:], attention_mask=attn, modality_mask=mm[:, -1:])
        out = trained(step, cache=out.kv_cache, use_cache=True)
    # fp32 reorderings (a 1-row decode vs the full forward) differ by ~1e-6 of the logits' scale
    assert_close_to_scale(trained.output_logits(out)[:, -1], full[:, -1], "cached decode logits", rel=1e-4)
    # the visual tokens matter (gates open): other visual features change the next-token logits. Features, not
    # pixels: the tiny random VPG's output barely depends on the image (its ViT init is ~1e-10).
    with torch.no_grad():
        feats = trained.vpg(p.images)
        same = trained.output_logits(trained(Batch(ids, modality_mask=mm, image_features=feats)))
        other = trained.output_logits(trained(Batch(ids, modality_mask=mm, image_features=feats + 1.0)))
    torch.testing.assert_close(same, full)
    assert (other[:, -1] - full[:, -1]).abs().max() > 1e-3


def test_gqa_cached_equals_uncached(tiny_gqa_dirs):
    from pipeline.model import PILLConfig, load_pill

    model = load_pill(tiny_gqa_dirs["llm"], None, cfg=PILLConfig(stage=2, rank=4, num_query_tokens=8, vpg_width=64))
    _perturb(model, seed=1)
    model.eval()
    g = torch.Generator().manual_seed(3)
    prompts = [
        Prompt(
            [1] + [0] * 8 + [40, 41, 42],
            [False] + [True] * 8 + [False] * 3,
            torch.randn(1, 8, 64, generator=g),
            image_kind="image_features",
        ),
        Prompt([1, 50, 51], [False] * 3),
    ]
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    assert generate_ids(model, prompts, cfg) == generate_ids(
        model, prompts, GenerationConfig(max_new_tokens=5, stop_at_eos=False, use_cache=False)
    )


def test_sampling_reproducible_and_top_p(trained):
    prompts = _prompts(trained)
    cfg = GenerationConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=7, stop_at_eos=False)
    a = generate_ids(trained, prompts, cfg)
    assert a == generate_ids(trained, prompts, cfg)
    greedy = generate_ids(trained, prompts, GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    tiny_p = GenerationConfig(max_new_tokens=5, temperature=1.0, top_p=1e-6, seed=3, stop_at_eos=False)
    assert generate_ids(trained, prompts, tiny_p) == greedy  # the nucleus holds only the top token
    # generate's text, batched 2 + 1, in input order: the decoded ids of uncached step-by-step argmax decoding
    reference = generate_ids(trained, prompts, GenerationConfig(max_new_tokens=5, stop_at_eos=False, use_cache=False))
    assert reference == greedy and all(reference)
    texts = generate(trained, prompts, GenerationConfig(max_new_tokens=5, stop_at_eos=False), batch_size=2)
    assert texts == [trained.tokenizer.decode(ids, skip_special_tokens=True) for ids in reference]


def test_select_next_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    picks = select_next(logits, GenerationConfig(temperature=1.0, top_p=0.7), g)
    counts = torch.bincount(picks, minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 reaches 0.7: tokens 2, 3 are outside the nucleus
    assert 0.55 < counts[0] / 4000 < 0.70  # renormalised 0.5 / 0.8 = 0.625
    assert select_next(logits[:1], GenerationConfig(), None).item() == 0
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)


class _Counter(torch.nn.Module):
    """Fake model: the next token is last + 1; token 9 is EOS (or a given tokenizer's). Checks stopping and padding
    of finished rows."""

    def __init__(self, tokenizer=None):
        super().__init__()
        self.projection = torch.nn.Linear(1, 1)
        self.llm = torch.nn.Module()
        self.llm.get_input_embeddings = lambda: self.projection

        class Tok:
            eos_token_id, pad_token_id = 9, 0

        self.tokenizer = tokenizer or Tok()
        self.vocab = len(tokenizer) if tokenizer is not None else 12
        self.cfg = type("Cfg", (), {"num_query_tokens": 2})()

    def forward(self, batch: Batch, *, cache=None, use_cache: bool = False) -> MethodOutput:
        # "hidden states" that the identity head below turns into one-hot logits of the next id
        hidden = torch.nn.functional.one_hot((batch.input_ids + 1) % self.vocab, self.vocab).float()
        return MethodOutput(hidden=hidden, kv_cache=[()])

    def logits(self, hidden, head_index=None):
        return hidden


def test_stops_at_eos_per_row():
    prompts = [Prompt([7], [False]), Prompt([2, 3], [False, False])]
    assert generate_ids(_Counter(), prompts, GenerationConfig(max_new_tokens=4)) == [[8], [4, 5, 6, 7]]
    assert generate_ids(_Counter(), prompts, GenerationConfig(max_new_tokens=4, use_cache=False)) == [[8], [4, 5, 6, 7]]
    assert generate_ids(_Counter(), prompts, GenerationConfig(max_new_tokens=4, stop_at_eos=False))[0] == [8, 9, 10, 11]


def test_stops_at_the_templates_end_of_turn(tmp_path):
    """A ChatML model ends its answer with <|im_end|>, not with its eos: generation stops there, and at every id of
    the LLM's generation_config eos_token_id list."""
    from transformers import GenerationConfig as HFGenerationConfig

    from tests.test_data_prompt_format import template_tokenizer

    tok = template_tokenizer(tmp_path, "chatml")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    model = _Counter(tok)
    assert im_end != tok.eos_token_id and stop_ids(model) == {tok.eos_token_id, im_end}
    prompts = [Prompt([im_end - 3], [False]), Prompt([5], [False])]
    for use_cache in (True, False):
        out = generate_ids(model, prompts, GenerationConfig(max_new_tokens=4, use_cache=use_cache))
        assert out == [[im_end - 2, im_end - 1], [6, 7, 8, 9]]
    model.llm.generation_config = HFGenerationConfig(eos_token_id=[7, im_end - 1])
    assert stop_ids(model) == {tok.eos_token_id, im_end, 7, im_end - 1}
    assert generate_ids(model, prompts, GenerationConfig(max_new_tokens=4)) == [[im_end - 2], [6]]


def test_prompt_with_wrong_visual_count_is_an_error():
    bad = Prompt([1, 0, 5], [False, True, False], torch.zeros(1, 2, 4), image_kind="image_features", key="k")
    with pytest.raises(ValueError, match="prompt k: 1 visual positions for 1 image"):
        generate_ids(_Counter(), [bad])


def test_load_trained_errors(tmp_path, tiny_dirs):
    with pytest.raises(FileNotFoundError, match="adapter export: .* does not exist"):
        load_trained(tiny_dirs["llm"], tmp_path)


def test_cli_quick_look_and_batch_mode(tiny_dirs, trained, tmp_path, capsys):
    import json

    from PIL import Image

    from pipeline.generate import main
    from shards.demo import main as demo_main

    export = trained.save_adapter(tmp_path / "export")
    model_args = [
        "--llm",
        str(tiny_dirs["llm"]),
        "--vpg",
        str(tiny_dirs["vpg"]),
        "--adapter",
        str(export),
        "--max-new-tokens",
        "4",
    ]
    Image.new("RGB", (50, 40), (255, 0, 0)).save(tmp_path / "x.jpg")
    assert main(model_args + ["--image", str(tmp_path / "x.jpg"), "--prompt", "What colour is it?"]) == 0
    assert capsys.readouterr().out.strip() != ""
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        main(model_args + ["--image", str(tmp_path / "missing.jpg"), "--prompt", "hi"])

    demo_main(
        ["--out", str(tmp_path / "demo"), "--n-train", "2", "--n-val", "5", "--image-size", "32", "--no-progress"]
    )
    out = tmp_path / "gen.jsonl"
    assert (
        main(
            model_args + ["--shards", str(tmp_path / "demo" / "val-index.json"), "--out", str(out), "--batch-size", "2"]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["key"] == "val_000000" and isinstance(rows[0]["generation"], str)
    assert rows[0]["meta"]["choices"]
