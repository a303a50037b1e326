"""Did it get better at the task? Generate on an eval set and score it as medical VQA is scored.

The metrics LLaVA-Med reports for VQA-RAD, SLAKE and PathVQA, written down
exactly (answers and references are lower-cased, punctuation becomes space):

* closed-set accuracy: for a yes/no reference, the first "yes" or "no" word of
  the answer must equal it (an answer with neither is wrong); for another
  closed reference ("left"), its words must appear in the answer, in order.
* open-set recall: the share of the reference's tokens found in the answer
  (counted with multiplicity), averaged over open questions.
* exact match: the normalised answer equals the normalised reference.

A question is closed or open by its `question_type` / `answer_type` field
(VQA-RAD and SLAKE use answer_type CLOSED / OPEN), else closed when its
reference is yes or no. Object-existence questions ("Is there a X in the
image?") with yes/no references also get POPE's hallucination probe:
accuracy, precision, recall and F1 with "yes" as positive, and the yes-ratio;
an answer counts as "no" when its first sentence holds "no" or "not" (POPE's rule).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .data.formats import IMAGE_TAG, SampleError, detect_format, read_records, resolve_image, to_sample
from .data.images import load_image
from .errors import DataError, ModelError, OutputError
from .inference import Predictor, Request, Sampling, as_predictor
from .recipe import DatasetSpec, Recipe

EXISTENCE = re.compile(r"\b(is|are) there (a|an|any|some)\b", re.IGNORECASE)
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


# ----------------------------------------------------------------------------- reading


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


# ----------------------------------------------------------------------------- metrics


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def yes_no(text: str) -> str | None:
    """The first yes / no word of a text."""
    return next((w for w in normalize(text).split() if w in ("yes", "no")), None)


def exact_match(answer: str, reference: str) -> bool:
    return normalize(answer) == normalize(reference)


def token_recall(answer: str, reference: str) -> float:
    """Share of the reference's tokens present in the answer (with multiplicity)."""
    ref, ans = Counter(normalize(reference).split()), Counter(normalize(answer).split())
    total = sum(ref.values())
    return sum(min(n, ans[w]) for w, n in ref.items()) / total if total else 0.0


def closed_correct(answer: str, reference: str) -> bool:
    ref = normalize(reference)
    if ref in ("yes", "no"):
        return yes_no(answer) == ref
    return f" {ref} " in f" {normalize(answer)} "


def pope_answer(answer: str) -> str:
    """POPE's rule: the first sentence is "no" when it holds the word no or not, else "yes"."""
    first = answer.split(".")[0].replace(",", " ").lower()
    return "no" if {"no", "not"} & set(first.split()) else "yes"


