"""What the serving tests share (no tests here): a tiny trained export, a server process on a free loopback port,
request builders."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789"
MODEL_NAME = "tiny-export"


def build_export(tiny_dirs: dict, out: Path) -> Path:
    """A stage-2 tiny PILL with random (non-zero) trainables, exported as training exports it."""
    from pipeline.model import PILLConfig, load_pill

    cfg = PILLConfig(stage=2, rank=4, num_query_tokens=8, vpg_width=64, attn_backend="sdpa")
    model = load_pill(tiny_dirs["llm"], tiny_dirs["vpg"], cfg=cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model.save_adapter(out)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m pipeline.serve ...` in a subprocess; its log goes to a file the tests can read."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, timeout: float = 300) -> None:
        self.port, self.log_path = free_port(), log
        cmd = [sys.executable, "-m", "pipeline.serve", *args, "--port", str(self.port), "--log-level", "info"]
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait(timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not up in {timeout} s:\n{self.log_path.read_text()[-4000:]}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def model_args(tiny_dirs: dict, export: Path) -> list[str]:
    return [
        "--llm",
        str(tiny_dirs["llm"]),
        "--vpg",
        str(tiny_dirs["vpg"]),
        "--adapter",
        str(export),
        "--attn-backend",
        "sdpa",
        "--device",
        "cpu",
        "--model-name",
        MODEL_NAME,
    ]


def demo_png(index: int = 0) -> bytes:
    """A demo-set picture (shards.demo's coloured shapes) as PNG bytes."""
    from shards.demo import DemoConfig, make_scene

    img, _, _ = make_scene(DemoConfig(), "val", index)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *images: str) -> list[dict]:
    """One user message: image parts (URLs) then the text part."""
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
