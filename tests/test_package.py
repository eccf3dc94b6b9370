"""The installed distribution beside its peers: Hugging Face's `kernels` package, a non-editable install."""

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]

# The names transformers' hub_kernels integration imports from `kernels` when it believes the package present.
_HUB_NAMES = (
    "CUDAProperties",
    "Device",
    "KernelizeFallback",
    "LayerRepository",
    "LocalLayerRepository",
    "Mode",
    "ROCMProperties",
    "register_kernel_mapping",
    "replace_kernel_forward_from_hub",
    "use_kernel_mapping",
    "get_kernel",
    "kernelize",
    "use_kernel_forward_from_hub",
    "use_kernelized_func",
)


def _stub_hub_kernels(prefix: Path, version: str = "0.18.5") -> Path:
    """A `kernels` distribution at a version inside transformers' accepted range, in its own site dir."""
    pkg = prefix / "kernels"
    pkg.mkdir(parents=True)
    body = "\n".join(
        f"class {n}:\n    pass" if n[0].isupper() else f"def {n}(*args, **kwargs):\n    return lambda f: f"
        for n in _HUB_NAMES
    )  # decorator factories
    (pkg / "__init__.py").write_text(f'__version__ = "{version}"\nHUB_STUB = True\n' + body + "\n")
    info = prefix / f"kernels-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
    (info / "RECORD").write_text("")
    return prefix


def _run(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    # HOME is the scratch dir (no user config leaks in), but DeepSpeed's CPU shared-memory op keeps its build cache:
    # a fresh HOME would compile it again (30-150 s of C++), which tests nothing of ours. The same directory the
    # ranks of this interpreter build it in (pipeline.training.dist.own_extension_build_dir, computed here with the
    # real HOME): the bare default root would be a second copy, rebuilt by every other venv too.
    from pipeline.training.dist import own_extension_build_dir

    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1", "HOME": str(cwd)}
    env["TORCH_EXTENSIONS_DIR"] = own_extension_build_dir()
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_hub_kernels_installed_beside_us(tiny_dirs, tmp_path):
    """With HF's `kernels` present: a Llama loads, our ops import outside the repo, transformers sees the stub."""
    site = _stub_hub_kernels(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = _run(
        f"""
        import torch, kernels
        from transformers import AutoModelForCausalLM
        from transformers.utils import import_utils
        assert getattr(kernels, "HUB_STUB", False), kernels.__file__
        assert import_utils.is_kernels_available(), "transformers should see the other kernels package"
        m = AutoModelForCausalLM.from_pretrained({str(tiny_dirs["llm"])!r}, local_files_only=True)
        assert torch.isfinite(m(torch.tensor([[1, 5, 9, 12]])).logits).all()
        from pill_kernels import gated_attention, routed_swiglu_adapter
        from pipeline.model.attention import triton_attention
        q = torch.randn(1, 8, 2, 16)
        o = gated_attention(q, q, q, torch.rand(1, 8, 2))
        assert o.shape == q.shape and torch.isfinite(o).all()
        print("ok")
        """,
        elsewhere,
        site,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_without_hub_kernels_transformers_sees_none(tiny_dirs, tmp_path):
    res = _run(
        """
        from transformers.utils import import_utils
        import pill_kernels
        assert not import_utils.is_kernels_available()
        print("ok")
        """,
        tmp_path,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_requirement_bounds_are_the_tested_set():
    """Every pinned package of constraints.txt satisfies the distribution's bound, and deepspeed has an upper bound
    (the checkpoint code reads its private optimizer state)."""
    reqs = {
        r.name.lower(): r
        for r in map(Requirement, importlib.metadata.distribution("pill-train").requires)
        if not r.marker
    }
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, ver = line.split("==")
            pins[name.lower()] = ver
    for name in ("torch", "deepspeed", "transformers", "webdataset", "triton", "tensorboard", "pillow", "tqdm"):
        assert name in reqs, name
        assert reqs[name].specifier.contains(pins[name], prereleases=True), (
            name,
            str(reqs[name].specifier),
            pins[name],
        )
    upper = [s for s in reqs["deepspeed"].specifier if s.operator in ("<", "<=", "~=", "==")]
    assert upper, reqs["deepspeed"]


@pytest.mark.slow
def test_wheel_install_runs_the_default(tmp_path):
    """`pip install .` (not editable) into a target dir: configs ship as package data, the default config loads,
    pipeline.params runs, and a short run of the default trains from a directory that is not the checkout."""
    wheel_dir, target, work = tmp_path / "wheel", tmp_path / "target", tmp_path / "work"
    work.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    wheel = next(wheel_dir.glob("pill_train-*.whl"))
    subprocess.run(
        pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    # One interpreter for both steps: each start imports torch, DeepSpeed and transformers again (~5 s).
    res = _run(
        """
        import sys
        import pipeline
        assert "target" in pipeline.__file__, pipeline.__file__
        from pipeline.params import main as params
        assert params(["--llm-preset", "tiny", "--stage", "2"]) == 0
        print("params-done", flush=True)
        from pipeline.train import main
        sys.exit(main(["--set", "stages.*.max_steps=1", "--set", "eval.enabled=false", "--set", "log.tensorboard=false",
                       "--set", "prepare.0.args=[--out, .cache/demo_shards, --n-train, '48', --n-val, '8', "
                       "--max-samples, '24', --qtypes, color, --fixed-options, --no-progress]",
                       "--output-dir", "run"]))
        """,
        work,
        target,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    params_out = res.stdout.split("params-done")[0]
    assert "params-done" in res.stdout and "trainable=" in params_out, res.stdout[-2000:]
    assert (work / "run" / "stage2" / "export" / "adapter_model.safetensors").is_file()


def test_console_scripts_are_installed():
    eps = {
        e.name: e.value
        for e in importlib.metadata.distribution("pill-train").entry_points
        if e.group == "console_scripts"
    }
    assert eps == {
        "pill-train": "pipeline.train:main",
        "pill-launch": "pipeline.launch:main",
        "pill-eval": "pipeline.eval.cli:main",
        "pill-generate": "pipeline.generate:main",
        "pill-params": "pipeline.params:main",
        "pill-serve": "pipeline.serve.cli:main",
        "pill-text-bench": "pipeline.eval.text_bench:main",
        "pill-lm-eval": "pipeline.eval.lm_eval_plugin:main",
    }
    from pipeline.eval.cli import main

    assert main([]) == 2
