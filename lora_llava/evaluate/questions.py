"""Questions to answer, read from an eval file: the conversation up to each answer, its images and reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..data.columns import RecordReader
from ..data.formats import IMAGE_TAG, SampleError, to_sample
from ..data.images import load_image
from ..data.paths import resolve_image
from ..data.readers import read_records, reads_as_json
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
    metadata: tuple[tuple[str, str], ...] = ()  # (field, value) of the record, e.g. ("q_lang", "en"); scores group by them

    @property
    def text(self) -> str:
        return self.turns[-1][1].replace(IMAGE_TAG, "").strip()


def _question_file(record: Any) -> bool:
    """LLaVA's question files (`question_id`, `image`, `text`; POPE's `label`), which no column mapping names."""
    return isinstance(record, dict) and "text" in record and not any(k in record for k in ("conversations", "messages", "question"))


def _as_conversation(record: Any) -> Any:
    """A LLaVA question file record as a one-question conversation."""
    text = record.get("text")
    if not isinstance(text, str):
        return record  # to_sample reports it
    tag = IMAGE_TAG + "\n" if record.get("image") and IMAGE_TAG not in text else ""
    conv = [{"from": "human", "value": tag + text}]
    reference = record.get("answer", record.get("label"))
    if isinstance(reference, str):
        conv.append({"from": "gpt", "value": reference})
    return {**record, "id": record.get("question_id", record.get("id")), "conversations": conv}


def _pending(record: Any) -> tuple[Any, bool]:
    """A conversation that ends with the user's question gets a placeholder answer (to validate); True if so."""
    hf = isinstance(record, dict) and "messages" in record
    key, role = ("messages", "role") if hf else ("conversations", "from")
    turns = record.get(key) if isinstance(record, dict) else None
    if not (isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get(role) in ("human", "user")):
        return record, False
    answer = {"role": "assistant", "content": PLACEHOLDER} if hf else {"from": "gpt", "value": PLACEHOLDER}
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


def read_questions(
    spec: DatasetSpec, limit: int | None = None, allow_absolute_paths: bool = False, where: str = "data.eval"
) -> list[Question]:
    """The questions of a dataset: one per answer in each conversation (earlier answers as history), or the open one."""
    records = read_records(spec)
    read = RecordReader(spec, where, None if reads_as_json(spec) else records.column_names)
    out: list[Question] = []
    kept = 0
    for i in range(len(records)):
        if limit is not None and len(out) >= limit or spec.max_samples is not None and kept >= spec.max_samples:
            break  # the first samples that pass the filters, every time
        raw = records[i]
        if not read.keep(raw):
            continue
        kept += 1
        question_file = _question_file(raw) and not spec.columns.question  # a mapping reads the record its own way
        try:
            record, pending = _pending(_as_conversation(raw) if question_file else read(raw, i))
            s = to_sample(record, i, spec)
            images = tuple(resolve_image(p, spec, s.id, allow_absolute_paths) for p in s.images)
        except SampleError as e:
            raise DataError(f"{spec.path}: {e}") from None
        rounds = len(s.turns) // 2
        metadata = tuple(read.metadata(raw).items())
        for k in range(rounds):
            reference = None if pending and k == rounds - 1 else s.turns[2 * k + 1][1]
            qid = s.id if rounds == 1 else f"{s.id}#{k + 1}"
            kind = question_kind(raw, reference, rounds == 1)
            out.append(Question(qid, s.turns[: 2 * k + 1], images, reference, kind, metadata))
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
