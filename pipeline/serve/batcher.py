"""Dynamic batching: requests that arrive together are generated as one left-padded KV-cache batch.

One worker thread owns the model. It takes the first waiting request, then waits at most `max_wait_s` for more
(up to `max_batch_size`), and runs them through pipeline.generate.generate_ids in one batch; every row's answer
equals the row generated alone (left padding is masked and positions come from the attention mask: see
pipeline.generate), so batching changes throughput, not answers. Per step, generate_ids' on_step hook hands the
new ids back here: each request's text is decoded, streamed out, cut at its stop strings, and its row finished
at its own max_tokens (the batch runs to the longest budget; finished rows ride along as padding).

Which requests share a batch: greedy ones always; sampled ones with the same temperature and top_p and no seed
(one random seed for the batch); a sampled request with a seed runs alone, so the same seed gives the same answer
whatever else arrived (a sampling generator's draws depend on the batch's composition).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.generate import GenerationConfig, generate_ids, stop_ids
from pipeline.serve.chat import ChatRequest

log = logging.getLogger("pipeline.serve")
REPLACEMENT = "\ufffd"  # a partial multi-byte character: held back until its next token completes it


@dataclass
class Job:
    """One request in flight. `emit` puts an event on the request's queue from the worker thread:
    ("delta", text), ("done", finish_reason, completion_tokens) or ("error", status, message)."""

    request: ChatRequest
    emit: Callable[[tuple], None]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    """Characters of `text` already emitted."""
    finish: str | None = None
    cancelled: bool = False
    """Set from the server's side when the client went away: the row stops at the next step."""


def batch_key(job: Job) -> Any:
    r = job.request
    if r.temperature == 0:
        return "greedy"
    return ("sample", r.temperature, r.top_p, id(job) if r.seed is not None else None)


class Batcher:
    """The model's worker thread; `submit` is safe from any thread."""

    def __init__(self, model, max_batch_size: int = 8, max_wait_s: float = 0.02, lock: threading.Lock | None = None):
        if max_batch_size < 1 or max_wait_s < 0:
            raise ValueError(f"max_batch_size must be >= 1 and max_wait_s >= 0, got {max_batch_size}, {max_wait_s}")
        self.model, self.max_batch_size, self.max_wait_s = model, max_batch_size, max_wait_s
        self.lock = lock or threading.Lock()
        """Held around tokenizer calls (the request parser in the server's thread pool uses the same one)."""
        self.eos = stop_ids(model)
        self.batches = self.forward_passes = self.requests = 0
        model.register_forward_hook(self._count_forward)
        self._queue: queue.Queue[Job] = queue.Queue()
        self._pending: list[Job] = []
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pill-serve-batcher", daemon=True)

    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        self._queue.put(job)

    def _count_forward(self, *_: Any) -> None:
        self.forward_passes += 1

    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            if batch:
                self._generate(batch)

    def _get(self, timeout: float) -> Job | None:
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self) -> list[Job]:
        """The next batch: the oldest waiting request, the compatible ones waiting, and what arrives within
        max_wait_s (incompatible arrivals wait for a later batch, in order)."""
        first = self._pending.pop(0) if self._pending else self._get(timeout=0.2)
        if first is None:
            return []
        key, batch = batch_key(first), [first]
        for job in [j for j in self._pending if batch_key(j) == key][: self.max_batch_size - 1]:
            self._pending.remove(job)
            batch.append(job)
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            job = self._get(timeout=deadline - time.monotonic())
            if job is None:
                break
            (batch if batch_key(job) == key else self._pending).append(job)
        return [j for j in batch if not j.cancelled]

    def _generate(self, batch: list[Job]) -> None:
        r = batch[0].request
        seed = r.seed if r.seed is not None else random.getrandbits(63)
        cfg = GenerationConfig(
            max_new_tokens=max(j.request.max_tokens for j in batch), temperature=r.temperature, top_p=r.top_p, seed=seed
        )
        try:
            generate_ids(self.model, [j.request.prompt for j in batch], cfg, on_step=lambda ids: self._step(batch, ids))
        except Exception as e:  # the clients get a 500 with the reason; the traceback goes to the server's log
            log.exception("generation of a batch of %d failed", len(batch))
            for j in batch:
                if j.finish is None:
                    j.finish = "error"
                    j.emit(("error", 500, f"generation failed: {type(e).__name__}: {e}"))
            return
        for j in batch:
            if j.finish is None:
                self._finish(j, "length")
        self.batches += 1
        self.requests += len(batch)

    def _step(self, batch: list[Job], ids: torch.Tensor) -> torch.Tensor:
        for job, token in zip(batch, ids.tolist()):
            if job.finish is not None:
                continue
            if job.cancelled:
                job.finish = "cancelled"
            elif token in self.eos:
                self._finish(job, "stop")
            else:
                self._advance(job, token)
        return torch.tensor([j.finish is not None for j in batch])

    def _advance(self, job: Job, token: int) -> None:
        job.tokens.append(token)
        with self.lock:
            text = self.model.tokenizer.decode(job.tokens, skip_special_tokens=True)
        stops = job.request.stop
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:
            job.text = text[:cut]
            self._finish(job, "stop")
            return
        job.text = text
        if len(job.tokens) >= job.request.max_tokens:
            self._finish(job, "length")
            return
        safe = len(text) - _held_back(text, stops)
        if safe > job.sent:
            job.emit(("delta", text[job.sent : safe]))
            job.sent = safe

    def _finish(self, job: Job, reason: str) -> None:
        if len(job.text) > job.sent:
            job.emit(("delta", job.text[job.sent :]))
            job.sent = len(job.text)
        job.finish = reason
        job.emit(("done", reason, len(job.tokens)))


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to stream yet: a partial character, or the start of a stop string."""
    if text.endswith(REPLACEMENT):
        return len(text) - len(text.rstrip(REPLACEMENT))
    return max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
