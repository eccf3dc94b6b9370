"""lm-eval plug-in (`--model pill`): on a local task built here, the frozen LLM through the plug-in (a fresh PILL,
the method's own forward and KV-cache decoding) scores what lm-eval's own `hf` model scores on the LLM dir; the
before/after table of pipeline.eval.text_bench."""

from __future__ import annotations

import json
import math
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' data are local files: never the hub
lm_eval = pytest.importorskip("lm_eval", reason="the lmeval extra (lm-eval) is not installed")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import pipeline.eval.lm_eval_plugin  # noqa: E402,F401  (registers --model pill)
from pipeline.eval import text_bench  # noqa: E402
from tests.test_serve_support import build_export  # noqa: E402

pytestmark = pytest.mark.slow
TASKS = ["pill_local_mc", "pill_local_rolling", "pill_local_gen"]
QUESTIONS = [
    ("The sky on a clear day is", ["blue", "green", "loud", "square"], 0),
    ("Two plus two equals", ["four", "seven", "a cat", "never"], 0),
    ("Water freezes at zero degrees", ["Celsius", "tables", "running", "purple"], 0),
    ("The opposite of hot is", ["cold", "bright", "tall", "slow"], 0),
    ("A week has seven", ["days", "apples", "oceans", "wheels"], 0),
    ("Birds can usually", ["fly", "melt", "compile", "vote"], 0),
]
TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "In the beginning there was a small village at the edge of a forest.",
    "Numbers such as one, two and three are used for counting things.",
]


def _task_dir(root):
    """Three local tasks (JSONL files + YAML): multiple choice (loglikelihood), rolling perplexity, greedy
    generation with a stop string."""
    d = root / "tasks"
    d.mkdir()
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "text.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"

    def data(name):
        return f"dataset_kwargs:\n  data_files:\n    test: {d / name}\n"

    (d / "mc.yaml").write_text(
        f"task: pill_local_mc\n{common}{data('mc.jsonl')}output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (d / "rolling.yaml").write_text(
        f"task: pill_local_rolling\n{common}{data('text.jsonl')}output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (d / "gen.yaml").write_text(
        f"task: pill_local_gen\n{common}{data('mc.jsonl')}output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: "{{choices[answer]}}"\n'
        'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return d


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return _task_dir(tmp_path_factory.mktemp("lm_eval"))


def _run(model: str, model_args: dict, tasks) -> dict:
    return simple_evaluate(
        model=model, model_args=model_args, tasks=TASKS, task_manager=TaskManager(include_path=str(tasks)),
        batch_size=4, log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def frozen_through_plugin(tiny_dirs, tasks) -> dict:
    """The frozen LLM through the plug-in on every task: compared with `hf` below and with text_bench's row."""
    llm = str(tiny_dirs["llm"])
    return _run("pill", {"llm": llm, "attn_backend": "sdpa", "device": "cpu", "dtype": "float32"}, tasks)


def test_frozen_llm_through_plugin_equals_hf(tiny_dirs, tasks, frozen_through_plugin):
    ours = frozen_through_plugin
    ref = _run("hf", {"pretrained": str(tiny_dirs["llm"]), "device": "cpu", "dtype": "float32"}, tasks)
    for task in TASKS:
        mine, theirs = ours["results"][task], ref["results"][task]
        metrics = [k for k in theirs if "," in k and "stderr" not in k]
        assert metrics, theirs
        for k in metrics:
            assert math.isclose(mine[k], theirs[k], rel_tol=1e-4, abs_tol=1e-6), (task, k, mine[k], theirs[k])
    # per sample: the same log-likelihoods (to fp32 reordering), the same greedy flags and generations
    for task in TASKS:
        for a, b in zip(ours["samples"][task], ref["samples"][task], strict=True):
            ra, rb = a["filtered_resps"], b["filtered_resps"]
            if task == "pill_local_gen":
                assert ra == rb
                continue
            for x, y in zip(map(_pair, ra), map(_pair, rb), strict=True):
                assert math.isclose(x[0], y[0], rel_tol=1e-4, abs_tol=1e-4) and x[1:] == y[1:], (task, x, y)


def _pair(resp) -> tuple:
    """A filtered response as (log-likelihood, greedy flag or None)."""
    return (float(resp[0]), resp[1]) if isinstance(resp, (list, tuple)) else (float(resp), None)


def test_text_bench_before_after_table(tiny_dirs, tasks, frozen_through_plugin, tmp_path):
    """The frozen row is the plug-in without adapter; the trained row (a stage-2 export with random non-zero
    experts) differs on the text path; the table and JSON are written."""
    export = build_export(tiny_dirs, tmp_path / "export")
    argv = ["--tasks", "pill_local_mc", "pill_local_rolling", "--include-path", str(tasks), "--llm",
            str(tiny_dirs["llm"]), "--adapter", str(export), "--device", "cpu", "--dtype", "float32",
            "--attn-backend", "sdpa", "--batch-size", "4", "--out", str(tmp_path / "t.md"),
            "--json", str(tmp_path / "t.json")]  # fmt: skip
    assert text_bench.main(argv) == 0
    table = json.loads((tmp_path / "t.json").read_text())
    by_key = {(r["task"], r["metric"]): r for r in table}
    assert {("pill_local_mc", "acc"), ("pill_local_rolling", "word_perplexity")} <= set(by_key)
    frozen = frozen_through_plugin["results"]
    for (task, metric), r in by_key.items():
        assert math.isclose(r["frozen"], frozen[task][f"{metric},none"], rel_tol=1e-6)
        assert math.isclose(r["change"], r["trained"] - r["frozen"], abs_tol=1e-9)
    assert by_key[("pill_local_rolling", "word_perplexity")]["change"] != 0  # the adapter reaches the text path
    assert (tmp_path / "t.md").read_text().startswith("| task | metric | frozen LLM | trained | change |")
    assert text_bench.main(argv[:-4] + ["--adapter", str(tmp_path / "missing")]) == 2
