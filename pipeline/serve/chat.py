"""A Chat Completions request body -> a generation Prompt, checked field by field (pipeline.serve.errors on bad input).

Messages render with the training template (pipeline.data: the same Conversation + encode_prompt as
`pipeline.generate --prompt`), so a served answer starts exactly where a training answer started. Images are the
`image_url` parts, in order: a `<image>` marker goes where each part stands in its message (text a user types
cannot add markers: `<image>` is removed from text parts). Image bytes come from `data:` URLs (base64) or, only
under --allow-local-dir, from local files; the pixel count is read from the header before anything is decoded (a
decompression bomb is refused for its size, not after filling memory).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from pipeline.data.prompt_cut import Prompt
from pipeline.data.prompts import IMAGE, Conversation, PromptError, with_image_markers
from pipeline.data.tokenize import encode_prompt
from pipeline.data.transforms import decode_image, default_mean_std, normalise
from pipeline.serve.errors import APIError, bad_request

MAX_STOP = 4  # OpenAI's limit on stop sequences


@dataclass(frozen=True)
class Limits:
    """What the server accepts (pipeline.serve.cli sets them from its flags and the model)."""

    model_name: str
    context: int
    """The LLM's max_position_embeddings: prompt + completion tokens must fit."""
    default_max_tokens: int = 256
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    allow_local_dir: Path | None = None
    prompt_format: str = "auto"
    default_temperature: float = 0.0
    """Without a 'temperature' field: greedy, as pipeline.generate (OpenAI's own default is 1.0)."""


@dataclass
class ChatRequest:
    """A checked request: the prompt and the decoding settings."""

    prompt: Prompt
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse_chat(body: Any, model, limits: Limits) -> ChatRequest:
    """The request body (parsed JSON) -> ChatRequest, or APIError (400 / 404) naming the field."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str):
        raise bad_request("'model' is required (a string)", "model")
    if name != limits.model_name:
        raise APIError(
            404,
            f"The model '{name}' does not exist; this server serves '{limits.model_name}'",
            "model",
            "model_not_found",
        )
    if body.get("n", 1) != 1:
        raise bad_request("only n=1 is supported", "n")
    conv, image_urls = conversation(body.get("messages"))
    prompt = build_prompt(conv, [load_image(p, u, limits) for p, u in image_urls], model, limits)
    return ChatRequest(prompt, _max_tokens(body, len(prompt.input_ids), limits), **_sampling(body, limits))


def _sampling(body: dict, limits: Limits) -> dict[str, Any]:
    temperature = _number(body, "temperature", limits.default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise bad_request("'top_p' must be > 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad_request("'seed' must be an integer", "seed")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    return dict(
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=_stop(body.get("stop")),
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
    )


def _number(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
        raise bad_request(f"'{key}' must be a number in [{lo}, {hi}], got {value!r}", key)
    return float(value)


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad_request(f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


def _max_tokens(body: dict, prompt_len: int, limits: Limits) -> int:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    asked = body.get(key)
    if asked is not None and (not isinstance(asked, int) or isinstance(asked, bool) or asked < 1):
        raise bad_request(f"'{key}' must be an integer >= 1, got {asked!r}", key)
    room = limits.context - prompt_len
    if room < 1 or (asked is not None and asked > room):
        wanted = prompt_len + (asked or 1)
        raise bad_request(
            f"This model's maximum context length is {limits.context} tokens; the messages take {prompt_len} tokens "
            f"and the completion {wanted - prompt_len} ({wanted} in all). Shorten the messages or max_tokens.",
            "messages",
            "context_length_exceeded",
        )
    return asked if asked is not None else min(limits.default_max_tokens, room)


# ---- messages -> Conversation --------------------------------------------------------------------------------------
def conversation(messages: Any) -> tuple[Conversation, list[tuple[str, str]]]:
    """(the Conversation with one <image> marker per image part, [(param path, url)] of the image parts in order)."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "messages")
    system, turns, user, images = [], [], None, []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"{where} must be an object with a 'role'", where)
        role, content = m["role"], m.get("content")
        if role in ("system", "developer"):
            system.append(_content_text(content, where, images=None))
        elif role == "user":
            text = _content_text(content, where, images=images)
            user = text if user is None else f"{user}\n{text}"
        elif role == "assistant":
            if user is None:
                raise bad_request(f"{where}: an assistant message must follow a user message", where)
            turns.append((user, _content_text(content, where, images=None)))
            user = None
        else:
            raise bad_request(f"{where}: role {role!r} is not supported (system, developer, user, assistant)", where)
    if user is None:
        raise bad_request("the last message must come from the user", "messages")
    try:
        turns = with_image_markers([*turns, (user, "")], len(images))
    except PromptError as e:
        raise bad_request(str(e), "messages") from None
    return Conversation("\n".join(system) or None, turns), images


