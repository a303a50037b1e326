"""Medical-VQA and POPE scores of answers against references: pure functions, no model, no torch.

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

import re
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for annotations only: questions.py uses `normalize` from here
    from .questions import Question

EXISTENCE = re.compile(r"\b(is|are) there (a|an|any|some)\b", re.IGNORECASE)


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
    groups = _groups(questions, rows)
    if groups:
        report["groups"] = groups
    return rows, report


# Fields that already decide closed / open, and are not worth a second breakdown.
KIND_FIELDS = ("answer_type", "question_type")


def _groups(questions: list[Question], rows: list[dict]) -> dict[str, dict[str, dict]]:
    """Scores per value of each metadata field (language, content type...): {field: {value: summary}}."""
    members: dict[str, dict[str, list[dict]]] = {}
    for q, row in zip(questions, rows):
        if q.reference is None:
            continue
        for name, value in q.metadata:
            if name not in KIND_FIELDS:
                members.setdefault(name, {}).setdefault(value, []).append(row)
    out: dict[str, dict[str, dict]] = {}
    for name, by_value in members.items():
        out[name] = {}
        for value, group in sorted(by_value.items()):
            closed = [r["correct"] for r in group if "correct" in r]
            recall = [r["recall"] for r in group if "recall" in r]
            summary: dict[str, Any] = {"n": len(group), "exact_match": _mean([r["exact_match"] for r in group])}
            if closed:
                summary["closed_accuracy"] = _mean(closed)
            if recall:
                summary["open_recall"] = _mean(recall)
            out[name][value] = summary
    return out


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
    for name, by_value in report.get("groups", {}).items():
        for value, g in by_value.items():
            parts = [f"exact match {g['exact_match']:.3f}"]
            if "closed_accuracy" in g:
                parts.append(f"closed accuracy {g['closed_accuracy']:.3f}")
            if "open_recall" in g:
                parts.append(f"open recall {g['open_recall']:.3f}")
            lines.append(f"  {name}={value}: {g['n']:4d}   " + "   ".join(parts))
    return "\n".join(lines)
