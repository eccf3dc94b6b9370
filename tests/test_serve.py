"""pipeline.serve: the OpenAI-compatible server, driven by the real `openai` client and raw HTTP, against a
`python -m pipeline.serve` process on a free loopback port serving a tiny trained export."""

from __future__ import annotations

import io
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from pipeline.data.eval import chat_prompt, image_tensor
from pipeline.data.prompt_cut import Prompt
from pipeline.generate import GenerationConfig, generate, generate_ids, load_trained
from tests.test_serve_support import API_KEY, MODEL_NAME, Server, build_export, data_url, demo_png, model_args, user

MAX_PIXELS = 100_000


@pytest.fixture(scope="module")
def export(tiny_dirs, tmp_path_factory):
    return build_export(tiny_dirs, tmp_path_factory.mktemp("serve_export"))


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve_images")
    (d / "demo.png").write_bytes(demo_png())
    return d


@pytest.fixture(scope="module")
def server(tiny_dirs, export, local_dir, tmp_path_factory):
    args = model_args(tiny_dirs, export) + [
        "--max-batch-size", "16", "--max-wait-ms", "300", "--max-concurrency", "24", "--max-tokens", "8",
        "--max-images", "2", "--max-image-pixels", str(MAX_PIXELS), "--allow-local-dir", str(local_dir),
    ]  # fmt: skip
    srv = Server(args, tmp_path_factory.mktemp("serve_log") / "server.log", env={"PILL_SERVE_API_KEY": API_KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_model(tiny_dirs, export):
    """The same export loaded in the test: what pipeline.generate answers."""
    return load_trained(tiny_dirs["llm"], export, tiny_dirs["vpg"], attn_backend="sdpa", device="cpu")


def post(server, body, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=120)


def chat(messages, **kw) -> dict:
    return {"model": MODEL_NAME, "messages": messages, "temperature": 0, **kw}


# ---- the openai client -----------------------------------------------------------------------------------------
def test_openai_client_answer_equals_pipeline_generate(client, local_model, local_dir):
    """Non-streaming, with an image: the answer is pipeline.generate's for the same instruction and image."""
    png = (local_dir / "demo.png").read_bytes()
    resp = client.chat.completions.create(
        model=MODEL_NAME, messages=user("What colour is the shape?", data_url(png)), max_tokens=6, temperature=0
    )
    prompt = chat_prompt(local_model, "What colour is the shape?", image_tensor(local_dir / "demo.png", local_model))
    ids = generate_ids(local_model, [prompt], GenerationConfig(max_new_tokens=6))[0]
    expected = generate(local_model, [prompt], GenerationConfig(max_new_tokens=6))[0]
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason == ("length" if len(ids) == 6 else "stop")
    assert resp.model == MODEL_NAME and resp.object == "chat.completion"
    assert resp.usage.prompt_tokens == len(prompt.input_ids)  # the 8 visual positions count as prompt tokens
    assert resp.usage.completion_tokens == len(ids)
    assert resp.usage.total_tokens == len(prompt.input_ids) + len(ids)


def test_openai_client_streaming_equals_non_streaming(client):
    messages = user("Describe the picture.", data_url(demo_png(1)))
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == whole.choices[0].message.content
    assert len([c for c in content if c]) >= 2  # it did stream: several content chunks
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sse_ends_with_done(server):
    r = post(server, chat(user("hi"), max_tokens=3, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_models_health_and_page(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and f'const MODEL = "{MODEL_NAME}"' in page.text


def test_seed_reproducible_and_stop_strings(client):
    messages = user("Tell me a story.")
    kw = dict(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=1.0, seed=7)
    a = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == a
    greedy = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0)
    text = greedy.choices[0].message.content
    assert len(text) >= 4, text
    stop = text[2:4]
    cut = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_local_path_only_under_allowed_dir(server, local_dir, tmp_path):
    ok = post(server, chat(user("What is it?", str(local_dir / "demo.png")), max_tokens=2))
    assert ok.status_code == 200, ok.text
    (tmp_path / "other.png").write_bytes(demo_png())
    refused = post(server, chat(user("What is it?", str(tmp_path / "other.png")), max_tokens=2))
    assert refused.status_code == 400 and "allowed directory" in refused.json()["error"]["message"]


def test_client_leaving_a_stream_frees_its_slot(server):
    """A client that reads one event and leaves: its concurrency slot is freed and its row stops decoding."""
    before = server.health()
    body = chat(user("Tell me everything."), max_tokens=400, stream=True)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 60
    while server.health()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.2)
    after = server.health()
    assert after["in_flight"] == 0
    assert after["forward_passes"] - before["forward_passes"] < 400


# ---- batching -------------------------------------------------------------------------------------------------
def _varied_requests(n: int, max_tokens: int | None = None) -> list[dict]:
    """n different greedy requests (lengths, with and without a picture); budgets of 2-4 tokens keep a batch at
    most 4 forwards, so 16 requests beat 16 forwards even when a loaded machine splits them over 3 batches."""
    images = [data_url(demo_png(i)) for i in range(3)]
    out = []
    for i in range(n):
        pics = [images[i % 3]] if i % 2 == 0 else []
        budget = max_tokens or 2 + i % 3
        out.append(chat(user(f"Question {i}: " + "what is shown " * (i % 5), *pics), max_tokens=budget))
    return out


def test_concurrent_requests_are_batched_and_equal_alone(server):
    bodies = _varied_requests(16)
    before = server.health()
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda b: post(server, b), bodies))
    during = server.health()
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    forwards = during["forward_passes"] - before["forward_passes"]
    batches = during["batches"] - before["batches"]
    assert forwards < 16 and batches < 16, (forwards, batches)
    alone = [post(server, b) for b in bodies]  # one at a time: each request is a batch of one
    after = server.health()
    assert after["batches"] - during["batches"] == 16
    for t, a in zip(together, alone):
        assert t.json()["choices"][0]["message"] == a.json()["choices"][0]["message"]
        assert t.json()["usage"] == a.json()["usage"]


def test_over_max_concurrency_is_429(server):
    bodies = _varied_requests(40, max_tokens=8)  # long enough that the first ones are still in flight
    with ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda b: post(server, b), bodies))
    codes = sorted({r.status_code for r in answers})
    assert codes == [200, 429], codes
    busy = next(r for r in answers if r.status_code == 429)
    assert busy.json()["error"]["code"] == "rate_limit_exceeded"
    assert server.health()["in_flight"] == 0


