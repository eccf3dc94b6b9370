"""The papercuts of issue 28, item 6 (and the evaluation half of item 1): each message names the file or field."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from pipeline.training.config import ConfigError, load_config_with_sources
from tests.reliability import REPO, env

PY = sys.executable
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_name_the_index_files_the_builders_write():
    # The builders' default names (shards/*.py writer_config(..., name)): llava_pretrain, llava_instruct,
    # scienceqa-<split>; the demo writes train / val; shards.encode and shards.replay keep or take a --name.
    written = re.compile(
        r"^(llava_pretrain|llava_instruct|scienceqa-(train|val|test|trainval|minitrain|minival|minitest)"
        r"|replay|\{name\}|\*)-index\.json$"
    )
    for src, name in (("llava_pretrain", '"llava_pretrain"'), ("scienceqa", 'f"scienceqa-{a.split}"')):
        assert name in (REPO / "shards" / f"{src}.py").read_text()
    bad = []
    for doc in DOCS:
        for m in re.finditer(r"([\w./{}*-]+)-index\.json", doc.read_text()):
            path = m.group(0)
            name = path.rsplit("/", 1)[-1]
            if "demo" in path or "/tmp/" in path:  # the demo set: train-index.json / val-index.json
                continue
            if not written.match(name):
                bad.append(f"{doc.name}: {path}")
    assert not bad, bad


def test_missing_stage_says_stages_are_numbered_from_0():
    with pytest.raises(ConfigError) as e:
        load_config_with_sources(str(REPO / "configs" / "demo.yaml"), ["stages.2.max_steps=5"])
    msg = str(e.value)
    assert "stages.2" in msg and "numbered from 0" in msg and "0, 1" in msg, msg
    assert "numbered from 0" in (REPO / "README.md").read_text()


def test_max_steps_override_replaces_the_presets_epochs():
    preset = next(
        p for p in sorted((REPO / "configs").glob("*.yaml")) if re.search(r"^\s+epochs:", p.read_text(), re.M)
    )
    i = next(i for i, s in enumerate(load_config_with_sources(str(preset), [])[0].stages) if s.epochs is not None)
    cfg, _ = load_config_with_sources(str(preset), [f"stages.{i}.max_steps=5"])
    assert cfg.stages[i].max_steps == 5 and cfg.stages[i].epochs is None


def test_readme_names_the_master_port():
    assert "--master_port" in (REPO / "README.md").read_text()


def test_first_line_within_5_seconds(tmp_path):
    t0 = time.time()
    p = subprocess.Popen(
        [PY, "pipeline/train.py", "--config", "demo", "--print-config"],
        cwd=REPO,
        env=env(tmp_path),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    first = p.stderr.readline()
    took = time.time() - t0
    p.kill()
    p.communicate()
    assert "starting" in first and took < 5, (first, took)


@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, named",
    [
        (
            [
                "-m",
                "shards.scienceqa",
                "--problems",
                "nope.json",
                "--pid-splits",
                "x.json",
                "--images",
                ".",
                "--split",
                "train",
                "--out",
                "{tmp}/o",
            ],
            "nope.json",
        ),
        (["-m", "shards.llava_pretrain", "--json", "nope.json", "--images", ".", "--out", "{tmp}/o"], "nope.json"),
        (["-m", "pipeline.generate", "--llm", "tiny", "--prompt", "hi", "--image", "nope.png"], "nope.png"),
        (
            ["-m", "pipeline.eval.cli", "mme", "--llm", "tiny", "--mme-root", "nope_dir", "--out-dir", "{tmp}/o"],
            "nope_dir",
        ),
    ],
    ids=["shards.scienceqa", "shards.llava_pretrain", "pipeline.generate", "pill-eval"],
)
def test_argument_errors_are_one_line_exit_2(tmp_path, argv, named):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    p = subprocess.run([PY, *argv], cwd=REPO, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip() and "WARNING" not in x and "[real_accelerator" not in x]
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and len(lines) == 1 and named in lines[0], p.stderr[-3000:]


def test_readme_memory_figures_are_what_the_cli_prints(capsys):
    from pipeline.params import main as params

    said = re.search(r"predicts ([\d.]+) GB per GPU.*?\(([\d.]+) GB without", (REPO / "README.md").read_text(), re.S)
    assert said, "README: the memory sentence moved"
    base = ["--memory", "--llm-preset", "llama2-7b", "--stage", "2", "--micro-batch", "4", "--seq", "512"]
    for flag, figure in (("--checkpointing", said.group(1)), (None, said.group(2))):
        assert params(base + ([flag] if flag else [])) == 0  # the CLI's main, in this process: no 6 s start each
        peak = float(re.search(r"predicted_peak_gb=([\d.]+)", capsys.readouterr().out).group(1))
        assert f"{peak:.2f}" == figure, (flag, peak, figure)


def test_mme_with_no_scored_question_is_an_error():
    from pipeline.eval.mme_scoring import score_mme

    with pytest.raises(ValueError, match="no MME question was scored"):
        score_mme([])
