"""`python -m pipeline.serve` / `pill-serve`: load an export (any method) and serve it.

    pill-serve --llm tiny --vpg tiny --adapter runs/demo/export --port 8000
    PILL_SERVE_API_KEY=secret pill-serve --llm smollm2 --vpg tiny --adapter EXPORT --host 0.0.0.0

The model sources are pipeline.generate's (--llm a dir, 'tiny', 'smollm2' or a .gguf file; --vpg; --adapter an
export dir, or none for the frozen LLM). It binds 127.0.0.1 unless --host says otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvicorn

from pipeline.generate import add_model_args, check_model_args, load_trained
from pipeline.serve.app import ServerState, create_app
from pipeline.serve.batcher import Batcher
from pipeline.serve.chat import Limits

API_KEY_ENV = "PILL_SERVE_API_KEY"
MAX_IMAGES_PER_METHOD = {"excitor": 1}
"""Methods that take fewer images per prompt than --max-images (Excitor's keys hold one image's patches)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="OpenAI-compatible Chat Completions server (and chat page) for an export")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help=f"require 'Authorization: Bearer KEY' (or set ${API_KEY_ENV})")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the export's dir name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests generated together at most")
    p.add_argument("--max-wait-ms", type=float, default=20.0, help="how long a batch waits for more requests")
    p.add_argument("--max-concurrency", type=int, default=64, help="requests in flight at most (more: 429)")
    p.add_argument("--max-tokens", type=int, default=256, help="completion tokens when a request gives none")
    p.add_argument("--max-images", type=int, default=4, help="images per request at most")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height at most, per image")
    p.add_argument("--allow-local-dir", type=Path, default=None, help="accept image paths under this directory")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("max_batch_size", "max_concurrency", "max_tokens", "max_images", "max_image_pixels"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.max_wait_ms < 0:
        parser.error(f"--max-wait-ms must be >= 0, got {args.max_wait_ms}")
    if args.allow_local_dir is not None and not args.allow_local_dir.is_dir():
        parser.error(f"--allow-local-dir {args.allow_local_dir} is not a directory")
    check_model_args(parser, args)


def server_state(model, args: argparse.Namespace) -> ServerState:
    """The app's state for a loaded model and the parsed flags."""
    name = args.model_name or Path(str(args.adapter or args.llm)).name
    limits = Limits(
        model_name=name,
        context=int(model.llm.config.max_position_embeddings),
        default_max_tokens=args.max_tokens,
        max_images=min(args.max_images, MAX_IMAGES_PER_METHOD.get(getattr(model, "method", ""), args.max_images)),
        max_image_pixels=args.max_image_pixels,
        allow_local_dir=args.allow_local_dir,
        prompt_format=args.prompt_format,
    )
    batcher = Batcher(model, args.max_batch_size, args.max_wait_ms / 1000).start()
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    return ServerState(model, batcher, limits, api_key=key, max_concurrency=args.max_concurrency)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = load_trained(args.llm, args.adapter, args.vpg, args.attn_backend, args.device)
    state = server_state(model, args)
    try:
        uvicorn.run(create_app(state), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        state.batcher.stop()
    return 0
