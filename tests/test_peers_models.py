"""The four peer methods on a tiny random Llama + tiny random CLIP: what every method must satisfy.

Exactly the trainable set receives gradients, save/load of the trainables round-trips through the export format
with the method recorded, the KV cache reproduces the full forward (left-padded, as generation runs it), the
registry and `pipeline.params --method` report the cards' counts.
"""

import json

import pytest
import torch

from pipeline.model import get_method, load_export, load_method, method_names
from pipeline.model.base import ADAPTER_CONFIG, read_export_meta
from pipeline.model.batch import Batch
from pipeline.model.methods import clip_features
from pipeline.training.loss import answer_loss

PEERS = ["llama_adapter", "lavin", "excitor", "iaa"]


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    from pipeline.model.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip") / "clip")


def make(name, tiny_dirs, clip_dir, **cfg):
    torch.manual_seed(1)
    spec = get_method(name)
    return load_method(name, tiny_dirs["llm"], clip_dir, spec.config_cls(**cfg), dtype=torch.float32)


def randomize(model, seed=0):
    """Every trainable weight random and non-zero, so no path hides behind a zero init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_trainable(name, model.cfg.stage):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def image_batch(model, seed=0, T=30):
    """Row 0 has one image (K placeholders at position 3), row 1 is text only, right-padded."""
    K = model.cfg.num_query_tokens
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(model.tokenizer), (2, T + K), generator=g)
    mm = torch.zeros_like(ids, dtype=torch.bool)
    mm[0, 3 : 3 + K] = True
    attn = torch.ones_like(ids)
    attn[1, -4:] = 0
    labels = torch.full_like(ids, -100)
    labels[:, -10:-4] = ids[:, -10:-4]
    pixels = torch.randn(1, 3, 224, 224, generator=g)
    return Batch(input_ids=ids, modality_mask=mm, attention_mask=attn, labels=labels, pixel_values=pixels)


def logits(model, batch: Batch, **controls) -> torch.Tensor:
    """(B, T, V) logits of the method's forward through its own head(s)."""
    return model.output_logits(model(batch, **controls))


def test_registry_lists_every_peer_with_its_stages():
    shipped = set(method_names()) - {"linear_projector"}  # tests/toy_method.py registers a plug-in for its test
    assert set(PEERS) | {"pill"} == shipped
    assert get_method("iaa").stages == (1, 2)
    for name in ("llama_adapter", "lavin", "excitor"):
        assert get_method(name).stages == (2,) and get_method(name).front_end == "clip"


@pytest.mark.parametrize("name", PEERS)
def test_gradients_reach_exactly_the_trainable_set(name, tiny_dirs, clip_dir):
    model = make(name, tiny_dirs, clip_dir)
    randomize(model)
    model.train()
    answer_loss(model, image_batch(model)).backward()
    expected = {n for n, _ in model.named_parameters() if model.is_trainable(n, model.cfg.stage)}
    assert {n for n, _ in model.trainable_parameters()} == expected and expected
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == expected, (sorted(expected - with_grad)[:5], sorted(with_grad - expected)[:5])
    assert not any(n.startswith(("llm.", "vpg.")) for n in with_grad)


@pytest.mark.parametrize("name", PEERS)
def test_save_load_round_trip(name, tiny_dirs, clip_dir, tmp_path):
    model = make(name, tiny_dirs, clip_dir)
    randomize(model, seed=3)
    model.eval()
    b = image_batch(model)
    with torch.no_grad():
        ref = logits(model, b)
    model.save_adapter(tmp_path / "export")
    meta = read_export_meta(tmp_path / "export")
    assert meta["method"] == name and meta["config"]["stage"] == model.cfg.stage
    saved = json.loads((tmp_path / "export" / ADAPTER_CONFIG).read_text())["keys"]
    assert saved and not any(k.startswith(("llm.", "vpg.")) for k in saved)
    fresh = load_export(tmp_path / "export", tiny_dirs["llm"], clip_dir, dtype=torch.float32).eval()
    assert type(fresh) is type(model)
    with torch.no_grad():
        got = logits(fresh, b)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", PEERS)
