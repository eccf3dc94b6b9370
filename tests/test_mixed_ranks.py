"""A mixed stage through the real trainer: ScienceQA with images + text-only chat (the records `shards.replay`
writes) as `stages.N.sources`, 2 ranks, global batches where one rank's micro-batch holds no image while the
other's does: it trains under ZeRO-2 (PILL and every peer) and ZeRO-3 (PILL, and Excitor for the peers' shared
front_end_features; LaVIN runs its own blank image) without a hang, and metrics.jsonl carries per-source samples
and per-source loss. Config validation of `sources:` first (no launch)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.data.mix import MixSchedule, MixSpec
from pipeline.model import PILLConfig, load_pill
from pipeline.model.batch import Batch
from pipeline.training.config import ConfigError, config_from_dict
from pipeline.training.loss import Loss, answer_loss
from pipeline.training.sources import answer_sources, source_counts
from tests.test_data_mix import write_chat_shards
from tests.test_peers_models import clip_dir  # noqa: F401  (fixture)
from tests.test_train_ds import REPO, _run

MB, WORLD = 2, 2  # micro-batch per rank, ranks: a global batch of 4 = 2 ScienceQA + 2 chat


def _stage(sources, **over):
    return {"stage": 2, "task": "scienceqa", "sources": sources, "max_steps": 2, "micro_batch_size": MB, **over}


@pytest.mark.parametrize(
    "sources,named",
    [
        ([{"name": "a", "shards": ["x.tar"], "weight": 0}], "stages.0.sources.0.weight must be a number > 0"),
        ([{"shards": ["x.tar"]}, {"shards": []}], "stages.0.sources.1.shards is empty"),
        ([{"name": "a", "shards": ["x.tar"]}, {"name": "a", "shards": ["y.tar"]}], "stages.0.sources.1.name: 'a'"),
        ([{"name": "a", "shards": ["x.tar"], "task": "vqa"}], "stages.0.sources.0.task must be one of"),
    ],
)
def test_bad_sources_are_errors_naming_the_field(sources, named):
    with pytest.raises(ConfigError, match=named):
        config_from_dict({"stages": [_stage(sources)]}).validate()


def test_sources_and_train_shards_together_are_an_error():
    with pytest.raises(ConfigError, match="stages.0: give either sources or train_shards"):
        config_from_dict({"stages": [_stage([{"shards": ["x.tar"]}], train_shards=["y.tar"])]}).validate()


def test_a_sources_shard_that_does_not_exist_is_named_before_launch(tmp_path):
    from pipeline.train import check_paths

    cfg = config_from_dict({"stages": [_stage([{"name": "a", "shards": [str(tmp_path / "none-{000..001}.tar")]}])]})
    with pytest.raises(ConfigError, match="stages.0.sources.0.shards: source stages.0.sources.0.shards: none of"):
        check_paths(cfg)


def _row(seed: int, answer_len: int, image: bool, T: int = 20) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 400, (1, T), generator=g)
    mm = torch.zeros(1, T, dtype=torch.bool)
    if image:
        mm[0, 2:10] = True
    labels = torch.full_like(ids, -100)
    labels[0, T - answer_len :] = ids[0, T - answer_len :]
    return Batch(input_ids=ids, attention_mask=torch.ones_like(ids), modality_mask=mm, labels=labels, num_samples=1)


def test_per_source_loss_is_each_sources_answer_ce_over_its_answer_tokens(tiny_dirs):
    """LossResult.by_source of a mixed micro-batch (image rows of source 0, a text-only row of source 1) equals
    each row's own answer CE sum, from the same head call as the loss (whose value is unchanged)."""
    torch.manual_seed(0)
    model = load_pill(
        tiny_dirs["llm"], None, PILLConfig(stage=2, rank=4, num_query_tokens=8, vpg_width=64), dtype=torch.float32
    )
    model.eval()  # no dropout: the rows alone must see the same model
    rows = [_row(0, 4, True), _row(1, 3, False), _row(2, 5, True)]
    feats = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    cat = {
        k: torch.cat([getattr(r, k) for r in rows]) for k in ("input_ids", "attention_mask", "modality_mask", "labels")
    }
    batch = Batch(**cat, image_features=feats, source=torch.tensor([0, 1, 0]), num_samples=3)
    mixed = Loss()
    mixed.n_sources = 2
    out = model(batch)
    got = mixed(model, out, batch, mixed.counts(batch), 1)
    plain = Loss()(model, out, batch, Loss().counts(batch), 1)
    torch.testing.assert_close(got.loss, plain.loss)
    # independently: the (B, T, V) logits of the whole batch, the CE of every answer token, summed per row
    logits = model.output_logits(out)[:, :-1].float()
    targets = batch.labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    per_row = ce.sum(1)
    torch.testing.assert_close(got.by_source, torch.stack([per_row[0] + per_row[2], per_row[1]]).detach())
    # the text-only row's loss is its own whatever rows share its micro-batch
    torch.testing.assert_close(answer_loss(model, rows[1]) * 3, per_row[1], rtol=1e-4, atol=1e-4)
    assert source_counts(batch, 2).tolist() == [[2.0, 1.0], [9.0, 3.0]]


