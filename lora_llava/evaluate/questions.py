"""Questions to answer, read from an eval file: the conversation up to each answer, its images and reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.formats import IMAGE_TAG, SampleError, detect_format, to_sample
from ..data.images import load_image
from ..data.paths import resolve_image
from ..data.readers import read_records
from ..errors import DataError
from ..recipe.schema import DatasetSpec
from .generate import Predictor, Request
from .metrics import normalize
from .sampling import GENERATION_BATCH, Sampling

PLACEHOLDER = "(to be answered)"  # stands in for the answer of a question that has none, so samples validate


@dataclass(frozen=True)
class Question:
    """One question to answer: the conversation up to it, its images, and the reference answer if known."""

    id: str
    turns: tuple[tuple[str, str], ...]  # earlier rounds (with their reference answers), then the question
    images: tuple[Any, ...]
    reference: str | None = None
    kind: str | None = None  # closed | open; None without a reference

    @property
    def text(self) -> str:
        return self.turns[-1][1].replace(IMAGE_TAG, "").strip()


def _as_conversation(record: Any) -> Any:
    """LLaVA question files (`question_id`, `image`, `text`, POPE's `label`) as a one-question conversation."""
    if not isinstance(record, dict) or "conversations" in record or "messages" in record:
        return record
    text = record.get("text", record.get("question"))
    if not isinstance(text, str):
        return record  # to_sample reports it
    tag = IMAGE_TAG + "\n" if record.get("image") and IMAGE_TAG not in text else ""
    conv = [{"from": "human", "value": tag + text}]
    reference = record.get("answer", record.get("label"))
    if isinstance(reference, str):
        conv.append({"from": "gpt", "value": reference})
    return {**record, "id": record.get("question_id", record.get("id")), "conversations": conv}


def _pending(record: Any, fmt: str) -> tuple[Any, bool]:
    """A conversation that ends with the user's question gets a placeholder answer (to validate); True if so."""
    key, role = ("messages", "role") if fmt == "hf" else ("conversations", "from")
    turns = record.get(key) if isinstance(record, dict) else None
    if not (isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get(role) in ("human", "user")):
        return record, False
    answer = {"role": "assistant", "content": PLACEHOLDER} if fmt == "hf" else {"from": "gpt", "value": PLACEHOLDER}
    return {**record, key: [*turns, answer]}, True


def question_kind(record: Any, reference: str | None, single_round: bool) -> str | None:
    """closed / open from the record's question_type or answer_type, else closed when the reference is yes/no."""
    if reference is None:
        return None
    if single_round and isinstance(record, dict):
        for key in ("question_type", "answer_type"):
            value = str(record.get(key, "")).strip().lower()
            if value in ("closed", "open"):
                return value
    return "closed" if normalize(reference) in ("yes", "no") else "open"


def read_questions(spec: DatasetSpec, limit: int | None = None, allow_absolute_paths: bool = False) -> list[Question]:
    """The questions of a dataset: one per answer in each conversation (earlier answers as history), or the open one."""
    fmt = detect_format(spec)
    records = read_records(spec)
    n = len(records) if spec.max_samples is None else min(len(records), spec.max_samples)  # the first samples, every time
    out: list[Question] = []
    for i in range(n):
        if limit is not None and len(out) >= limit:
            break
        record, pending = _pending(_as_conversation(records[i]), fmt)
        try:
            s = to_sample(record, i, spec, fmt)
            images = tuple(resolve_image(p, spec, s.id, allow_absolute_paths) for p in s.images)
        except SampleError as e:
            raise DataError(f"{spec.path}: {e}") from None
        rounds = len(s.turns) // 2
        for k in range(rounds):
            reference = None if pending and k == rounds - 1 else s.turns[2 * k + 1][1]
            qid = s.id if rounds == 1 else f"{s.id}#{k + 1}"
            out.append(Question(qid, s.turns[: 2 * k + 1], images, reference, question_kind(records[i], reference, rounds == 1)))
    return out[:limit] if limit is not None else out


def answer_questions(predictor: Predictor, questions: list[Question], sampling: Sampling, batch_size: int = GENERATION_BATCH) -> list[str]:
    """Answers to `questions`; images are decoded one batch at a time, so large eval sets fit in memory."""
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        requests = []
        for q in questions[start : start + batch_size]:
            try:
                images = tuple(load_image(p) for p in q.images)
            except DataError as e:
                raise DataError(f"sample {q.id}: {e}") from None
            requests.append(Request(q.turns, images))
        answers += predictor.generate(requests, sampling, batch_size)
    return answers
