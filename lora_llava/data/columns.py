"""Datasets as they are distributed -> the conversation layouts: column mapping, detection and filters.

Medical VQA sets ship as question/answer rows (VQA-RAD and PathVQA on the hub:
`image`, `question`, `answer`; SLAKE: `img_name`, `question`, `answer`,
`answer_type`, `q_lang`), instruction sets as query/response or
instruction/output, TRL's as prompt/completion. A `Layout` says which field
is what, from the dataset spec's `columns` where given and from the field
names otherwise; `Layout.record` rewrites one row into the chat layout that
`formats.to_sample` reads (one round: question, then answer), keeping the
metadata fields evaluation groups by. Records already in the LLaVA or chat
layout pass through unchanged.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..recipe.schema import DatasetSpec
from .formats import IMAGE_TAG, MALFORMED, SampleError

CONVERSATION_KEYS = ("conversations", "messages")
# (question, answer) field names in the order they are tried.
PAIRS = (("question", "answer"), ("query", "response"), ("prompt", "completion"), ("instruction", "output"), ("input", "output"))
IMAGE_NAMES = ("images", "image", "img_name", "image_path", "img_path", "image_file", "image_name", "file_name", "img")
ID_NAMES = ("id", "qid", "question_id", "sample_id")
SYSTEM_NAMES = ("system", "system_prompt")
METADATA_NAMES = ("answer_type", "question_type", "q_lang", "lang", "language", "content_type", "modality")

_said: set[str] = set()


def say_once(line: str) -> None:
    """One line on stderr, once per process: a dataset is read by check, training and eval alike."""
    if line not in _said:
        _said.add(line)
        print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Layout:
    """How the records of one dataset are read: as conversations, or as question/answer fields."""

    question: str | None = None  # None: records are conversations (LLaVA or chat layout)
    answer: str | None = None
    image: str | None = None
    system: str | None = None
    id: str | None = None
    metadata: tuple[str, ...] = ()
    extra_input: str | None = None  # instruction/output sets: a non-empty `input` field follows the instruction

    @property
    def image_columns(self) -> tuple[str, ...]:
        """Columns that hold images (read undecoded from Arrow)."""
        return (self.image,) if self.image else ("images", "image")

    def describe(self) -> str:
        named = [f"{k}={getattr(self, k)}" for k in ("image", "question", "answer", "system", "id") if getattr(self, k)]
        if self.metadata:
            named.append("metadata=" + ",".join(self.metadata))
        return ", ".join(named)

    def record(self, raw: Any, index: int) -> Any:
        """A row in the chat layout, metadata fields kept; conversation records (and non-objects) unchanged."""
        if self.question is None or not isinstance(raw, dict):
            return raw
        sid = raw.get(self.id) if self.id else None
        sid = str(sid) if sid not in (None, "") else f"#{index}"
        question, answer = raw.get(self.question), raw.get(self.answer) if self.answer else None
        if question is None:
            raise SampleError(sid, MALFORMED, f"no {self.question!r} field (the question)")
        images = _images(raw.get(self.image) if self.image else None)
        messages = _messages(question, sid, "user") + ([] if answer is None else _messages(answer, sid, "assistant"))
        if self.extra_input and isinstance(raw.get(self.extra_input), str) and raw[self.extra_input].strip():
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n{raw[self.extra_input]}"}
        text = messages[0]["content"] if isinstance(messages[0]["content"], str) else None
        if images and text is not None and IMAGE_TAG not in text:
            messages[0] = {**messages[0], "content": (IMAGE_TAG + "\n") * len(images) + text}
        if self.system and isinstance(raw.get(self.system), str) and raw[self.system]:
            messages.insert(0, {"role": "system", "content": raw[self.system]})
        out = {"id": sid, "messages": messages, "images": images}
        out.update({k: raw[k] for k in self.metadata if k in raw})
        return out


def _images(value: Any) -> list:
    """Image references: a path, a list, an HF image ({"bytes", "path"}), or raw bytes."""
    if value is None or value == "":
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    return [{"bytes": v, "path": None} if isinstance(v, (bytes, bytearray)) else v for v in items]


def _messages(value: Any, sid: str, role: str) -> list[dict]:
    """One turn from a string, or the turns of a list of messages (TRL's conversational prompt/completion)."""
    if isinstance(value, list):
        if not all(isinstance(m, dict) and "role" in m for m in value):
            raise SampleError(sid, MALFORMED, f"the {role} field must be a string or a list of {{role, content}} messages")
        return [dict(m) for m in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # answers such as counts, stored as numbers
    if not isinstance(value, str):
        raise SampleError(sid, MALFORMED, f"the {role} field must be a string, got {type(value).__name__}")
    return [{"role": role, "content": value}]


def plan(spec: DatasetSpec, keys: Iterable[str], where: str, table: bool = True) -> Layout:
    """The question/answer layout of records with `keys`; `where` names the dataset in the recipe (data.train.0).

    Raises `DataError` for fields no mapping reads (`unknown_layout`), and, for a `table` (every record has every
    column), for a mapping that names absent columns. A JSON record may lack a mapped image, id or system field
    (a text-only record); a mapped question it lacks is its own error (`Layout.record`).
    """
    keys = list(keys)
    c = spec.columns
    explicit = {k: getattr(c, k) for k in ("image", "question", "answer", "system", "id") if getattr(c, k)}
    missing = [f"{where}.columns.{k}: {v!r}" for k, v in explicit.items() if v not in keys]
    if missing and table:
        raise DataError(f"{spec.path}: no such field(s) {'; '.join(missing)} (the records have {_list(keys)})")
    metadata = tuple(c.metadata) if c.metadata is not None else tuple(k for k in METADATA_NAMES if k in keys)
    pair = next(((q, a) for q, a in PAIRS if q in keys and a in keys), None)
    question = explicit.get("question") or (pair[0] if pair else None)
    if question is None:
        raise DataError(unknown_layout(spec, keys, where))
    answer = explicit.get("answer") or (pair[1] if pair and pair[0] == question else None)
    answer = answer or next((a for _, a in PAIRS if a in keys and a != question), None)
    layout = Layout(
        question=question,
        answer=answer,
        image=explicit.get("image") or next((k for k in IMAGE_NAMES if k in keys), None),
        system=explicit.get("system") or next((k for k in SYSTEM_NAMES if k in keys and k not in (question, answer)), None),
        id=explicit.get("id") or next((k for k in ID_NAMES if k in keys), None),
        metadata=metadata,
        extra_input="input" if question == "instruction" and "input" in keys else None,
    )
    if len(explicit) < 3 or c.metadata is None:
        say_once(f"{spec.path}: read as question/answer rows: {layout.describe()} (set {where}.columns to change)")
    return layout


_PASS = Layout()  # records already in a conversation layout


class RecordReader:
    """Raw records of one dataset -> records in a conversation layout.

    Records that hold `conversations` or `messages` pass through (unless the
    spec maps a question field). The others are read by the layout of their
    own fields, planned once per set of fields: a table's columns, or each
    distinct shape of JSON record (one with an image and one without, say).
    A record no layout reads is a bad sample whose reason names its fields
    and the mapping that would read them.
    """

    def __init__(self, spec: DatasetSpec, where: str, columns: list[str] | None = None):
        self.spec, self.where = spec, where
        self.table = columns is not None
        self.layouts: dict[frozenset, Layout | str] = {}  # fields -> layout, or why no layout reads them
        self.keys: list[str] | None = None
        if columns is not None:
            check_filters(spec, columns, where)
            self.keys = list(columns)
            found = self._layout(columns)
            if isinstance(found, str):
                raise DataError(found)

    def _layout(self, keys) -> Layout | str:
        fields = frozenset(keys)
        if fields not in self.layouts:
            if any(k in fields for k in CONVERSATION_KEYS) and not self.spec.columns.question:
                self.layouts[fields] = _PASS
            else:
                try:
                    self.layouts[fields] = plan(self.spec, list(keys), self.where, table=self.table)
                except DataError as e:
                    if not str(e).startswith(f"{self.spec.path}: records have"):
                        raise  # a mapping naming absent columns: the recipe is wrong, not a record
                    self.layouts[fields] = str(e)
        return self.layouts[fields]

    @property
    def layout(self) -> Layout | None:
        """The table's layout (None for JSON, where each record shape has its own)."""
        found = self._layout(self.keys) if self.table else None
        return found if isinstance(found, Layout) else None

    @property
    def image_columns(self) -> tuple[str, ...]:
        layout = self.layout
        return layout.image_columns if layout is not None and layout.image else ("images", "image")

    def keep(self, raw: Any) -> bool:
        """The spec's filters; a record without the filtered field is left out (`Source` says when that is all of them)."""
        if isinstance(raw, dict) and self.keys is None:
            self.keys = list(raw)
        return keep(self.spec, raw)

    def metadata(self, raw: Any) -> dict[str, str]:
        """The metadata fields of a raw record that evaluation groups by, as strings."""
        if not isinstance(raw, dict):
            return {}
        if self.spec.columns.metadata is not None:
            names = tuple(self.spec.columns.metadata)
        else:
            found = self._layout(raw)
            names = found.metadata if isinstance(found, Layout) and found.question else METADATA_NAMES
        return {k: str(raw[k]) for k in names if raw.get(k) not in (None, "")}

    def __call__(self, raw: Any, index: int) -> Any:
        if not isinstance(raw, dict):
            return raw  # to_sample names it
        found = self._layout(raw)
        if isinstance(found, str):
            sid = next((str(raw[k]) for k in ID_NAMES if raw.get(k) not in (None, "")), f"#{index}")
            raise SampleError(sid, MALFORMED, found.split(": ", 1)[1])
        return found.record(raw, index)


def _list(keys: list[str], most: int = 12) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "") if keys else "no fields"


def unknown_layout(spec: DatasetSpec, keys: list[str], where: str) -> str:
    """One line: the fields the file has, and the mapping keys that would read it."""
    lower = {k.lower(): k for k in keys}

    def guess(*names: str) -> str:
        for n in names:
            for k in lower:
                if n in k:
                    return lower[k]
        close = difflib.get_close_matches(names[0], list(lower), n=1, cutoff=0.5)
        return lower[close[0]] if close else "<field>"

    hint = f"{{image: {guess('img', 'image', 'file')}, question: {guess('question', 'query', 'prompt', 'q')}, answer: {guess('answer', 'response', 'label', 'a')}}}"
    return (
        f"{spec.path}: records have {_list(keys)}, but neither 'conversations' (LLaVA), 'messages' (chat) nor "
        f"question/answer fields; map them with {where}.columns: {hint}"
    )


def keep(spec: DatasetSpec, record: Any) -> bool:
    """True when the record passes the spec's filters (field equals the value, or one of the list)."""
    if not spec.filters or not isinstance(record, dict):
        return True
    for key, allowed in spec.filters.items():
        values = (allowed,) if isinstance(allowed, str) else allowed
        if str(record.get(key)) not in values:
            return False
    return True


def check_filters(spec: DatasetSpec, keys: list[str], where: str) -> None:
    """A filter on a column the table does not have would silently keep nothing: name it."""
    absent = [k for k in (spec.filters or {}) if k not in keys]
    if absent:
        raise DataError(f"{spec.path}: {where}.filters names field(s) {', '.join(absent)} that the records lack ({_list(keys)})")