def test_answer_sources_of_a_packed_batch_follow_the_documents():
    labels = torch.full((1, 9), -100)
    labels[0, 3:5] = 7  # document 0 = positions 0..4, its answer at 3, 4
    labels[0, 7:9] = 7  # document 1 = positions 5..8, its answer at 7, 8
    batch = Batch(
        input_ids=torch.zeros(1, 9, dtype=torch.long),
        labels=labels,
        cu_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32),
        source=torch.tensor([1, 0]),
        num_samples=2,
    )
    keep = labels[:, 1:] != -100
    assert answer_sources(batch, keep).tolist() == [1, 1, 0, 0]


# ---- 2 ranks through the trainer ----------------------------------------------------------------------------------

SEED = 3  # chosen: both global batches put the two chat rows on rank 0 (checked below)
STAGE_SEED = SEED + 1000 * 2  # the loader's seed for a stage-2 stage (pipeline.training.data_glue)
STEPS = 2


def test_the_chosen_seed_gives_a_rank_a_micro_batch_without_image():
    """The runs below train on a global batch where one rank holds only chat rows and the other only images."""
    sch = MixSchedule(MixSpec((1.0, 1.0), MB * WORLD, STAGE_SEED))
    layouts = [sch.batch(g).reshape(WORLD, MB).tolist() for g in range(STEPS)]
    assert all(lay == [[1, 1], [0, 0]] for lay in layouts), layouts  # rank 0: chat only, rank 1: images only


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    from shards.demo import DemoConfig, build_demo

    root = tmp_path_factory.mktemp("mixed_ranks")
    build_demo(DemoConfig(n_train=32, n_val=8, seed=0), root / "data", max_samples=16)
    write_chat_shards(root / "chat", 2, 6)
    return root


