"""May this output folder be used, and from which checkpoint does the run continue?

A run folder belongs to one recipe (its `recipe.yaml`). Starting again with
the same recipe resumes from the newest complete `checkpoint-<step>`; a
different recipe, or a folder that is not a run, is refused unless
`--overwrite`, so nothing that was there is lost by accident.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from ..errors import OutputError
from ..recipe.parse import dump_recipe, recipe_to_dict
from ..recipe.schema import Recipe
from ..runs import CHECKPOINT, FINAL_STAGING, STAGING, RunPaths, is_complete_checkpoint

# Keys that may change between a run and its resumption without changing what is trained.
RESUME_FREE_KEYS = {
    "train.output_dir",
    "train.logging_steps",
    "train.save_steps",
    "train.save_total_limit",
    "train.eval_steps",
    "data.num_workers",
    "data.eval",
    "train.loss",  # chunked and standard cross-entropy compute the same loss
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """Training-relevant keys whose values differ between two resolved recipes."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k))


def prepare_output_dir(out: Path, recipe: Recipe, overwrite: bool, resume: str | bool | None, create: bool) -> Path | None:
    """Check that `out` may be used; with `create`, make it and record the recipe. Returns the checkpoint to resume."""
    paths = RunPaths(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"train.output_dir: {out} exists and is not a folder")
    ancestor = next(p for p in (out, *out.parents) if p.exists())
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK):
        raise OutputError(f"train.output_dir: cannot write {out} ({ancestor} is not a writable folder)")
    used = out.is_dir() and any(out.iterdir())
    if used and overwrite:
        if create:
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        used = False
    checkpoint = None
    if used:
        if not paths.recipe.is_file():
            raise OutputError(f"train.output_dir: {out} is not empty and holds no lora-llava run (use --overwrite to replace it)")
        old = yaml.safe_load(paths.recipe.read_text(encoding="utf-8")) or {}
        diff = changed_keys(old, recipe_to_dict(recipe))
        if diff:
            raise OutputError(
                f"train.output_dir: {out} holds a run of a different recipe (changed: {', '.join(diff)}); "
                "use another output_dir, or --overwrite to replace it"
            )
        found = paths.checkpoints()
        finished = paths.is_finished()
        if finished and not isinstance(resume, str):
            raise OutputError(f"train.output_dir: {out} holds a finished run of this recipe; use --overwrite to train it again")
        if isinstance(resume, str):
            checkpoint = Path(resume)
            if not is_complete_checkpoint(checkpoint):
                raise OutputError(f"--resume: {resume} is not a complete checkpoint")
        elif resume is False and found:
            raise OutputError(f"train.output_dir: {out} has checkpoints and --no-resume was given; use --overwrite to start over")
        elif found:
            checkpoint = found[-1]
    elif isinstance(resume, str):
        raise OutputError(f"--resume: {resume} is not a complete checkpoint")
    if create:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"train.output_dir: cannot create {out} ({e.strerror})") from None
        clean_incomplete(out)
        truncate_metrics(paths.metrics, _step_of(checkpoint) if checkpoint is not None else 0)
        dump_recipe(recipe, paths.recipe)
    return checkpoint


def _step_of(checkpoint: Path) -> int:
    m = CHECKPOINT.match(checkpoint.name)
    if m:
        return int(m.group(1))

    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def clean_incomplete(out: Path) -> None:
    """Remove what a killed save left: the staging folder, checkpoint folders without their state."""
    shutil.rmtree(out / STAGING, ignore_errors=True)
    shutil.rmtree(out / FINAL_STAGING, ignore_errors=True)
    for p in out.iterdir():
        if CHECKPOINT.match(p.name) and p.is_dir() and not is_complete_checkpoint(p):
            shutil.rmtree(p, ignore_errors=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after the checkpoint we resume from: they are about to be logged again."""

    if not path.is_file():
        return
    keep = [
        line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
