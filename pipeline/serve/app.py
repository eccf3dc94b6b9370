"""The FastAPI app: OpenAI's Chat Completions routes, /health, and the chat page at /.

Errors leave as OpenAI's JSON (`{"error": {...}}`) with their status, never as a traceback: the request checks of
pipeline.serve.chat (400 / 404), a missing or wrong key (401, compared in constant time), more requests in flight
than --max-concurrency (429), FastAPI's own (unknown route, bad method), and anything unexpected (500, logged).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from pipeline.serve.batcher import Batcher, Job
from pipeline.serve.chat import ChatRequest, Limits, parse_chat
from pipeline.serve.errors import APIError, bad_request
from pipeline.serve.page import PAGE

log = logging.getLogger("pipeline.serve")


@dataclass
class ServerState:
    """What the routes share: the model, its batcher, the limits, the key, the in-flight count."""

    model: Any
    batcher: Batcher
    limits: Limits
    api_key: str | None = None
    max_concurrency: int = 64
    in_flight: int = 0
    started: int = 0

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guessed key was right
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(
                401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def acquire(self) -> None:
        if self.in_flight >= self.max_concurrency:
            raise APIError(
                429,
                f"Too many requests in flight (this server takes {self.max_concurrency} at once); retry shortly",
                code="rate_limit_exceeded",
            )
        self.in_flight += 1


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="PILL-train serve", docs_url=None, redoc_url=None, openapi_url=None)
    state.started = state.started or int(time.time())
    _error_handlers(app)
    # the name as a JS string literal; '<' escaped so no name can close the <script> element
    page = PAGE.replace("__MODEL_NAME__", json.dumps(state.limits.model_name).replace("<", "\\u003c"))

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        b = state.batcher
        return {
            "status": "ok",
            "model": state.limits.model_name,
            "in_flight": state.in_flight,
            "requests": b.requests,
            "batches": b.batches,
            "forward_passes": b.forward_passes,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        state.check_key(request)
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{name}")
    async def model(name: str, request: Request) -> dict:
        state.check_key(request)
        if name != state.limits.model_name:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found")
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        state.check_key(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        state.acquire()
        try:
            chat = await run_in_threadpool(_parse_locked, state, body)
            job, events = _submit(state, chat)
        except BaseException:
            state.in_flight -= 1
            raise
        release = _releaser(state, job)
        if chat.stream:
            # released when the stream ends and again (a no-op then) after the response: a client that leaves
            # before the first chunk never starts the generator, whose `finally` would then never run
            stream = _stream(state, job, events, release)
            return StreamingResponse(stream, media_type="text/event-stream", background=BackgroundTask(release))
        try:
            return await _complete(state, job, events)
        finally:
            release()

    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.limits.model_name, "object": "model", "created": state.started, "owned_by": "pill-train"}


def _parse_locked(state: ServerState, body: Any) -> ChatRequest:
    with state.batcher.lock:
        return parse_chat(body, state.model, state.limits)


def _submit(state: ServerState, chat: ChatRequest) -> tuple[Job, asyncio.Queue]:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = Job(chat, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    state.batcher.submit(job)
    return job, events


async def _complete(state: ServerState, job: Job, events: asyncio.Queue) -> JSONResponse:
    text = []
    while True:
        ev = await events.get()
        if ev[0] == "delta":
            text.append(ev[1])
        elif ev[0] == "error":
            raise APIError(ev[1], ev[2])
        else:
            break
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "".join(text)},
        "finish_reason": ev[1],
        "logprobs": None,
    }
    body = _envelope(state, "chat.completion", [choice])
    body["usage"] = _usage(job, ev[2])
    return JSONResponse(body)


def _releaser(state: ServerState, job: Job) -> Callable[[], None]:
    """Frees the request's concurrency slot once, and stops its row if it has not finished (the client left)."""
    done = []

    def release() -> None:
        if not done:
            done.append(True)
            job.cancelled = job.finish is None
            state.in_flight -= 1

    return release


async def _stream(
    state: ServerState, job: Job, events: asyncio.Queue, release: Callable[[], None]
) -> AsyncIterator[str]:
    """Server-sent events as OpenAI sends them: a role chunk, content chunks, a finish chunk, the usage chunk when
    stream_options.include_usage, then `data: [DONE]`."""
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        yield _sse(_chunk(state, cid, {"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            if ev[0] == "delta":
                yield _sse(_chunk(state, cid, {"content": ev[1]}))
                continue
            if ev[0] == "error":  # the status line is gone: the error travels as an event
                yield _sse(APIError(ev[1], ev[2]).body())
                break
            yield _sse(_chunk(state, cid, {}, ev[1]))
            if job.request.include_usage:
                yield _sse({**_envelope(state, "chat.completion.chunk", [], cid), "usage": _usage(job, ev[2])})
            break
        yield "data: [DONE]\n\n"
    finally:
        release()


def _envelope(state: ServerState, kind: str, choices: list, cid: str | None = None) -> dict:
    return {
        "id": cid or f"chatcmpl-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": state.limits.model_name,
        "choices": choices,
    }


def _chunk(state: ServerState, cid: str, delta: dict, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return _envelope(state, "chat.completion.chunk", [choice], cid)


def _usage(job: Job, completion: int) -> dict:
    prompt = len(job.request.prompt.input_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad_request(f"invalid request: {e.errors()}").body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}").body(), status_code=500)
