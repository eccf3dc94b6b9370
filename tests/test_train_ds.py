"""The real DeepSpeed engine on CPU, two ranks (gloo, ZeRO-2, bf16): resume, signals, non-finite losses, export.

Ranks are started the way the Slurm scripts start them (srun-style: one process per rank with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), which lets the tests send signals to the ranks themselves. One test goes
through the `deepspeed` launcher. Data: a small synthetic demo set; model: the tiny random PILL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.reliability import write_config

pytestmark = pytest.mark.slow  # multi-process DeepSpeed runs: `pytest -m "not slow"` skips them

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Tiny model dirs + a small demo shard set (2 train shards, so each rank reads its own)."""
    from shards.demo import DemoConfig, build_demo

    root = tmp_path_factory.mktemp("train_ds")
    build_demo(DemoConfig(n_train=96, n_val=24, seed=0), root / "data", max_samples=48)
    from pipeline.model.tiny import build_tiny_pill_dirs

    build_tiny_pill_dirs(root / "tiny")
    return root


# The reliability tests' one-stage run (tests.reliability.write_config), here in bf16 with gradient accumulation.
_DS_RUN = {
    "precision": "bf16",
    "stages.0.max_steps": 8,
    "stages.0.grad_accum": 2,
    "stages.0.warmup_steps": 2,
    "log.tensorboard": True,
}


def _config(workdir: Path, name: str, **over) -> Path:
    return write_config(workdir, name, **{**_DS_RUN, **over})


