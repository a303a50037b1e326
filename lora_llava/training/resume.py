"""May this output folder be used, and from which checkpoint does the run continue?

A run folder belongs to one recipe (its `recipe.yaml`). Starting again with
the same recipe resumes from the newest complete `checkpoint-<step>`; a
different recipe, or a folder that is not a run, is refused unless
`--overwrite`, so nothing that was there is lost by accident.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import yaml

from ..errors import OutputError, TrainingError
from ..model.load import refused_pickle
from ..recipe.parse import dump_recipe, recipe_to_dict
from ..recipe.schema import Recipe
from ..runs import CHECKPOINT, FINAL_STAGING, STAGING, RunPaths, checkpoint_problem, truncate_metrics

log = logging.getLogger("lora_llava")

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
    "train.report_to",  # where logs are copied, not what is trained
    "train.run_name",
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
    checkpoint = _checkpoint_to_resume(paths, recipe, resume, create) if used else None
    if not used and isinstance(resume, str):
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


def _checkpoint_to_resume(paths: RunPaths, recipe: Recipe, resume: str | bool | None, create: bool) -> Path | None:
    """The checkpoint a used run folder continues from; refuses another recipe's run, a finished one, damage."""
    out = paths.root
    every = paths.all_checkpoints()
    found = [p for p, problem in every if problem is None]
    old = _recorded_recipe(paths, found)
    if old is None:
        raise OutputError(f"train.output_dir: {out} is not empty and holds no lora-llava run (use --overwrite to replace it)")
    diff = changed_keys(old, recipe_to_dict(recipe)) if old else []
    if diff:
        raise OutputError(
            f"train.output_dir: {out} holds a run of a different recipe (changed: {', '.join(diff)}); "
            "use another output_dir, or --overwrite to replace it"
        )
    if paths.is_finished() and not isinstance(resume, str):
        raise OutputError(f"train.output_dir: {out} holds a finished run of this recipe; use --overwrite to train it again")
    if isinstance(resume, str):
        problem = checkpoint_problem(Path(resume))
        if problem:
            raise OutputError(f"--resume: {resume} is not a complete checkpoint ({problem})")
        return Path(resume)
    if resume is False and found:
        raise OutputError(f"train.output_dir: {out} has checkpoints and --no-resume was given; use --overwrite to start over")
    checkpoint = found[-1] if found else None
    newer = [(p, problem) for p, problem in every if problem and (checkpoint is None or _step_of(p) > _step_of(checkpoint))]
    if newer and create:
        _set_aside(newer, checkpoint)
    return checkpoint


def _recorded_recipe(paths: RunPaths, checkpoints: list[Path]) -> dict | None:
    """The run's recipe: its recipe.yaml, or, when a kill or a full disk left that torn, its newest checkpoint's."""
    for source in (paths.recipe, *(c / "recipe.yaml" for c in reversed(checkpoints))):
        try:
            raw = yaml.safe_load(source.read_bytes())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        if isinstance(raw, dict) and raw:
            return raw
    if paths.recipe.is_file() and not checkpoints and not paths.is_finished():
        return {}  # a run killed before its first checkpoint, its recipe torn: nothing to keep, nothing to compare
    return None


def _set_aside(damaged: list[tuple[Path, str]], checkpoint: Path | None) -> None:
    """Rename damaged checkpoints newer than the resume point out of the way (kept, never deleted), in one line each."""
    for folder, problem in damaged:
        target = folder.with_name(f"damaged-{folder.name}")
        n = 1
        while target.exists():
            n += 1
            target = folder.with_name(f"damaged-{folder.name}-{n}")
        os.replace(folder, target)
        start = f"resuming from {checkpoint.name}" if checkpoint is not None else "starting from step 0"
        log.warning("%s is damaged (%s): kept as %s; %s", folder, problem, target.name, start)


def _step_of(checkpoint: Path) -> int:
    m = CHECKPOINT.match(checkpoint.name)
    if m:
        return int(m.group(1))
    return int(json.loads((checkpoint / "trainer_state.json").read_text())["global_step"])


def clean_incomplete(out: Path) -> None:
    """Remove what a killed save left: the staging folders (checkpoints themselves are never removed here)."""
    shutil.rmtree(out / STAGING, ignore_errors=True)
    shutil.rmtree(out / FINAL_STAGING, ignore_errors=True)


@contextlib.contextmanager
def refused_pickles_name_the_file(checkpoint: str | None) -> Iterator[None]:
    """A checkpoint file that `torch.load(weights_only=True)` refuses (Python objects, not tensors) is named in one line."""
    try:
        yield
    except pickle.UnpicklingError:
        from transformers.trainer_pt_utils import safe_globals

        with safe_globals():  # the numpy types the Trainer itself allows in RNG states
            culprit = refused_pickle(sorted(Path(checkpoint).rglob("*"))) if checkpoint else None
        raise TrainingError(
            f"{culprit or checkpoint}: holds pickled Python objects, not only tensors, and was refused (nothing in it "
            "ran); resume from a checkpoint you trust"
        ) from None
