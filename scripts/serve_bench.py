"""Throughput and latency of a running server: `python scripts/serve_bench.py --url http://127.0.0.1:8000`.

Sends --requests chat requests (the demo picture + a question, greedy, --max-tokens each) with --concurrency of
them in flight at a time, and prints requests/s, tokens/s and the latency percentiles. --concurrency 1 is
"one at a time"; run it against the same server to compare with batched serving.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from shards.demo import DemoConfig, make_scene


def demo_image_url(index: int) -> str:
    img, _, _ = make_scene(DemoConfig(), "val", index)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(url: str, model: str, n: int, concurrency: int, max_tokens: int, api_key: str | None) -> dict:
    """Fire n requests, concurrency at a time; the figures of the run."""
    images = [demo_image_url(i) for i in range(4)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(i: int) -> tuple[float, int]:
        content = [{"type": "image_url", "image_url": {"url": images[i % 4]}},
                   {"type": "text", "text": f"Question {i}: what colour is the shape?"}]  # fmt: skip
        body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0}  # fmt: skip
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {
        "requests": n,
        "concurrency": concurrency,
        "wall_s": round(wall, 2),
        "requests_per_s": round(n / wall, 2),
        "tokens_per_s": round(sum(r[1] for r in results) / wall, 1),
        "latency_p50_s": round(statistics.median(lat), 3),
        "latency_p95_s": round(lat[min(n - 1, int(0.95 * n))], 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Requests/s and latency of a pipeline.serve server")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the server's only one)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--api-key", default=None)
    args = p.parse_args(argv)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.url}/v1/models", headers=headers).json()["data"][0]["id"]
    for c in args.concurrency:
        print(json.dumps(run(args.url, model, args.requests, c, args.max_tokens, args.api_key)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
