"""`lora-llava eval` and batch `predict`: a model or run answers an eval file, the answers are scored and written.

The scores are `metrics`' (closed accuracy, open recall, exact match, POPE);
per-question rows go to predictions.jsonl, the report to metrics.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError, ModelError, OutputError
from ..recipe.schema import EVAL_SPLITS, DatasetSpec, Recipe
from ..runs import RunPaths
from .generate import Predictor, as_predictor
from .metrics import score
from .questions import answer_questions, read_questions
from .sampling import GENERATION_BATCH, Sampling

# ----------------------------------------------------------------------------- reading


# ----------------------------------------------------------------------------- metrics


# ----------------------------------------------------------------------------- running


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
    batch_size: int = GENERATION_BATCH,
    limit: int | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
) -> dict:
    """Generate on one dataset and score it; per-question rows go to `output` (JSON lines) when given."""
    spec = data if isinstance(data, DatasetSpec) else DatasetSpec(path=str(data), image_folder=image_folder, split=EVAL_SPLITS)
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
    if model is None and not (RunPaths(run).has_adapter() or (RunPaths(run).model_dir / "config.json").is_file()):
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
    batch_size: int = GENERATION_BATCH,
    limit: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Answer every question of a LLaVA JSON / JSONL file; one JSON line per question (id, question, answer, reference)."""
    check_outputs([Path(output)], overwrite)
    questions = read_questions(DatasetSpec(path=str(data), image_folder=image_folder, split=EVAL_SPLITS), limit)
    answers = answer_questions(as_predictor(model), questions, sampling, batch_size)
    rows = [
        {"id": q.id, "question": q.text, "answer": a, **({"reference": q.reference} if q.reference is not None else {})}
        for q, a in zip(questions, answers)
    ]
    return write_jsonl(Path(output), rows)


# ----------------------------------------------------------------------------- during training


