"""OpenAI chat-completion requests checked and turned into typed values, and the errors the API answers with.

The request shape is OpenAI's (and vLLM's): `messages` of `system` / `user` /
`assistant` turns whose content is a string or a list of `text` and
`image_url` parts. Images are decoded here, before a request is queued, so a
broken image is a 400 and never reaches the model. Where an image may come
from is the operator's choice: base64 data URLs always; files only under
`--image-root` (resolved, so `..` and symlinks cannot leave it); http(s) only
with `--allow-remote-images` (the server would otherwise fetch any address a
client names, inside the operator's network too).

A turn's text parts are joined without a separator, as the release's chat
template joins them, so vLLM serving the merged folder sees the same text;
the engine then writes each user turn as `predict` does (images first).
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.images import load_image
from ..errors import LoraLlavaError

MAX_STOPS = 4  # OpenAI's limit
REMOTE_TIMEOUT_S = 10
# Fields a client may send that change nothing here when left at OpenAI's default (key -> that default);
# any other value is refused rather than silently ignored.
NEUTRAL = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "logit_bias": None,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "add_special_tokens": True,  # vLLM's flag; the prompt always starts with BOS, as in training
}
FREE = {"user", "metadata", "store", "stream_options", "model", "messages", "stream", "seed", "stop", "temperature", "top_p"}
FREE |= {"max_tokens", "max_completion_tokens"}


class ApiError(LoraLlavaError):
    """A request the API refuses: HTTP status plus OpenAI's error object."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ImagePolicy:
    """Where images may come from besides data URLs."""

    root: Path | None = None  # local files only below this folder (resolved); None: no local files
    allow_remote: bool = False  # fetch http(s) URLs
    max_bytes: int = 20 * 2**20


@dataclass(frozen=True)
class Turn:
    """One user or assistant message: its text parts joined, and (user turns) its images in order."""

    role: str
    text: str
    images: tuple[Image.Image, ...]
    param: str  # where it is in the request, for error messages


@dataclass(frozen=True)
class ChatRequest:
    """A checked chat-completion request: the conversation, and how to decode."""

    turns: tuple[Turn, ...]
    system: str | None  # the client's system message; None: the model's own
    max_tokens: int | None  # None: the server's default, within the context
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    seed: int | None
    model: str | None


def parse_chat(body: Any, images: ImagePolicy) -> ChatRequest:
    """The request in `body` (decoded JSON), checked; raises `ApiError` naming the parameter at fault."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object")
    for key, value in body.items():
        if key in NEUTRAL:
            if value is not None and value != NEUTRAL[key]:
                raise ApiError(f"{key}={value!r} is not supported by this server", param=key, code="unsupported_parameter")
        elif key not in FREE:
            raise ApiError(f"unrecognized request argument: {key}", param=key, code="unrecognized_argument")
    turns, system = _messages(body.get("messages"), images)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        turns=turns,
        system=system,
        max_tokens=_number(max_tokens, "max_tokens", int, low=1),
        temperature=_number(body.get("temperature"), "temperature", float, low=0, high=2, default=0.0),
        top_p=_number(body.get("top_p"), "top_p", float, low=0, high=1, default=1.0, open_low=True),
        stop=_stops(body.get("stop")),
        stream=_flag(body.get("stream"), "stream"),
        include_usage=_flag(options.get("include_usage"), "stream_options.include_usage"),
        seed=_number(body.get("seed"), "seed", int),
        model=_text(body.get("model"), "model") if body.get("model") is not None else None,
    )


def _messages(value: Any, images: ImagePolicy) -> tuple[tuple[Turn, ...], str | None]:
    """(turns, system prompt): user and assistant turns alternating, ending with the user's."""
    if not isinstance(value, list) or not value:
        raise ApiError("messages must be a non-empty list", param="messages")
    turns: list[Turn] = []
    system = None
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role in ("system", "developer"):
            if turns or system is not None:
                raise ApiError(f"{where}: a system message must be the first message", param=where)
            system = _plain_content(message.get("content"), where)
        elif role in ("user", "assistant"):
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise ApiError(f"{where}: expected a {expected} message (user and assistant turns alternate)", param=where)
            if role == "assistant":
                turns.append(Turn("assistant", _plain_content(message.get("content"), where), (), where))
            else:
                text, found = _user_content(message.get("content"), where, images)
                turns.append(Turn("user", text, tuple(found), where))
        else:
            raise ApiError(f"{where}: role must be system, user or assistant, got {role!r}", param=f"{where}.role")
    if not turns or turns[-1].role != "user":
        raise ApiError("the last message must be the user's", param="messages")
    return tuple(turns), system