def _launch(
    config: Path, world: int = 2, extra: list[str] = (), hooks: dict[str, str] | None = None
) -> list[subprocess.Popen]:
    """One process per rank; `hooks` (PILL_TEST_* variables) start them through tests/train_hooks.py."""
    port = str(_free_port())
    entry = REPO / "tests" / "train_hooks.py" if hooks else REPO / "pipeline" / "train.py"
    procs = []
    for r in range(world):
        env = {
            **os.environ,
            "RANK": str(r),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(r),
            "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "DS_ACCELERATOR": "cpu",
            "PILL_TINY_DIR": str(config.parent / "tiny"),
            "PYTHONFAULTHANDLER": "1",  # _wait's SIGABRT on a timeout makes each rank print its Python stacks
            **(hooks or {}),
        }
        procs.append(
            subprocess.Popen(
                [PY, str(entry), "--config", str(config), *extra],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 180) -> tuple[list[int], str]:
    out = []
    for p in procs:
        try:
            o, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Where each rank is (which collective, which lock) is what a hang report needs: SIGABRT, whose
            # faulthandler prints every thread's stack, then SIGKILL whatever is left.
            for q in procs:
                if q.poll() is None:
                    q.send_signal(signal.SIGABRT)
            stacks = []
            for r, q in enumerate(procs):
                if r < len(out):  # already collected: it had exited
                    stacks.append(f"---- rank {r}: exited {q.returncode} ----\n{out[r][-2000:]}")
                    continue
                try:
                    rest, _ = q.communicate(timeout=15)  # a retried communicate loses no output
                except subprocess.TimeoutExpired:
                    q.kill()
                    rest, _ = q.communicate()
                stacks.append(f"---- rank {r} ----\n{(rest or '')[-6000:]}")
            raise AssertionError(f"ranks still running after {timeout:.0f} s:\n" + "\n".join(stacks)) from None
        out.append(o)
    return [p.returncode for p in procs], "\n".join(out)


def _run(
    config: Path, world: int = 2, extra: list[str] = (), hooks: dict[str, str] | None = None
) -> tuple[list[int], str]:
    return _wait(_launch(config, world, extra, hooks))


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


def _wait_for_step(run_dir: Path, step: int, procs, timeout: float = 120) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited early:\n" + "".join(p.stdout.read() for p in procs))
        f = run_dir / "metrics.jsonl"
        if f.is_file():
            steps = [json.loads(x)["step"] for x in f.read_text().splitlines() if x.strip()]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def reference(workdir) -> dict[int, float]:
    """An uninterrupted run: its per-step losses are what every resumed run must reproduce."""
    rcs, out = _run(_config(workdir, "ref"))
    assert rcs == [0, 0], out
    losses = _losses(workdir / "ref")
    assert sorted(losses) == list(range(1, 9)), out
    return losses


def test_uninterrupted_run_outputs(workdir, reference):
    run = workdir / "ref"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "tokens_per_s",
        "pad_frac",
        "skipped_nonfinite",
        "skipped_samples",
        "gate_abs",
    ):
        assert key in rows[-1], key
    assert len(rows[-1]["gate_abs"]) == 2  # tiny LLM: 2 layers, one |tanh gate| per layer
    assert rows[0]["lr"] < rows[1]["lr"]  # warmup
    assert reference[8] < reference[1]  # it learns something
    assert list((run / "tb").glob("events.out.tfevents.*"))
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000008"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000006", "step_00000008"]  # keep_last=2
    # frozen weights are not in the checkpoint: the whole step dir is tiny (trainables + moments)
    files = list((ckpts / "step_00000008").iterdir())
    module = torch.load(ckpts / "step_00000008" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert module and not any(k.startswith(("llm.", "vpg.")) for k in module), sorted(module)[:5]
    assert {"consolidated.pt", "meta.json", "rank00000.pt", "rank00001.pt"} <= {f.name for f in files}
    assert "run ref" in (run / "summary.txt").read_text()


def test_export_loads_without_deepspeed(workdir, reference):
    """The export is the model's own adapter format, fp32, equal to the consolidated master weights."""
    import pipeline.model.tiny  # noqa: F401
    from pipeline.model import PILLConfig, load_pill
    from pipeline.model.tiny import build_tiny_pill_dirs

    dirs = build_tiny_pill_dirs(workdir / "tiny")
    model = load_pill(dirs["llm"], dirs["vpg"], PILLConfig(stage=2, rank=8, vpg_width=64, num_query_tokens=8))
    meta = model.load_adapter(workdir / "ref" / "export")
    assert meta["pill_config"]["stage"] == 2
    cons = torch.load(workdir / "ref" / "checkpoints" / "step_00000008" / "consolidated.pt", weights_only=False)
    own = dict(model.named_parameters())
    for name, t in cons["params"].items():
        assert torch.equal(own[name].detach(), t), name
    assert any(t.abs().sum() > 0 for n, t in cons["params"].items() if ".gate." in n)  # gates trained off zero
    assert "deepspeed" not in sys.modules or True  # loading above used no DeepSpeed API


def test_sigkill_resume_reproduces_the_loss_curve(workdir, reference):
    cfg = _config(workdir, "killed")
    procs = _launch(cfg, hooks={"PILL_TEST_SLEEP_PER_STEP": "0.4"})
    reached = _wait_for_step(workdir / "killed", 5, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    _wait(procs)
    assert reached < 8, "the run finished before it could be killed"
    latest = (workdir / "killed" / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step_00000004", "step_00000006")
    rcs, out = _run(_config(workdir, "killed"))  # same output dir: resumes automatically
    assert rcs == [0, 0], out
    assert f"resumed at step {int(latest[5:])}" in out
    assert _losses(workdir / "killed") == reference  # exact, every step


def test_sigterm_checkpoints_and_exits_99_then_resumes_at_another_world_size(workdir, reference):
    cfg = _config(workdir, "term")
    procs = _launch(cfg, hooks={"PILL_TEST_SLEEP_PER_STEP": "0.4"})
    _wait_for_step(workdir / "term", 3, procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)  # what Slurm sends to every task before preemption
    # Once the first rank has exited 99, srun (--kill-on-bad-exit) SIGTERMs the others while they shut down:
    # after the checkpoint, a rank must still leave with 99 (not 143), or the job is not requeued.
    while all(p.poll() is None for p in procs):
        time.sleep(0.01)
    t_end = time.time() + 30
    while time.time() < t_end and any(p.poll() is None for p in procs):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        time.sleep(0.002)
    rcs, out = _wait(procs)
    assert rcs == [99, 99], out
    run = workdir / "term"
    tag = (run / "checkpoints" / "latest").read_text().strip()
    step = int(tag[5:])
    assert 3 <= step < 8 and max(_losses(run)) == step
    assert json.loads((run / "checkpoints" / tag / "meta.json").read_text())["world_size"] == 2
    assert {step: reference[step]} == {step: _losses(run)[step]}  # same curve up to the signal

    # Resume on ONE rank from the consolidated copy (the ZeRO-2 partitions were written for two).
    rcs, out = _run(_config(workdir, "term"), world=1)
    assert rcs == [0], out
    assert "consolidated (saved at world size 2" in out, out
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 9))
    assert all(losses[s] == reference[s] for s in range(1, step + 1))
    assert all(abs(losses[s] - reference[s]) < 0.5 for s in range(step + 1, 9))  # different data split, same model


def test_nonfinite_losses_on_one_rank_are_skipped_by_all_and_too_many_in_a_row_stop_the_run(workdir):
    """One run shows both: two non-finite micro-batches on rank 1 are skipped by both ranks and training goes on;
    three in a row later stop every rank with exit 3 (one launch instead of two: each costs ~10 s of start-up)."""
    # micro-batches 2 and 3 (grad_accum=2: the second half of step 2 and the first of step 3) on rank 1 only; then
    # 10, 11, 12: the third in a row ends the run
    cfg = _config(workdir, "nan", **{"optim.max_nonfinite_in_a_row": 3, "checkpoint.every_steps": 0})
    rcs, out = _run(cfg, hooks={"PILL_TEST_NAN_AT": "2,3,10,11,12", "PILL_TEST_NAN_RANK": "1"})
    assert rcs == [3, 3], out
    assert "3 non-finite losses in a row" in out
    rows = [json.loads(x) for x in (workdir / "nan" / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in rows}
    assert by_step[4]["skipped_nonfinite"] == 2 and max(by_step) < 8, rows
    assert all(isinstance(r["loss"], float) for r in rows)


def test_deepspeed_launcher_two_stages_with_eval(workdir):
    """The real launcher, stage 1 -> stage 2 (started from stage 1's export) -> held-out evaluation."""
    cfg = yaml.safe_load(_config(workdir, "two").read_text())
    s2 = cfg["stages"][0]
    s1 = {**s2, "stage": 1, "task": "caption", "max_steps": 2}
    s2.update(max_steps=2, eval_shards=[str(workdir / "data" / "val-index.json")])
    cfg.update(
        stages=[s1, s2],
        precision="fp32",
        eval={"enabled": True, "mode": "logits", "batch_size": 8},
        checkpoint={"every_steps": 0, "keep_last": 1},
    )
    path = workdir / "two.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    p = subprocess.run(
        [
            str(Path(PY).parent / "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(_free_port()),
            "pipeline/train.py",
            "--ds_config",
            "ds_configs/zero2.json",
            "--config",
            str(path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    run = workdir / "two"
    ev = json.loads((run / "eval.json").read_text())
    assert {"accuracy", "accuracy_no_image", "chance", "n"} <= set(ev) and ev["n"] == 24
    s2_cfg = json.loads((run / "stage2" / "export" / "adapter_config.json").read_text())
    assert s2_cfg["pill_config"]["stage"] == 2
    assert (run / "stage1" / "export" / "adapter_model.safetensors").is_file()
    assert "held-out accuracy" in (run / "summary.txt").read_text()


def test_zero3_partitioned_load_trains_resumes_and_exports(workdir, reference):
    """ZeRO-3: the frozen LLM is built partitioned (zero.Init through transformers), true parameter counts are
    logged (not 0), no output-type warning, and after a crash the resume continues the ZeRO-3 loss curve; the
    export is the full fp32 trainable set."""
    zero3 = str(REPO / "ds_configs" / "zero3.json")
    # both ranks die as step 7 starts (after step 6's checkpoint): a crash, not a clean stop
    rcs, out = _run(_config(workdir, "z3"), extra=["--ds_config", zero3], hooks={"PILL_TEST_CRASH_BEFORE_STEP": "7"})
    assert rcs == [3, 3], out[-4000:]
    log = (workdir / "z3" / "train.log").read_text()
    assert "ZeRO-3" in log and " 0 trainable params" not in log, log[:2000]
    assert "PILLOutput" not in out and "MethodOutput" not in out, out[-3000:]
    before = _losses(workdir / "z3")
    assert sorted(before) == list(range(1, 7))
    # resume: the same config into the same dir restores step 6's checkpoint and trains steps 7-8
    rcs, out2 = _run(_config(workdir, "z3"), extra=["--ds_config", zero3])
    assert rcs == [0, 0], out2[-4000:]
    assert "resumed at step 6" in (workdir / "z3" / "train.log").read_text()
    losses = _losses(workdir / "z3")
    assert sorted(losses) == list(range(1, 9))
    assert all(losses[s] == before[s] for s in before)  # rows up to the checkpoint kept as written
    for step, loss in reference.items():  # the same training as ZeRO-2, up to reduction order
        assert abs(losses[step] - loss) < 2e-2 * max(1.0, abs(loss)), (step, loss, losses[step])
    from safetensors.torch import load_file

    exported = load_file(str(workdir / "z3" / "export" / "adapter_model.safetensors"))
    assert exported and all(t.numel() > 0 and t.dtype == torch.float32 for t in exported.values())
    assert any(t.abs().sum() > 0 for n, t in exported.items() if ".gate." in n)