def test_kv_cache_decoding_equals_the_full_forward(name, tiny_dirs, clip_dir):
    """Left-padded prompt (row 1 shorter) + 3 decoded tokens == one forward over each row's whole sequence."""
    model = make(name, tiny_dirs, clip_dir)
    randomize(model, seed=5)
    model.eval()
    K = model.cfg.num_query_tokens
    g = torch.Generator().manual_seed(7)
    T, pad = 12 + K, 3
    ids = torch.randint(5, len(model.tokenizer), (2, T), generator=g)
    mm = torch.zeros_like(ids, dtype=torch.bool)
    mm[0, 2 : 2 + K] = True
    attn = torch.ones_like(ids)
    attn[1, :pad] = 0
    pixels = torch.randn(1, 3, 224, 224, generator=g)
    new = torch.randint(5, len(model.tokenizer), (2, 3), generator=g)
    with torch.no_grad():
        out = model(Batch(input_ids=ids, attention_mask=attn, modality_mask=mm, pixel_values=pixels), use_cache=True)
        steps = [model.output_logits(out)[:, -1]]
        for t in range(new.shape[1]):
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            step = Batch(
                input_ids=new[:, t : t + 1],
                attention_mask=attn,
                modality_mask=torch.zeros_like(new[:, :1], dtype=torch.bool),
            )
            out = model(step, cache=out.kv_cache, use_cache=True)
            steps.append(model.output_logits(out)[:, -1])
        cached = torch.stack(steps[:-1], dim=1)  # logits predicting new[:, 0..2]
        full0 = logits(
            model,
            Batch(
                input_ids=torch.cat([ids[:1], new[:1]], 1),
                modality_mask=torch.cat([mm[:1], torch.zeros_like(new[:1], dtype=torch.bool)], 1),
                pixel_values=pixels,
            ),
        )
        full1 = logits(model, Batch(input_ids=torch.cat([ids[1:, pad:], new[1:]], 1)))
    n = new.shape[1]
    torch.testing.assert_close(cached[0], full0[0, T - 1 : T - 1 + n], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached[1], full1[0, T - pad - 1 : T - pad - 1 + n], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name,preset,expected",
    [
        ("llama_adapter", "llama2-7b", 1_692_672),  # 1,229,760 text-only (below) + the reconstructed image MLP
        ("lavin", "llama2-7b", 3_781_296),  # the paper's 3.78M, exactly
        ("excitor", "llama2-7b", 16_007_198),  # 7,618,590 text-only + the (shared) W_k, W_v reconstruction
        ("iaa", "llama3-8b", 4_125_224_960),  # IAA-14, the paper's "about 4.1B"
    ],
)
def test_params_method_counts(name, preset, expected, capsys):
    from pipeline import params

    assert params.main(["--method", name, "--llm-preset", preset]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trainable={expected}"


@pytest.mark.parametrize("name,expected", [("llama_adapter", 1_229_760), ("excitor", 7_618_590)])
def test_params_text_only_counts(name, expected, capsys):
    from pipeline import params

    assert params.main(["--method", name, "--method-config", '{"multimodal": false}']) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"trainable={expected}"


def test_iaa_memory_table_shows_why_zero3(capsys):
    from pipeline import params

    assert params.main(["--method", "iaa", "--llm-preset", "llama3-8b", "--memory", "--zero", "3", "--world", "8"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("predicted_state_gb=")
    zero0 = next(line for line in out.splitlines() if line.split()[:1] == ["0"])
    assert float(zero0.split()[-1]) > 80  # 4.1B trainables: > 80 GB per GPU without partitioning


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("lavin", "rank", 7),
        ("iaa", "stage", 3),
        ("excitor", "attn_backend", "triton"),
        ("llama_adapter", "prompt_len", 0),
    ],
)
def test_bad_config_names_the_field(name, field, value):
    with pytest.raises(ValueError, match=f"{field}"):
        get_method(name).config_cls(**{field: value})
    with pytest.raises(ValueError, match="unknown"):
        get_method(name).config_cls.from_dict({"no_such_field": 1})


@pytest.mark.parametrize("name", ["llama_adapter", "excitor", "iaa"])
def test_precomputed_clip_features_equal_the_pixel_path(name, tiny_dirs, clip_dir):
    """What shards.encode would write (pipeline.model.methods.clip_features, spec method:<name>) gives the same
    logits as the pixels through the model's own CLIP."""
    model = make(name, tiny_dirs, clip_dir)
    feats_fn = clip_features(model.vpg, f"method:{name}")
    if name == "excitor":  # precomputed patch rows need one placeholder per row (the collator's check)
        model = make(name, tiny_dirs, clip_dir, num_query_tokens=feats_fn.num_query_tokens)
    assert feats_fn.num_query_tokens == model.cfg.num_query_tokens
    randomize(model, seed=2)
    model.eval()
    b = image_batch(model)
    pixels = b.pixel_values
    with torch.no_grad():
        feats = feats_fn(pixels)
        a = logits(model, b)
        c = logits(model, b.replace(pixel_values=None, image_features=feats))
    assert feats.shape == (1, model.cfg.num_query_tokens, model.vpg.width)
    torch.testing.assert_close(c, a, rtol=0, atol=0)


def test_lavin_refuses_precomputed_features_while_clip_is_adapted(tiny_dirs, clip_dir):
    model = make("lavin", tiny_dirs, clip_dir)
    b = image_batch(model).replace(
        pixel_values=None, image_features=torch.zeros(1, model.cfg.num_query_tokens, model.vpg.width)
    )
    with pytest.raises(ValueError, match="clip_adapters"):
        model(b)


@pytest.mark.parametrize("name", PEERS)
def test_activation_checkpointing_gives_the_same_loss_and_gradients(name, tiny_dirs, clip_dir):
    from pipeline.training.activation_checkpointing import apply_activation_checkpointing

    res = []
    for checkpointed in (False, True):
        model = make(name, tiny_dirs, clip_dir, **({"dropout": 0.0} if name == "lavin" else {}))
        randomize(model)
        if checkpointed:
            assert apply_activation_checkpointing(model) == len(model.steps)
        loss = answer_loss(model, image_batch(model))
        loss.backward()
        res.append((loss.detach(), {n: p.grad.clone() for n, p in model.trainable_parameters()}))
    (l0, g0), (l1, g1) = res
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)