def pope_metrics(pairs: list[tuple[str, str]]) -> dict[str, float]:
    """POPE's metrics over (answer, yes/no reference) pairs, with "yes" as the positive class."""
    pred = [pope_answer(a) == "yes" for a, _ in pairs]
    gold = [normalize(r) == "yes" for _, r in pairs]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    n = len(pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    accuracy = sum(p == g for p, g in zip(pred, gold)) / n if n else 0.0
    return {
        "n": n,
        "accuracy": accuracy,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(pred) / n if n else 0.0,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def score(questions: list[Question], answers: list[str]) -> tuple[list[dict], dict]:
    """Per-question rows and the report: overall, closed, open, and POPE when there are existence questions."""
    rows, closed, opened, pope = [], [], [], []
    for q, a in zip(questions, answers):
        row: dict[str, Any] = {"id": q.id, "question": q.text, "answer": a}
        if q.reference is not None:
            row.update(reference=q.reference, type=q.kind, exact_match=exact_match(a, q.reference))
            if q.kind == "closed":
                row["correct"] = closed_correct(a, q.reference)
                closed.append(row)
            else:
                row["recall"] = token_recall(a, q.reference)
                opened.append(row)
            if EXISTENCE.search(q.text) and normalize(q.reference) in ("yes", "no"):
                pope.append((a, q.reference))
        rows.append(row)
    scored = closed + opened
    report: dict[str, Any] = {
        "n": len(scored),
        "exact_match": _mean([r["exact_match"] for r in scored]),
        "closed": {
            "n": len(closed),
            "accuracy": _mean([r["correct"] for r in closed]),
            "exact_match": _mean([r["exact_match"] for r in closed]),
        },
        "open": {
            "n": len(opened),
            "recall": _mean([r["recall"] for r in opened]),
            "exact_match": _mean([r["exact_match"] for r in opened]),
        },
    }
    if pope:
        report["pope"] = pope_metrics(pope)
    return rows, report


def headline(report: dict) -> dict[str, float]:
    """The few numbers worth a chart: closed accuracy, open recall, exact match, POPE F1."""
    out = {}
    if report["closed"]["n"]:
        out["closed accuracy"] = report["closed"]["accuracy"]
    if report["open"]["n"]:
        out["open recall"] = report["open"]["recall"]
    out["exact match"] = report["exact_match"]
    if "pope" in report:
        out["POPE F1"] = report["pope"]["f1"]
    return out


def format_report(report: dict, title: str = "") -> str:
    lines = [title] if title else []
    lines.append(f"  questions scored: {report['n']}   exact match: {report['exact_match']:.3f}")
    c, o = report["closed"], report["open"]
    if c["n"]:
        lines.append(f"  closed (yes/no): {c['n']:4d}   accuracy: {c['accuracy']:.3f}   exact match: {c['exact_match']:.3f}")
    if o["n"]:
        lines.append(f"  open:            {o['n']:4d}   recall:   {o['recall']:.3f}   exact match: {o['exact_match']:.3f}")
    if "pope" in report:
        p = report["pope"]
        lines.append(
            f"  POPE probe:      {p['n']:4d}   accuracy {p['accuracy']:.3f}  precision {p['precision']:.3f}  "
            f"recall {p['recall']:.3f}  F1 {p['f1']:.3f}  yes-ratio {p['yes_ratio']:.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def answer_questions(predictor: Predictor, questions: list[Question], sampling: Sampling, batch_size: int = 8) -> list[str]:
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


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse to replace earlier results unless asked to."""
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        raise OutputError(f"{existing[0]} exists (use --overwrite to replace it, or another --output)")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


def evaluate_model(
    model: str | Path | Predictor,
    data: str | Path | DatasetSpec,
    image_folder: str | None = None,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    limit: int | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Generate on one dataset and score it; per-question rows go to `output` (JSON lines) when given."""
    spec = data if isinstance(data, DatasetSpec) else DatasetSpec(path=str(data), image_folder=image_folder)
    if output is not None:
        check_outputs([Path(output)], overwrite)
    questions = read_questions(spec, limit)
    if not any(q.reference is not None for q in questions):
        raise DataError(f"{spec.path}: no question has a reference answer; nothing to score (use `lora-llava predict --data`)")
    predictor = as_predictor(model)
    rows, report = score(questions, answer_questions(predictor, questions, sampling, batch_size))
    if output is not None:
        write_jsonl(Path(output), rows)
    return report


def evaluate_recipe(
    recipe: Recipe,
    model: str | Path | Predictor | None = None,
    sampling: Sampling = Sampling(),
    limit: int | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
) -> dict[str, dict]:
    """Each of `data.eval` scored with the run's adapter (or `model`); results in `<run>/eval/` (or `output_dir`)."""
    if not recipe.data.eval:
        raise DataError("data.eval: the recipe has no evaluation data")
    out = Path(output_dir) if output_dir is not None else Path(recipe.train.output_dir) / "eval"
    check_outputs([out / "predictions.jsonl", out / "metrics.json"], overwrite)
    run = Path(recipe.train.output_dir)
    if model is None and not ((run / "adapter_config.json").is_file() or (run / "model" / "config.json").is_file()):
        raise ModelError(f"train.output_dir: {run} holds no finished run (train it first, or give --model)")
    predictor = as_predictor(model if model is not None else run)
    reports, rows = {}, []
    for spec in recipe.data.eval:
        questions = read_questions(spec, limit, recipe.data.allow_absolute_paths)
        spec_rows, reports[spec.path] = score(
            questions, answer_questions(predictor, questions, sampling, recipe.train.batch_size)
        )
        rows += [{"dataset": spec.path, **r} for r in spec_rows]
    write_jsonl(out / "predictions.jsonl", rows)
    (out / "metrics.json").write_text(json.dumps(reports, indent=1), encoding="utf-8")
    return reports


def predict_file(
    model: str | Path | Predictor,
    data: str | Path,
    output: str | Path,
    image_folder: str | None = None,
    sampling: Sampling = Sampling(),
    batch_size: int = 8,
    limit: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Answer every question of a LLaVA JSON / JSONL file; one JSON line per question (id, question, answer, reference)."""
    check_outputs([Path(output)], overwrite)
    questions = read_questions(DatasetSpec(path=str(data), image_folder=image_folder), limit)
    answers = answer_questions(as_predictor(model), questions, sampling, batch_size)
    rows = [
        {"id": q.id, "question": q.text, "answer": a, **({"reference": q.reference} if q.reference is not None else {})}
        for q, a in zip(questions, answers)
    ]
    return write_jsonl(Path(output), rows)


# ----------------------------------------------------------------------------- during training


class GenerationEval(TrainerCallback):
    """Generates on `data.eval` whenever the Trainer evaluates (every `train.eval_steps`, and at the end).

    The scores go to the run's metrics.jsonl as `{"step": N, "eval": {dataset: report}}`, beside
    the eval loss the Trainer logs. Only the main process generates.
    """

    def __init__(self, recipe: Recipe, processor, metrics_path: Path, sampling: Sampling = Sampling()):
        self.recipe = recipe
        self.processor = processor
        self.path = metrics_path
        self.sampling = sampling
        self.last_step: int | None = None
        allow = recipe.data.allow_absolute_paths
        self.questions = {spec.path: read_questions(spec, None, allow) for spec in recipe.data.eval}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # The Trainer evaluates at the last step, and train() once more after it: score each step once.
        if not state.is_world_process_zero or model is None or state.global_step == self.last_step:
            return
        self.last_step = state.global_step
        was_training = model.training
        predictor = Predictor(
            model, self.processor, self.recipe.template, self.recipe.data.system_prompt, self.recipe.data.image_aspect
        )
        # Trained weights are fp32 beside a 16-bit base: run them as the training step does, under autocast.
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        try:
            with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
                reports = {
                    path: score(qs, answer_questions(predictor, qs, self.sampling, args.per_device_eval_batch_size))[1]
                    for path, qs in self.questions.items()
                }
        finally:
            model.train(was_training)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": state.global_step, "eval": reports}) + "\n")


def eval_callbacks(recipe: Recipe, processor, metrics_path: Path) -> list:
    """[GenerationEval] when the recipe has eval data and `train.eval_steps`; else none."""
    if not (recipe.data.eval and recipe.train.eval_steps):
        return []
    return [GenerationEval(recipe, processor, metrics_path)]
