"""The installed distribution: our `kernels` package must not look like the PyPI `kernels` to transformers."""

import importlib.metadata
import subprocess
import sys


def test_transformers_does_not_see_a_kernels_package_and_llama_runs(tiny_dirs):
    code = f"""
import sys
import transformers.models.llama.modeling_llama
assert 'kernels.gated_attention' not in sys.modules, 'the probe imported our kernels package'
import kernels, torch
from transformers import AutoModelForCausalLM
from transformers.utils import import_utils
assert kernels.__file__ is not None and 'site-packages/kernels' not in kernels.__file__, kernels.__file__
assert not import_utils.is_kernels_available(), 'transformers believes the PyPI kernels package is installed'
m = AutoModelForCausalLM.from_pretrained({str(tiny_dirs['llm'])!r}, local_files_only=True)
out = m(torch.tensor([[1, 5, 9, 12]]))
assert out.logits.shape[-1] == m.config.vocab_size and torch.isfinite(out.logits).all()
assert callable(kernels.gated_attention) and callable(kernels.routed_swiglu_adapter)
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_distribution_metadata():
    dist = importlib.metadata.distribution("pill-train")
    requires = " ".join(dist.requires or [])
    for dep in ("torch", "deepspeed", "transformers", "webdataset", "triton", "tensorboard", "pillow", "tqdm"):
        assert dep in requires, dep