def _plain_content(content: Any, where: str) -> str:
    """Text of a system or assistant message: a string, or text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(_text(p.get("text"), f"{where}.content[{j}].text") for j, p in enumerate(content))
    raise ApiError(f"{where}: content must be a string or a list of text parts", param=f"{where}.content")


def _user_content(content: Any, where: str, images: ImagePolicy) -> tuple[str, list[Image.Image]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(f"{where}: content must be a string or a list of parts", param=f"{where}.content")
    texts, found = [], []
    for j, part in enumerate(content):
        param = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_text(part.get("text"), f"{param}.text"))
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            found.append(open_image_url(_text(url, f"{param}.image_url.url"), images, f"{param}.image_url"))
        else:
            raise ApiError(f"{param}: part type must be text or image_url, got {kind!r}", param=f"{param}.type")
    return "".join(texts), found


def open_image_url(url: str, images: ImagePolicy, param: str) -> Image.Image:
    """The RGB image a data URL, an allowed local path / file:// URL or (if allowed) an http(s) URL holds."""
    if url.startswith("data:"):
        raw = _data_url(url, param)
    elif url.startswith(("http://", "https://")):
        if not images.allow_remote:
            message = f"{param}: http(s) image URLs are refused (the server runs without --allow-remote-images); send a data URL"
            raise ApiError(message, param=param, code="remote_images_disabled")
        raw = _fetch(url, images.max_bytes, param)
    else:
        raw = _local_file(url, images, param)
    if len(raw) > images.max_bytes:
        raise ApiError(f"{param}: image over {images.max_bytes // 2**20} MiB", param=param, code="image_too_large")
    try:
        return load_image({"bytes": raw, "path": param})
    except LoraLlavaError as e:
        reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))  # PIL names its buffer; no use to a client
        raise ApiError(reason, param=param, code="invalid_image") from None


def _data_url(url: str, param: str) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma or not header.endswith(";base64"):
        raise ApiError(f"{param}: a data URL must read data:image/...;base64,<data>", param=param, code="invalid_image")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{param}: broken base64 in the data URL", param=param, code="invalid_image") from None


def _local_file(url: str, images: ImagePolicy, param: str) -> bytes:
    if images.root is None:
        message = f"{param}: local image paths are refused (the server runs without --image-root); send a data URL"
        raise ApiError(message, status=403, param=param, code="image_path_refused", kind="permission_error")
    text = url
    if url.startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise ApiError(f"{param}: file URL of another host", param=param, code="invalid_image")
        text = urllib.parse.unquote(parsed.path)
    root = images.root.resolve()
    path = (root / text).resolve()  # an absolute path stays itself; `..` and symlinks are followed before the check
    if not path.is_relative_to(root):
        message = f"{param}: {text} is outside the server's --image-root"
        raise ApiError(message, status=403, param=param, code="image_outside_root", kind="permission_error")
    if not path.is_file():
        raise ApiError(f"{param}: {text}: image not found under --image-root", param=param, code="invalid_image")
    return path.read_bytes()


def _fetch(url: str, limit: int, param: str) -> bytes:
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=REMOTE_TIMEOUT_S) as response:
            return response.read(limit + 1)
    except (OSError, ValueError) as e:
        raise ApiError(f"{param}: cannot fetch the image ({e})", param=param, code="invalid_image") from None


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(f"{param} must be a string", param=param)
    return value


def _flag(value: Any, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(f"{param} must be true or false", param=param)
    return value


def _number(value: Any, param: str, kind: type, low=None, high=None, default=None, open_low: bool = False):
    """`value` as `kind` within [low, high] (low excluded with `open_low`); None gives `default`."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise ApiError(f"{param} must be {'an integer' if kind is int else 'a number'}", param=param)
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'(' if open_low else '['}{low}, {high if high is not None else 'inf'}]"
        raise ApiError(f"{param} must be in {bounds}, got {value}", param=param)
    return kind(value)


def _stops(value: Any) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if stops is None:
        return ()
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop")
    return tuple(stops)
