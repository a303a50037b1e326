"""The server's model: loaded and prompted as `predict` does, fed by one worker thread that batches a bounded queue.

One thread owns the model and tokenizer (neither is safe to share between
threads), so HTTP handlers only enqueue a `Job` and await its events. The
queue is bounded: when it is full a request is refused at once (429) instead
of waiting without limit. What is queued when the worker comes back for more
is generated together, grouped by sampling settings, through the same
`Predictor.generate_ids` that `predict` uses; greedy answers are therefore
`predict`'s answers (left padding leaves them unchanged, as its tests pin).
Streaming reads the tokens each step through a transformers streamer and
sends only text that can no longer change: a half-decoded character, a
partial stop string or a partial `<image>` waits for the next token, and the
final delta completes the text to the exact non-streamed answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from ..data.formats import IMAGE_TAG
from ..errors import LoraLlavaError
from ..evaluate.generate import Predictor, Request, load_predictor, user_text
from ..evaluate.sampling import Sampling
from .protocol import ApiError, ChatRequest

log = logging.getLogger("lora_llava.serve")


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class Job:
    """One request in flight. The worker emits ("start", prompt tokens), ("delta", text)..., then ("done", Completion)
    or ("error", ApiError); the handler awaits them on its event loop."""

    def __init__(self, chat: ChatRequest, request: Request, loop: asyncio.AbstractEventLoop):
        self.chat, self.request, self._loop = chat, request, loop
        self._events: asyncio.Queue = asyncio.Queue()

    def emit(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed: the server is shutting down and nobody is waiting
            pass

    async def next(self) -> tuple[str, Any]:
        return await self._events.get()


def to_request(chat: ChatRequest) -> Request:
    """The conversation as `predict` prompts it: each user turn's images first as `<image>\\n`, unless it places tags."""
    turns, images = [], []
    for turn in chat.turns:
        try:
            text = user_text(turn.text, len(turn.images)) if turn.role == "user" else turn.text
        except LoraLlavaError as e:
            raise ApiError(f"{turn.param}: {e}", param=turn.param) from None
        turns.append((turn.role, text))
        images += turn.images
    return Request(tuple(turns), tuple(images), chat.system)


def context_length(predictor: Predictor) -> int:
    """Prompt plus answer tokens the language model takes."""
    config = predictor.model.config
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "max_position_embeddings", 0) or 2048)


