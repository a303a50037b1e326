"""The HTTP side of `lora-llava serve`: OpenAI-style chat completions (plain and streamed), models, health, the page.

Every refusal is OpenAI's error object, `{"error": {"message", "type",
"param", "code"}}`, with a 4xx status and one log line; an unexpected failure
is a 500 of the same shape, never a traceback sent to the client. With an API
key, `/v1/*` needs `Authorization: Bearer KEY`; `/` and `/health` stay open
(the page holds no data, and load balancers probe health without keys). No
CORS headers are sent, so pages of other sites cannot call the API from a
visitor's browser; the page itself runs under a content security policy that
allows only its own inline script and style and calls to this server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import LoraLlavaError

try:  # the optional extra
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError as e:
    missing = e.name or "fastapi"
    raise LoraLlavaError(
        f"serving needs FastAPI and uvicorn ({missing} is not installed): pip install 'lora-llava[serve]'"
    ) from None

from .engine import Completion, Engine, Job, load_engine
from .protocol import ApiError, ImagePolicy, parse_chat

log = logging.getLogger("lora_llava.serve")


@dataclass(frozen=True)
class ServeOptions:
    """How the server listens and what it accepts (the `lora-llava serve` flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # clients send `Authorization: Bearer KEY`; None: no key asked
    image_root: Path | None = None  # local image paths / file:// URLs allowed only below this folder
    allow_remote_images: bool = False  # fetch http(s) image URLs
    max_batch: int = 8  # requests generated together
    queue_size: int = 32  # requests waiting beyond the running batch; more get 429
    max_tokens: int = 512  # answer length when a request gives no max_tokens
    model_name: str | None = None  # the id clients send as `model`; None: --model as given, as vLLM names it
    max_body_bytes: int = 32 * 2**20

    def __post_init__(self):
        if self.image_root is not None and not Path(self.image_root).is_dir():
            raise LoraLlavaError(f"--image-root: {self.image_root} is not a folder")
        if not 0 <= self.port <= 65535:
            raise LoraLlavaError(f"--port: {self.port} is not a port number (0-65535)")
        for flag, value in (
            ("--max-batch", self.max_batch),
            ("--queue-size", self.queue_size),
            ("--max-tokens", self.max_tokens),
        ):
            if value < 1:
                raise LoraLlavaError(f"{flag}: must be at least 1, got {value}")


def serve(model: str, options: ServeOptions, **load: Any) -> None:
    """Load `model` (anything `predict --model` takes; `load`: adapter, template, dtype, quantization) and serve it."""
    engine = load_engine(model, max_batch=options.max_batch, queue_size=options.queue_size, max_tokens=options.max_tokens, **load)
    if options.api_key is None and not _loopback(options.host):
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", options.host)
    uvicorn.run(create_app(engine, options.model_name or model, options), host=options.host, port=options.port)


def create_app(engine: Engine, model_name: str, options: ServeOptions = ServeOptions()) -> FastAPI:
    """The ASGI app: it starts `engine`'s worker on startup and stops it on shutdown."""
    images = ImagePolicy(options.image_root, options.allow_remote_images)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    page_headers = {"Content-Security-Policy": _page_policy(page), "X-Content-Type-Options": "nosniff"}
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    # No /docs: its page loads scripts from a CDN, and the API is OpenAI's, documented elsewhere.
    app = FastAPI(title="lora-llava", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)

    @app.get("/")
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(page, headers=page_headers)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        _authorize(request, options.api_key)
        card = {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "lora-llava",
            "max_model_len": engine.context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(request, options.api_key)
        body = await _json_body(request, options.max_body_bytes)
        chat = await run_in_threadpool(parse_chat, body, images)  # images decode off the event loop
        if chat.model is not None and chat.model != model_name:
            raise ApiError(f"model {chat.model!r} not found; this server serves {model_name!r}", 404, "model", "model_not_found")
        return await _answer(engine.submit(chat), chat.stream, chat.include_usage, model_name)

    return app


async def _answer(job: Job, stream: bool, include_usage: bool, model_name: str):
    """The completion of a queued job, whole or as server-sent events."""
    kind, value = await job.next()
    if kind == "error":  # the prompt did not fit: refused before any byte of an answer
        raise value
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
    if stream:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not hold the events back
        return StreamingResponse(_stream(job, meta, include_usage), media_type="text/event-stream", headers=headers)
    while kind != "done":
        kind, value = await job.next()
        if kind == "error":
            raise value
    return _completion(meta, value)


def _completion(meta: dict, done: Completion) -> dict:
    message = {"role": "assistant", "content": done.text}
    choice = {"index": 0, "message": message, "finish_reason": done.finish_reason, "logprobs": None}
    return {**meta, "object": "chat.completion", "choices": [choice], "usage": _usage(done)}


def _usage(done: Completion) -> dict:
    total = done.prompt_tokens + done.completion_tokens
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens, "total_tokens": total}


def _chunk(meta: dict, delta: dict, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    return {**meta, "object": "chat.completion.chunk", "choices": [choice]}


async def _stream(job: Job, meta: dict, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's shape: the role, content deltas, the finish reason, then `[DONE]`."""
    yield _event(_chunk(meta, {"role": "assistant", "content": ""}))
    while True:
        kind, value = await job.next()
        if kind == "delta":
            yield _event(_chunk(meta, {"content": value}))
        elif kind == "error":  # headers are sent: the error travels as an event, as vLLM sends it
            yield _event(value.body())
            break
        elif kind == "done":
            yield _event(_chunk(meta, {}, value.finish_reason))
            if include_usage:
                yield _event({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)})
            break
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken says nothing about how much of a guessed key was right
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        message = "missing or wrong API key: send the header 'Authorization: Bearer KEY'"
        raise ApiError(message, 401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _json_body(request: Request, limit: int) -> Any:
    """The decoded JSON body, read no further than `limit` bytes."""
    too_large = ApiError(f"request body over {limit // 2**20} MiB", 413, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, nesting too deep
        raise ApiError("the request body is not valid JSON") from None


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def refused(request: Request, e: ApiError) -> JSONResponse:
        log.warning("%s %s -> %d %s", request.method, request.url.path, e.status, e.message)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown path, wrong method
        code = "not_found" if e.status_code == 404 else None
        error = ApiError(f"{request.method} {request.url.path}: {e.detail}", e.status_code, code=code)
        log.warning("%s %s -> %d %s", request.method, request.url.path, e.status_code, e.detail)
        return JSONResponse(error.body(), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        log.error("%s %s -> 500 %s: %s", request.method, request.url.path, type(e).__name__, e)
        error = ApiError("internal server error (see the server's log)", 500, kind="server_error")
        return JSONResponse(error.body(), status_code=500)


def _page_policy(page: str) -> str:
    """A content security policy that lets the page run only its own inline script and style."""

    def digests(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {digests('script')}; style-src {digests('style')}; "
        "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
