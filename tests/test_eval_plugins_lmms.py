"""lmms-eval plug-in (`--model pill`, found through the `lmms_eval.models` entry point): lmms-eval's evaluator on a
local task made from the demo's held-out shards gets exactly pipeline.eval.scienceqa's accuracy on the same samples,
with the same generation for every sample."""

from __future__ import annotations

import json
import os
import tarfile
from importlib.metadata import entry_points

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the task's data are local files: never the hub
pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the Makefile installs it without dependencies)")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402
from PIL import ImageFile  # noqa: E402

from pipeline.eval import scienceqa  # noqa: E402
from shards.demo import DemoConfig, build_demo  # noqa: E402
from tests.test_serve_support import build_export  # noqa: E402

# lmms_eval.api.task sets Pillow's process-wide LOAD_TRUNCATED_IMAGES at import, and pytest imports this module while
# collecting: without the reset every later test decodes truncated images silently (test_data_jpeg saw it).
ImageFile.LOAD_TRUNCATED_IMAGES = False

pytestmark = pytest.mark.slow
TASK = "pill_demo_sqa"


def _task(root, shards_dir):
    """The held-out shards as a local dataset (one JSON row per record: its json fields + its picture's path) and a
    task YAML whose prompt, image and scoring are the plug-in's ScienceQA helpers."""
    d = root / "task"
    (d / "images").mkdir(parents=True)
    rows = []
    for shard in sorted(shards_dir.glob("val-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name in sorted(n for n in members if n.endswith(".json")):
            key = name[: -len(".json")]
            (d / "images" / f"{key}.png").write_bytes(members[f"{key}.png"])
            rows.append({**json.loads(members[name]), "key": key, "image": str(d / "images" / f"{key}.png")})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "utils.py").write_text(
        "from pipeline.eval.lmms_plugin import sqa_doc_to_text as doc_to_text  # noqa: F401\n"
        "from pipeline.eval.lmms_plugin import sqa_doc_to_visual as doc_to_visual  # noqa: F401\n"
        "from pipeline.eval.lmms_plugin import sqa_process_results as process_results  # noqa: F401\n"
    )
    (d / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / 'data.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: !function utils.doc_to_text\n"
        "doc_to_target: answer\nprocess_results: !function utils.process_results\n"
        "generation_kwargs:\n  max_new_tokens: 16\n  temperature: 0\n  do_sample: false\n  until: []\n"
        "metric_list:\n  - metric: accuracy\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    return d, rows


def test_entry_point_registers_pill():
    assert any(ep.name == "pill" for ep in entry_points(group="lmms_eval.models"))


def test_lmms_eval_accuracy_equals_scienceqa(tiny_dirs, tmp_path):
    shards = tmp_path / "demo"
    build_demo(DemoConfig(n_train=2, n_val=10, seed=0), shards)
    task_dir, rows = _task(tmp_path, shards)
    export = build_export(tiny_dirs, tmp_path / "export")
    llm, vpg = str(tiny_dirs["llm"]), str(tiny_dirs["vpg"])

    argv = ["--llm", llm, "--vpg", vpg, "--adapter", str(export), "--attn-backend", "sdpa", "--device", "cpu",
            "--shards", str(shards / "val-index.json"), "--out-dir", str(tmp_path / "sqa"),
            "--max-new-tokens", "16"]  # fmt: skip
    assert scienceqa.main(argv) == 0
    sqa = json.loads((tmp_path / "sqa" / "scores.json").read_text())
    preds = [json.loads(line) for line in (tmp_path / "sqa" / "predictions.jsonl").read_text().splitlines()]

    out = simple_evaluate(
        model="pill", model_args=f"llm={llm},vpg={vpg},adapter={export},attn_backend=sdpa,device=cpu,batch_size=4",
        tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
    )  # fmt: skip
    accuracy = out["results"][TASK]["accuracy,none"]
    assert sqa["n"] == len(rows) == len(out["samples"][TASK]) == 10
    assert round(accuracy, 2) == sqa["accuracy"], (accuracy, sqa["accuracy"])
    by_key = {p["key"]: p["generation"] for p in preds}
    for s in out["samples"][TASK]:
        assert s["resps"][0][0] == by_key[s["doc"]["key"]], s["doc"]["key"]
