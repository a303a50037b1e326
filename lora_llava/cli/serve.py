"""`lora-llava serve --model RUN_OR_MODEL [--host 127.0.0.1] [--port 8000]`: an OpenAI-compatible API and a chat page."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LoraLlavaError
from .predict import add_model_args

API_KEY_ENV = "LORA_LLAVA_API_KEY"


def register(sub, common) -> None:
    p = sub.add_parser(
        "serve",
        parents=[common],
        help="serve a model over an OpenAI-compatible HTTP API, with a chat page",
        description="Serve a model, run folder or merged checkpoint over an OpenAI-compatible HTTP API "
        "(/v1/chat/completions), with a chat page at /.",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key", metavar="KEY", help=f"clients must send 'Authorization: Bearer KEY' (or set {API_KEY_ENV}, kept out of ps)"
    )
    p.add_argument("--image-root", metavar="DIR", help="allow images given as paths or file:// URLs, but only below DIR")
    p.add_argument("--allow-remote-images", action="store_true", help="let the server fetch http(s) image URLs")
    p.add_argument("--served-model-name", metavar="NAME", help="the model id clients send (default: --model as given, as vLLM)")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length when a request sets no max_tokens (default 512)")
    p.add_argument("--max-batch", type=int, default=8, help="requests generated together (default 8)")
    p.add_argument("--queue-size", type=int, default=32, help="requests that may wait; more are answered 429 (default 32)")
    p.set_defaults(func=run)


def run(args) -> int:
    # Imported here, not at the top: building the parser imports every verb's module, and the
    # server's packages are an optional extra that the other verbs must not need.
    from ..serve.app import ServeOptions, serve

    if not args.model:
        raise LoraLlavaError("--model: required (a run folder, a merged or llava-hf model folder, or a hub id)")
    options = ServeOptions(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        image_root=Path(args.image_root) if args.image_root else None,
        allow_remote_images=args.allow_remote_images,
        max_batch=args.max_batch,
        queue_size=args.queue_size,
        max_tokens=args.max_tokens,
        model_name=args.served_model_name,
    )
    serve(args.model, options, adapter=args.adapter, template=args.template, dtype=args.dtype, quantization=args.quantization)
    return 0