def _content_text(content: Any, where: str, images: list | None) -> str:
    """A message's content as text; image parts become <image> markers (appended to `images`; None: refused)."""
    if isinstance(content, str):
        return content.replace(IMAGE, "")
    if content is None and images is None:
        return ""
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of parts", f"{where}.content")
    pieces = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"].replace(IMAGE, ""))
        elif kind == "image_url" and images is not None:
            images.append((f"{at}.image_url", _url_of(part.get("image_url"), at)))
            pieces.append(IMAGE)
        elif kind == "image_url":
            raise bad_request(f"{at}: only user messages may carry images", at)
        else:
            raise bad_request(f"{at} must be {{'type': 'text', 'text': ...}} or {{'type': 'image_url', ...}}", at)
    return "\n".join(pieces)


def _url_of(image_url: Any, at: str) -> str:
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise bad_request(f"{at}.image_url must be {{'url': 'data:image/...;base64,...'}}", f"{at}.image_url")
    return url


# ---- images -------------------------------------------------------------------------------------------------------
def load_image(param: str, url: str, limits: Limits) -> bytes:
    """An image part's bytes, checked: a known format, at most max_image_pixels (from the header, before decoding)."""
    data = _image_bytes(param, url, limits)
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            w, h = img.size
    except Image.DecompressionBombError:  # over Pillow's own limit (2x MAX_IMAGE_PIXELS), found in the header
        w = h = None
    except (UnidentifiedImageError, OSError, ValueError):
        raise bad_request(f"{param}: the data is not an image Pillow can read", param, "invalid_image") from None
    if w is None or w * h > limits.max_image_pixels:
        size = f"{w}x{h} = {w * h} pixels" if w is not None else "over Pillow's decompression-bomb limit"
        raise bad_request(
            f"{param}: the image is {size}, over this server's --max-image-pixels {limits.max_image_pixels}",
            param,
            "image_too_large",
        )
    return data


def _image_bytes(param: str, url: str, limits: Limits) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise bad_request(f"{param}: a data: URL must be 'data:<type>;base64,<data>'", param, "invalid_image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{param}: the data: URL is not valid base64", param, "invalid_base64") from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise bad_request(f"{param}: this server does not fetch URLs; send the image as a data: URL", param)
    return _local_file(param, Path(unquote(parsed.path) if parsed.scheme == "file" else url), limits)


def _local_file(param: str, path: Path, limits: Limits) -> bytes:
    root = limits.allow_local_dir
    if root is None:
        raise bad_request(
            f"{param}: local file paths are refused (the server was started without --allow-local-dir)", param
        )
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()) or not resolved.is_file():
        shown = str(path) if len(str(path)) <= 200 else str(path)[:200] + "..."
        raise bad_request(f"{param}: {shown} is not a file under the allowed directory {root}", param)
    return resolved.read_bytes()


def build_prompt(conv: Conversation, images: list[bytes], model, limits: Limits) -> Prompt:
    """The generation prompt of `conv` (training template) with its images as (N, 3, S, S) pixel_values."""
    if len(images) > limits.max_images:
        raise bad_request(
            f"{len(images)} images in the request; this server takes at most {limits.max_images}",
            "messages",
            "too_many_images",
        )
    pixels = None
    if images:
        if getattr(model, "vpg", None) is None:
            raise bad_request("this server has no visual front end (started without --vpg): send text only", "messages")
        size = model.vpg.image_size
        mean, std = default_mean_std()
        try:
            pixels = normalise([decode_image(b, size) for b in images], mean, std, size)
        except Exception as e:  # Pillow raises many types on a truncated or corrupt body past the header
            raise bad_request(
                f"an image could not be decoded: {type(e).__name__}: {e}", "messages", "invalid_image"
            ) from None
    enc = encode_prompt(conv, model.tokenizer, model.cfg.num_query_tokens, limits.prompt_format)
    return Prompt(enc.input_ids.tolist(), enc.modality_mask.tolist(), pixels, image_kind="pixel_values")
