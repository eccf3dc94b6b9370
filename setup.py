"""pill-train: DeepSpeed + WebDataset training pipeline for PILL, with Triton kernels.

The distribution ships three import packages: `pipeline` (model, data, training, evaluation), `kernels` (Triton
ops) and `shards` (WebDataset shard builders). `kernels` is also the import name of an unrelated PyPI package
that transformers probes for; our distribution is named `pill-train` and `kernels` defines no `__version__`,
so transformers' `is_kernels_available()` stays False (tests/test_package.py checks it).
"""

from setuptools import find_packages, setup

setup(
    name="pill-train",
    version="0.1.0",
    description="Scalable DeepSpeed training of PILL (adapter experts + attention gates) on a frozen Llama LLM",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "kernels", "kernels.*", "shards", "shards.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=4.46",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "webdataset>=0.2.86",
        "triton>=3.0",
        "tensorboard>=2.14",
        "pillow>=10.0",
        "numpy>=1.24",
        "tqdm>=4.66",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-timeout>=2.2"],
        "flash": ["flash-attn>=2.5"],
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "ruff>=0.5"],
    },
)
