"""Dataset files -> `Sample`s: LLaVA JSON / JSONL, and Hugging Face datasets.

Reading a dataset reads only its index (the records); images are opened per
sample, later, in DataLoader workers. Records are validated one at a time by
`to_sample`, which raises `SampleError` naming the sample id and the reason.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe import DatasetSpec

IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class SampleError(DataError):
    """One sample that breaks a rule; `kind` groups them in reports."""

    def __init__(self, sample_id: str, kind: str, reason: str):
        self.sample_id, self.kind, self.reason = sample_id, kind, reason
        super().__init__(f"sample {sample_id}: {reason}")


@dataclass(frozen=True)
class Sample:
    """One conversation: alternating user / assistant turns, and its image files."""

    id: str
    turns: tuple[tuple[str, str], ...]  # (role, text), role in user | assistant
    images: tuple[Any, ...]  # paths (str) or decoded PIL images (HF datasets)
    system: str | None = None


def detect_format(spec: DatasetSpec) -> str:
    if spec.format != "auto":
        return spec.format
    p = Path(spec.path)
    if p.is_dir() or p.suffix == ".parquet":
        return "hf"
    if p.suffix == ".jsonl":
        # JSONL can be either layout; peek at the first record's keys.
        with open(p, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "{}")
        try:
            return "hf" if "messages" in json.loads(first) else "llava"
        except json.JSONDecodeError:
            return "llava"  # reported properly by the reader
    return "llava"


def read_llava(path: str | Path) -> list[dict]:
    """A LLaVA JSON list or JSON Lines file, as records."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: data file not found")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {n}: invalid JSON ({e.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of samples, got {type(records).__name__}")
    return records


def read_hf(path: str | Path):
    """A `save_to_disk` folder, or parquet / jsonl files, as a `datasets.Dataset` (memory-mapped)."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: dataset not found")
    if p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return ds
    files = sorted(str(f) for f in p.glob("*.parquet")) if p.is_dir() else [str(p)]
    if not files:
        raise DataError(f"{path}: no save_to_disk dataset and no parquet files in this folder")
    kind = "parquet" if files[0].endswith(".parquet") else "json"
    return datasets.load_dataset(kind, data_files=files, split="train")


def read_records(spec: DatasetSpec):
    """The records of one dataset; a list for LLaVA files, a datasets.Dataset for HF ones."""
    return read_hf(spec.path) if detect_format(spec) == "hf" else read_llava(spec.path)


def _content_text(content: Any) -> tuple[str, int]:
    """Text of a message's content and how many image placeholders it holds."""
    if isinstance(content, str):
        return content, content.count(IMAGE_TAG)
    if isinstance(content, list):
        texts, n = [], 0
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                texts.append(IMAGE_TAG)
                n += 1
            elif isinstance(part, dict) and part.get("type") == "text":
                texts.append(part.get("text") or "")
        return "\n".join(texts) if n else "".join(texts), n
    return "", 0


def to_sample(record: Any, index: int, spec: DatasetSpec, fmt: str) -> Sample:
    """Validate one record and turn it into a `Sample` (raises `SampleError`)."""
    if not isinstance(record, dict):
        raise SampleError(f"#{index}", "malformed", "a sample must be a JSON object")
    sid = str(record.get("id", f"#{index}"))
    if fmt == "hf":
        messages = record.get("messages")
        images = record.get("images") or []
        if not isinstance(messages, list):
            raise SampleError(sid, "malformed", "'messages' must be a list")
        raw_turns = []
        for m in messages:
            if not isinstance(m, dict):
                raise SampleError(sid, "malformed", "each message must be an object with role and content")
            text, _ = _content_text(m.get("content"))
            raw_turns.append((m.get("role"), text))
    else:
        conv = record.get("conversations")
        if not isinstance(conv, list):
            raise SampleError(sid, "malformed", "'conversations' must be a list")
        raw_turns = []
        for m in conv:
            if not isinstance(m, dict):
                raise SampleError(sid, "malformed", "each turn must be an object with from and value")
            raw_turns.append((m.get("from"), m.get("value")))
        image = record.get("image")
        images = [] if image in (None, "") else ([image] if isinstance(image, str) else image)
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise SampleError(sid, "malformed", "'image' must be a path or a list of paths")
    system = None
    turns: list[tuple[str, str]] = []
    for k, (role, text) in enumerate(raw_turns):
        norm = ROLES.get(role) if isinstance(role, str) else None
        if norm is None:
            raise SampleError(sid, "unknown role", f"turn {k}: unknown role {role!r} (human/gpt or user/assistant)")
        if not isinstance(text, str):
            raise SampleError(sid, "malformed", f"turn {k}: text must be a string")
        if norm == "system":
            if k != 0:
                raise SampleError(sid, "bad order", f"turn {k}: a system message must come first")
            system = text
            continue
        turns.append((norm, text))
    if not turns:
        raise SampleError(sid, "empty conversation", "no turns")
    for k, (role, _) in enumerate(turns):
        expected = "user" if k % 2 == 0 else "assistant"
        if role != expected:
            raise SampleError(sid, "turns do not alternate", f"turn {k}: expected {expected}, got {role}")
    if len(turns) % 2:
        raise SampleError(sid, "turns do not alternate", "the last turn must be the assistant's answer")
    for k, (role, text) in enumerate(turns):
        if role == "assistant" and not text.strip():
            raise SampleError(sid, "empty answer", f"turn {k}: empty answer")
    tags = sum(text.count(IMAGE_TAG) for _, text in turns)
    if tags != len(images):
        raise SampleError(sid, "image tag mismatch", f"{tags} <image> tag(s) for {len(images)} image(s)")
    if any(IMAGE_TAG in text for role, text in turns if role == "assistant"):
        raise SampleError(sid, "image tag mismatch", "an <image> tag in an answer")
    turns = _place_image_tag(turns, len(images))
    if spec.response_suffix:
        turns = tuple((r, f"{t}\n{spec.response_suffix}" if r == "user" else t) for r, t in turns)
    return Sample(id=sid, turns=tuple(turns), images=tuple(images), system=system)


def _place_image_tag(turns: list[tuple[str, str]], n_images: int) -> list[tuple[str, str]]:
    """LLaVA-1.5 moves a single `<image>` of the first user turn to its start, as `<image>\\n` + text."""
    if n_images != 1 or IMAGE_TAG not in turns[0][1]:
        return turns
    text = turns[0][1].replace(IMAGE_TAG, "").strip()
    return [("user", f"{IMAGE_TAG}\n{text}"), *turns[1:]]


def resolve_image(path: Any, spec: DatasetSpec, sample_id: str, allow_absolute: bool) -> Any:
    """An image path inside the dataset's image folder; escaping it (../, symlinks) is refused."""
    if not isinstance(path, str):
        return path  # already decoded (HF datasets Image feature)
    folder = Path(spec.image_folder) if spec.image_folder else Path(spec.path).parent
    full = Path(path) if os.path.isabs(path) else folder / path
    if not allow_absolute:
        root = folder.resolve()
        try:
            full.resolve().relative_to(root)
        except ValueError:
            raise SampleError(sample_id, "path escapes image folder", f"image {path!r} lies outside {folder}") from None
    return full