class Engine:
    """The model behind the API: `submit` queues a request, one worker thread generates."""

    def __init__(self, predictor: Predictor, max_batch: int = 8, queue_size: int = 32, max_tokens: int = 512):
        if max_batch < 1 or queue_size < 1 or max_tokens < 1:
            raise LoraLlavaError("--max-batch, --queue-size and --max-tokens must be at least 1")
        self.predictor, self.max_batch, self.max_tokens = predictor, max_batch, max_tokens
        self.context = context_length(predictor)
        self.running = 0
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_batch_s = 1.0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name="lora-llava-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def stats(self) -> dict[str, int]:
        return {"queued": self._queue.qsize(), "running": self.running, "context": self.context}

    def submit(self, chat: ChatRequest) -> Job:
        """Queue `chat` (call from the event loop); raises `ApiError` 429 when the queue is full."""
        job = Job(chat, to_request(chat), asyncio.get_running_loop())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            wait = max(1, math.ceil(self._last_batch_s))
            message = f"the server is busy ({self._queue.maxsize} requests waiting); retry in {wait} s"
            raise ApiError(
                message, status=429, code="queue_full", kind="rate_limit_error", headers={"Retry-After": str(wait)}
            ) from None
        return job

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            while len(jobs) < self.max_batch:  # whatever else is waiting now joins this round
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self.running = len(jobs)
            try:
                for sampling, batch in self._batches(jobs):
                    self._generate(sampling, batch)
            finally:
                self.running = 0

    def _batches(self, jobs: list[Job]) -> list[tuple[Sampling, list[tuple[Job, list[int]]]]]:
        """Jobs whose prompt fits, grouped by sampling settings; a seeded job alone, so its seed reproduces it."""
        groups: dict[Any, tuple[Sampling, list]] = {}
        for n, job in enumerate(jobs):
            try:
                ids = self.predictor.prompt_ids(job.request)
                sampling = self._sampling(job.chat, len(ids))
            except LoraLlavaError as e:
                job.emit("error", e if isinstance(e, ApiError) else ApiError(str(e), param="messages"))
                continue
            job.emit("start", len(ids))
            key = (sampling, n) if sampling.seed is not None else sampling
            groups.setdefault(key, (sampling, []))[1].append((job, ids))
        return list(groups.values())

    def _sampling(self, chat: ChatRequest, prompt_tokens: int) -> Sampling:
        room = self.context - prompt_tokens
        wanted = chat.max_tokens if chat.max_tokens is not None else min(self.max_tokens, room)
        if wanted > room or room < 1:
            message = (
                f"This model's maximum context length is {self.context} tokens; the messages take {prompt_tokens} "
                f"(images included) and {wanted} more were asked for the completion"
            )
            raise ApiError(message, param="messages", code="context_length_exceeded")
        return Sampling(max_new_tokens=wanted, temperature=chat.temperature, top_p=chat.top_p, seed=chat.seed)

    def _generate(self, sampling: Sampling, batch: list[tuple[Job, list[int]]]) -> None:
        jobs = [job for job, _ in batch]
        tok = self.predictor.processor.tokenizer
        streamer = RowStreamer(tok, jobs)
        started = time.monotonic()
        try:
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)  # as `predict --seed` does before its one batch
            texts = self.predictor.generate_ids([ids for _, ids in batch], [j.request.images for j in jobs], sampling, streamer)
        except Exception as e:  # a bug or out of memory ends these requests, never the server
            log.exception("generation failed for %d request(s)", len(jobs))
            for job in jobs:
                job.emit("error", ApiError(f"generation failed ({type(e).__name__})", status=500, kind="server_error"))
            return
        self._last_batch_s = time.monotonic() - started
        for row, (job, ids) in enumerate(batch):
            text, stopped = cut_at_stop(texts[row], job.chat.stop)
            streamer.finish(row, text)
            reason = "stop" if stopped or streamer.ended[row] else "length"
            job.emit("done", Completion(text, reason, len(ids), len(streamer.tokens[row])))


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first stop string (OpenAI leaves the stop string out), and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def settled(text: str, stops: tuple[str, ...]) -> str:
    """The part of a growing answer that the next tokens cannot change."""
    # Trailing space: the final answer is stripped, and a stop string may begin with it; U+FFFD: a character
    # whose bytes are still arriving.
    text = text.rstrip().rstrip("\ufffd").rstrip()
    held = 0
    for s in (*stops, IMAGE_TAG):  # a stop string or `<image>` may be starting at the end
        held = max([held] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
    return text[: len(text) - held]


class RowStreamer(BaseStreamer):
    """Counts each row's new tokens up to its end of sequence, and sends streaming rows their settled text."""

    def __init__(self, tokenizer: Any, jobs: list[Job]):
        self.tokenizer, self.jobs = tokenizer, jobs
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.ended = [False] * len(jobs)
        self.sent = [""] * len(jobs)
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate hands over the prompt ids first
            self._prompt_seen = True
            return
        for row, token in enumerate(value.reshape(len(self.jobs), -1)[:, -1].tolist()):
            if self.ended[row]:
                continue  # finished rows are padded until the whole batch ends
            self.tokens[row].append(token)
            self.ended[row] = token == self.tokenizer.eos_token_id
            if self.jobs[row].chat.stream and not self.ended[row]:
                self._send(row)

    def end(self) -> None:
        pass

    def _send(self, row: int) -> None:
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True).replace(IMAGE_TAG, "").lstrip()
        text, stopped = cut_at_stop(text, self.jobs[row].chat.stop)
        ready = text.rstrip() if stopped else settled(text, self.jobs[row].chat.stop)
        if len(ready) > len(self.sent[row]) and ready.startswith(self.sent[row]):
            self.jobs[row].emit("delta", ready[len(self.sent[row]) :])
            self.sent[row] = ready

    def finish(self, row: int, final: str) -> None:
        """Complete a streaming row's text to `final`, the answer as returned without streaming."""
        if not self.jobs[row].chat.stream:
            return
        if final.startswith(self.sent[row]):
            if len(final) > len(self.sent[row]):
                self.jobs[row].emit("delta", final[len(self.sent[row]) :])
        else:  # the decoder rewrote text already sent; what the client holds cannot be taken back
            log.warning("streamed text %r is not a prefix of the answer %r", self.sent[row], final)


def load_engine(
    model: str,
    adapter: str | None = None,
    template: str = "auto",
    dtype: str | None = None,
    quantization: str | None = None,
    **engine_options: Any,
) -> Engine:
    """An engine on what `predict --model` takes: a llava-hf folder or hub id, a run folder, a merged folder."""
    predictor = load_predictor(model, adapter=adapter, template=template, dtype=dtype, quantization=quantization)
    return Engine(predictor, **engine_options)