def _grad_order(model, batch) -> list[str]:
    order = []
    hooks = [
        p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n)) for n, p in model.trainable_parameters()
    ]
    answer_loss(model, batch).backward()
    for h in hooks:
        h.remove()
    return order


@pytest.mark.parametrize("name", PEERS)
def test_text_only_micro_batch_has_the_image_batch_gradient_graph(name, tiny_dirs, clip_dir):
    """DeepSpeed ZeRO-2 reduces gradients in hook order: a rank whose micro-batch has no image must produce the same
    parameters' gradients in the same order as a rank whose micro-batch has one (else a collective mismatch)."""
    model = make(name, tiny_dirs, clip_dir, **({"dropout": 0.0} if name == "lavin" else {}))
    randomize(model)
    model.train()
    b = image_batch(model)
    with_image = _grad_order(model, b)
    model.zero_grad()
    text = b.replace(modality_mask=torch.zeros_like(b.modality_mask), pixel_values=None)
    text_only = _grad_order(model, text)
    assert text_only == with_image and len(with_image) == len(model.trainable_parameters())


@pytest.mark.parametrize(
    "preset,method,stages",
    [
        ("llama_adapter_scienceqa", "llama_adapter", [2]),
        ("lavin_scienceqa", "lavin", [2]),
        ("excitor_scienceqa", "excitor", [2]),
        ("iaa_llava", "iaa", [1, 2]),
    ],
)
def test_peer_presets_load_and_fill_every_ds_config(preset, method, stages):
    from pathlib import Path

    from pipeline.training.config import load_config
    from pipeline.training.ds_config import fill_ds_config, load_ds_config, plan_batch

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / f"{preset}.yaml")
    assert cfg.model.method == method and [s.stage for s in cfg.stages] == stages
    assert isinstance(cfg.model.options, get_method(method).config_cls)  # model.options is typed by the method
    for ds in ("zero1", "zero2", "zero3", "zero2_offload"):
        raw = load_ds_config(repo / "ds_configs" / f"{ds}.json")
        for s in cfg.stages:
            plan = plan_batch(s, 8)
            d = fill_ds_config(raw, cfg, s, plan, torch.device("cpu"), hidden_size=64)
            assert "auto" not in json.dumps(d)