# ---- bad requests: OpenAI-style JSON errors, never a traceback ---------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming width x height and the start of an IDAT with no pixel data: only a
    header read can size it (decoding it would fail on the truncated data, not on its size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + struct.pack(">I", 1 << 20) + b"IDAT" + b"\x78\x9c"


def _bad_requests() -> dict[str, tuple[dict, int, str]]:
    """case -> (body, status, text the error message or code holds)."""
    png = data_url(demo_png())
    long_text = "hello world " * 700  # > 1024 tokens: the tiny LLM's max_position_embeddings
    return {
        "bad_base64": (chat(user("x", "data:image/png;base64,@@not-base64@@")), 400, "invalid_base64"),
        "not_an_image": (chat(user("x", data_url(b"just some text, no picture"))), 400, "invalid_image"),
        "over_max_pixels": (chat(user("x", data_url(_png_header(1000, 1000)))), 400, "image_too_large"),
        "decompression_bomb": (chat(user("x", data_url(_png_header(50_000, 50_000)))), 400, "image_too_large"),
        "too_many_images": (chat(user("x", png, png, png)), 400, "too_many_images"),
        "prompt_over_context": (chat(user(long_text)), 400, "maximum context length is 1024"),
        "completion_over_context": (chat(user("hi"), max_tokens=5000), 400, "maximum context length is 1024"),
        "unknown_model": ({**chat(user("hi")), "model": "gpt-4o"}, 404, "model_not_found"),
        "remote_url": (chat(user("x", "https://example.com/cat.png")), 400, "data: URL"),
        "last_message_not_user": (chat([{"role": "assistant", "content": "hi"}]), 400, "follow a user message"),
        "bad_role": (chat([{"role": "tool", "content": "hi"}]), 400, "not supported"),
        "bad_part": (chat([{"role": "user", "content": [{"type": "audio"}]}]), 400, "content[0]"),
        "bad_temperature": (chat(user("hi"), temperature=5), 400, "temperature"),
        "no_messages": (chat([]), 400, "messages"),
    }


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_request(server, case):
    body, status, needle = _bad_requests()[case]
    r = post(server, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] or needle == err["code"], err
    assert err["type"] and "Traceback" not in r.text


def test_pixel_limit_is_read_from_the_header(server):
    """A picture just over --max-image-pixels is refused for its size; one under it is served."""

    def png(w, h):
        buf = io.BytesIO()
        Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
        return data_url(buf.getvalue())

    assert post(server, chat(user("x", png(316, 316)), max_tokens=1)).status_code == 200
    r = post(server, chat(user("x", png(317, 317)), max_tokens=1))
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"


def test_invalid_json_body(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("key", [None, "wrong-key", API_KEY + "x"])
def test_api_key_required(server, key):
    r = post(server, chat(user("hi")), key=key)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def test_openai_client_errors(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_NAME, messages=user("hi"))
    good = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="other", messages=user("hi"))
    with pytest.raises(openai.BadRequestError, match="base64"):
        good.chat.completions.create(model=MODEL_NAME, messages=user("x", "data:image/png;base64,###"))


def test_binds_loopback_only(server):
    """Without --host the server listens on 127.0.0.1 alone: another loopback address is refused."""
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.2:{server.port}/health", timeout=5)
    assert f"http://127.0.0.1:{server.port}" in server.log_path.read_text()


# ---- the on_step hook of generate_ids ------------------------------------------------------------------------------
def test_on_step_finishes_rows_early(local_model):
    """A row the hook finishes stops there (pads after it); the other rows are unchanged."""
    prompts = [Prompt([1, 40, 41, 42], [False] * 4), Prompt([1, 50, 51], [False] * 3)]
    cfg = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    full = generate_ids(local_model, prompts, cfg)
    seen = []

    def hook(ids):
        seen.append(ids.tolist())
        return torch.tensor([len(seen) >= 2, False])

    cut = generate_ids(local_model, prompts, cfg, on_step=hook)
    assert cut[1] == full[1] and cut[0][:2] == full[0][:2]
    assert [row[0] for row in seen[2:]] == [local_model.tokenizer.pad_token_id or 0] * 3
    assert [row[1] for row in seen] == full[1]
