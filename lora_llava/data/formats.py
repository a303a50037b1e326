"""Records -> `Sample`s: the two conversation layouts, validated one sample at a time.

A record is either in LLaVA's layout (`id`, `image` as a path or a list of
paths, `conversations` of `{"from": "human"|"gpt", "value"}`) or in the chat
layout of Hugging Face datasets (`messages` of `{"role", "content"}` where
content is a string or a list of `{"type": "text"|"image"}` parts, and an
`images` column). The layout is read from each record's keys, so one file may
hold both. Records without images are text-only samples.

`to_sample` raises `SampleError` naming the sample id, a kind (the same kinds
`lora-llava check` groups its report by) and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe.schema import DatasetSpec

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

# Kinds of bad samples, as reported by `lora-llava check` and by training.
MALFORMED = "malformed"
UNKNOWN_ROLE = "unknown role"
NOT_ALTERNATING = "turns do not alternate"
EMPTY_ANSWER = "empty answer"
TAG_MISMATCH = "image tag mismatch"
MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
PATH_ESCAPES = "path escapes image folder"
TOO_LONG = "too long"


class SampleError(DataError):
    """One sample that breaks a rule; `kind` groups them in reports."""

    def __init__(self, sample_id: str, kind: str, reason: str):
        self.sample_id, self.kind, self.reason = sample_id, kind, reason
        super().__init__(f"sample {sample_id}: {reason}")


@dataclass(frozen=True)
class Sample:
    """One conversation: alternating user / assistant turns, and its images."""

    id: str
    turns: tuple[tuple[str, str], ...]  # (role, text), role in user | assistant
    images: tuple[Any, ...]  # paths, HF image dicts ({"bytes", "path"}) or PIL images, in tag order
    system: str | None = None


def detect_format(spec: DatasetSpec) -> str:
    """`llava` (conversations) or `hf` (messages / a datasets folder or parquet), from the spec or the path."""
    if spec.format != "auto":
        return spec.format
    p = Path(spec.path)
    if p.is_dir() or p.suffix in (".parquet", ".arrow"):
        return "hf"
    if p.suffix == ".jsonl" and p.is_file():
        # JSON Lines holds either layout; the first record's keys tell which.
        with open(p, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        return "hf" if '"messages"' in first else "llava"
    return "llava"


def _content_text(content: Any, sid: str, k: int) -> str:
    """Text of a chat-layout message; image parts become `<image>` tags in place."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise SampleError(sid, MALFORMED, f"turn {k}: content must be a string or a list of parts")
    text = ""
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text += IMAGE_TAG + "\n"
        elif kind == "text":
            text += part.get("text") or ""
        else:
            raise SampleError(sid, MALFORMED, f"turn {k}: content parts must be {{'type': 'text' | 'image'}}")
    return text.rstrip("\n") if text.endswith(IMAGE_TAG + "\n") else text


def _as_list(value: Any) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _raw_turns(record: dict, sid: str) -> tuple[list[tuple[Any, Any]], list]:
    """(role, text) pairs and image references of a record in either layout."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise SampleError(sid, MALFORMED, "'messages' must be a list")
        turns = []
        for k, m in enumerate(messages):
            if not isinstance(m, dict):
                raise SampleError(sid, MALFORMED, f"turn {k}: a message is an object with role and content")
            turns.append((m.get("role"), _content_text(m.get("content"), sid, k)))
        return turns, _as_list(record.get("images", record.get("image")))
    conv = record.get("conversations")
    if not isinstance(conv, list):
        raise SampleError(sid, MALFORMED, "needs 'conversations' (LLaVA) or 'messages' (chat layout) as a list")
    turns = []
    for k, m in enumerate(conv):
        if not isinstance(m, dict):
            raise SampleError(sid, MALFORMED, f"turn {k}: a turn is an object with from and value")
        turns.append((m.get("from"), m.get("value")))
    images = _as_list(record.get("image"))
    if not all(isinstance(i, str) and i for i in images):
        raise SampleError(sid, MALFORMED, "'image' must be a path or a list of paths")
    return turns, images


def _check_turns(raw: list[tuple[Any, Any]], sid: str) -> tuple[list[tuple[str, str]], str | None, int]:
    """Roles known, system first, user/assistant alternating, non-empty answers; returns turns, system, tags."""
    system, turns, tags = None, [], 0
    for k, (role, text) in enumerate(raw):
        norm = ROLES.get(role) if isinstance(role, str) else None
        if norm is None:
            raise SampleError(sid, UNKNOWN_ROLE, f"turn {k}: unknown role {role!r} (human / gpt, or user / assistant)")
        if not isinstance(text, str):
            raise SampleError(sid, MALFORMED, f"turn {k}: the text must be a string, got {type(text).__name__}")
        if norm == "system":
            if k != 0:
                raise SampleError(sid, NOT_ALTERNATING, f"turn {k}: a system message must come first")
            if IMAGE_TAG in text:
                raise SampleError(sid, TAG_MISMATCH, f"an {IMAGE_TAG} tag in the system message")
            system = text
            continue
        expected = "assistant" if len(turns) % 2 else "user"
        if norm != expected:
            raise SampleError(sid, NOT_ALTERNATING, f"turn {k}: expected {expected}, got {norm}")
        if norm == "user":
            tags += text.count(IMAGE_TAG)
        elif not text.strip():
            raise SampleError(sid, EMPTY_ANSWER, f"turn {k}: empty answer")
        elif IMAGE_TAG in text:
            raise SampleError(sid, TAG_MISMATCH, f"turn {k}: an {IMAGE_TAG} tag in an answer")
        turns.append((norm, text))
    if not turns:
        raise SampleError(sid, NOT_ALTERNATING, "no user / assistant turns")
    if len(turns) % 2:
        raise SampleError(sid, NOT_ALTERNATING, "the last turn must be the assistant's answer")
    return turns, system, tags


def to_sample(record: Any, index: int, spec: DatasetSpec, fmt: str | None = None) -> Sample:
    """Validate one record and turn it into a `Sample` (raises `SampleError`).

    `fmt` is accepted for callers that know it; the layout is read from the record's keys.
    """
    if not isinstance(record, dict):
        raise SampleError(f"#{index}", MALFORMED, "a sample must be a JSON object")
    sid = str(record["id"]) if record.get("id") not in (None, "") else f"#{index}"
    raw, images = _raw_turns(record, sid)
    turns, system, tags = _check_turns(raw, sid)
    if tags != len(images):
        raise SampleError(sid, TAG_MISMATCH, f"{tags} {IMAGE_TAG} tag(s) for {len(images)} image(s)")
    if None in images:
        raise SampleError(sid, MALFORMED, "an empty entry in the image list")
    if len(images) == 1:
        turns = _tag_first(turns)
    if spec.response_suffix:
        turns = [(r, _with_suffix(t, spec.response_suffix) if r == "user" else t) for r, t in turns]
    return Sample(id=sid, turns=tuple(turns), images=tuple(images), system=system)


def _tag_first(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """LLaVA-1.5 moves a single `<image>` to the start of its turn: `<image>\\n` + the rest, stripped."""
    k = next(k for k, (_, text) in enumerate(turns) if IMAGE_TAG in text)
    return [*turns[:k], ("user", f"{IMAGE_TAG}\n{turns[k][1].replace(IMAGE_TAG, '').strip()}"), *turns[k + 1 :]]


def _with_suffix(question: str, suffix: str) -> str:
    """LLaVA-1.5's response-format prompt: the suffix on a new line, once."""
    return question if question.rstrip().endswith(suffix) else f"{question}\n{suffix}"