def _config(workdir: Path, method: str, zero: int) -> Path:
    name = f"{method}_z{zero}"
    sources = [
        {"name": "sqa", "shards": [str(workdir / "data" / "train-index.json")], "weight": 1.0, "task": "scienceqa"},
        {"name": "chat", "shards": [str(workdir / "chat")], "weight": 1.0, "task": "chat"},
    ]
    cfg = {
        "name": name,
        "output_dir": str(workdir / name),
        "seed": SEED,
        "precision": "fp32",
        "model": {"method": method, "llm_path": "tiny", "vpg_path": "tiny", "options": {"attn_backend": "sdpa"}},
        "data": {"max_length": 400, "num_workers": 0, "shuffle_buffer": 4, "sqa_format": "QCM-A"},
        "stages": [_stage(sources, max_steps=STEPS, grad_accum=1, lr=1e-3, warmup_steps=1)],
        "checkpoint": {"every_steps": 0, "keep_last": 1},
        "log": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
        "eval": {"enabled": False},
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_each_python_installation_builds_deepspeeds_shm_op_in_its_own_directory(tmp_path, monkeypatch):
    """What made the 2-rank runs below time out (180 s) in full-suite runs, llama_adapter and iaa under ZeRO-2 the
    unlucky ones (issue 27): DeepSpeed's CPU backend JIT-compiles its shm comm op inside init_distributed, in
    torch's per-Python-version cache shared by every venv, and a second venv (the CI clone beside this checkout)
    made each rank wait on that build's lock file for minutes (stacks: FileBaton.wait under build_shm_op on both
    ranks, no collective entered). A rank's init_distributed now builds in its installation's own directory; an
    explicit TORCH_EXTENSIONS_DIR is kept."""
    import sys

    import torch.distributed as tdist
    from torch.utils.cpp_extension import _get_build_directory

    from pipeline.training import dist as pdist

    built_in = []

    def init_group(**kwargs):  # where DeepSpeed's build_shm_op would build, as the process group is set up
        built_in.append(_get_build_directory("deepspeed_shm_comm", False))

    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(pdist.deepspeed, "init_distributed", init_group)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # torch's default root, made by the lookup
    ranks = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in {**ranks, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    for venv in ("venv-a", "venv-b", "venv-a"):
        # "" is unset to the helper; setenv (not delenv of an absent name) has monkeypatch restore it afterwards,
        # or the rank launches of the tests below would inherit a fresh, uncompiled directory
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
        monkeypatch.setattr(sys, "prefix", str(tmp_path / venv))
        pdist.init_distributed()
    assert built_in[0] == built_in[2] != built_in[1], built_in
    assert all(d.startswith(str(tmp_path / "cache" / "torch_extensions")) for d in built_in), built_in
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "mine"))
    pdist.init_distributed()
    assert built_in[-1] == str(tmp_path / "mine" / "deepspeed_shm_comm")


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,zero",
    [(m, 2) for m in ("pill", "lavin", "excitor", "llama_adapter", "iaa")] + [("pill", 3), ("excitor", 3)],
)
def test_text_only_rows_on_one_rank_train_without_a_hang(workdir, method, zero):
    ds = str(REPO / "ds_configs" / f"zero{zero}.json")
    rcs, out = _run(_config(workdir, method, zero), extra=["--ds_config", ds])
    assert rcs == [0, 0], out[-4000:]
    rows = [json.loads(x) for x in (workdir / f"{method}_z{zero}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["source_samples/sqa"] == r["source_samples/chat"] == MB  # 1:1 in every global batch of 4
        for name in ("sqa", "chat"):
            assert math.isfinite(r[f"source_loss/{name}"]) and r[f"source_loss/{name}"] > 0, r
    last = rows[-1]
    assert last["source_read/chat"] == STEPS * MB and last["source_epoch/chat"] == pytest.approx(STEPS * MB / 12)


@pytest.mark.slow
def test_resuming_a_mixed_stage_with_another_mix_is_a_config_error(workdir, tmp_path):
    """The pill ZeRO-2 run's checkpoint, as if stopped before the stage's end (no result.json), resumed with the chat
    source's weight changed (accepted by --resume-changed): exit 2 naming the change, nothing trained."""
    import shutil

    run = workdir / "pill_z2"
    if not (run / "checkpoints" / "latest").exists():
        pytest.skip("needs the pill ZeRO-2 run of test_text_only_rows_on_one_rank_train_without_a_hang")
    copy = tmp_path / "stopped"
    shutil.copytree(run, copy)
    (copy / "result.json").unlink()
    cfg = yaml.safe_load(_config(workdir, "pill", 2).read_text())
    cfg["output_dir"] = str(copy)
    cfg["stages"][0]["sources"][1]["weight"] = 2.0
    cfg["stages"][0]["max_steps"] = STEPS + 1
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "tiny").symlink_to(workdir / "tiny", target_is_directory=True)
    rcs, out = _run(path, world=1, extra=["--resume-changed"])
    assert rcs == [2], out[-3000:]
    assert "config error: resume: the checkpoint's data position belongs to another mix" in out, out[-3000:]
    assert "source chat: weight 1.0 -> 2.0" in out


def _micro_batch(model, image: bool, rows: int = 2, T: int = 24) -> Batch:
    """Every row with one image (K placeholders at position 2, one blank 224 px picture each), or none at all."""
    K = model.cfg.num_query_tokens
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(5, 400, (rows, T + K), generator=g)
    mm = torch.zeros_like(ids, dtype=torch.bool)
    if image:
        mm[:, 2 : 2 + K] = True
    labels = torch.full_like(ids, -100)
    labels[:, -6:] = ids[:, -6:]
    pixels = torch.randn(rows, 3, 224, 224, generator=g) if image else None
    attn = torch.ones_like(ids)
    return Batch(input_ids=ids, attention_mask=attn, modality_mask=mm, labels=labels, pixel_values=pixels)


@pytest.mark.parametrize("method", ["pill", "llama_adapter", "lavin", "excitor", "iaa"])
def test_a_micro_batch_without_image_readies_the_same_gradients_in_the_same_order(method, tiny_dirs, clip_dir):  # noqa: F811
    """ZeRO-2 copies each gradient into its reduction bucket as its hook fires and reduces a bucket when it is full:
    ranks must fire the same hooks in the same order whatever their micro-batch holds (pipeline.model.seq,
    same_graph_on_every_rank). Checked in one process: an image-only and an image-free micro-batch."""
    from pipeline.model import get_method, load_method

    torch.manual_seed(0)
    vision = tiny_dirs["vpg"] if method == "pill" else clip_dir
    model = load_method(method, tiny_dirs["llm"], vision, get_method(method).config_cls(), dtype=torch.float32)
    model.train()
    fired: list[str] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, name=name: fired.append(name))
    order = {}
    for image in (True, False):
        fired.clear()
        model.zero_grad()
        answer_loss(model, _micro_batch(model, image)).backward()
        order[image] = list(fired)
    assert order[True] and sorted(order[True]) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert order[False] == order[True]
