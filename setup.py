"""pill-train: DeepSpeed + WebDataset training pipeline for PILL, with Triton kernels.

Import packages: `pipeline` (model, data, training, evaluation; ships configs/ and ds_configs/ as package data),
`shards` (WebDataset shard builders) and `pill_kernels` (the Triton ops). The repo folder of the kernels is
`kernels/` (so `python -m kernels.bench` works from a checkout), but it installs under its own import name:
the top-level name `kernels` belongs to Hugging Face's hub-kernels package, which transformers probes for and
imports, so we must neither shadow it nor be mistaken for it.

Bounds: the minors the suite has run with (constraints.txt pins the exact set). DeepSpeed is bounded to the
tested minor because the checkpoint code reads its private optimizer state.
"""

from setuptools import find_packages, setup

TESTED = {  # name: (lower bound, exclusive upper bound), both from the tested set in constraints.txt
    "torch": ("2.13", "2.14"),
    "transformers": ("5.24", "6"),
    "deepspeed": ("0.19.8", "0.20"),
    "webdataset": ("1.0.2", "1.1"),
}

setup(
    name="pill-train",
    version="0.2.0",
    description="Scalable DeepSpeed training of PILL (adapter experts + attention gates) on a frozen Llama LLM",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "shards", "shards.*"]) + ["pill_kernels"],
    package_dir={"pill_kernels": "kernels"},
    package_data={"pipeline": ["configs/*.yaml", "ds_configs/*.json"]},
    install_requires=[f"{name}>={lo},<{hi}" for name, (lo, hi) in TESTED.items()] + [
        "accelerate>=1.15",  # transformers' ZeRO-3 integration and device_map loading need it
        "tokenizers>=0.23",
        "safetensors>=0.8",
        "triton>=3.6",
        "tensorboard>=2.21",
        "pillow>=13.0",
        "simplejpeg>=1.9",  # libjpeg-turbo decode for the JPEG path (Pillow is the fallback when it is missing)
        "numpy>=2.4",
        "tqdm>=4.70",
        "pyyaml>=6.0",
        "matplotlib>=3.11",
    ],
    extras_require={
        "test": ["pytest>=8.0", "pytest-timeout>=2.2", "wandb>=0.19"],
        "wandb": ["wandb>=0.19"],
        "flash": ["flash-attn>=2.5"],
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "ruff>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "pill-train=pipeline.train:main",
            "pill-eval=pipeline.eval.cli:main",
            "pill-generate=pipeline.generate:main",
            "pill-params=pipeline.params:main",
        ]
    },
)
