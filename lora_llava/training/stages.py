"""Several stages in one command: `lora-llava train stage1.yaml stage2.yaml [overrides]`.

Each stage is a recipe file, trained in the order given. A stage that follows a
stage-1 (align) run starts from that run's output, as LLaVA-1.5's stage 2 starts
from the aligned projector:

* `model.projector` is set to the stage-1 run folder (its projector.safetensors);
* when stage 1 composed the model from a CLIP tower and an LLM, `model.name_or_path`
  becomes the model stage 1 saved (`<run>/model`), which holds the new `<image>`
  and `<pad>` embeddings the stage-1 projector was aligned with.

Overrides apply to every stage; `N:key.path=value` applies to stage N only
(`2:train.max_steps=10`). Every recipe is checked, and every data file looked
for, before the first stage starts, so a typo in stage 2 does not wait for
stage 1 to finish. A stage whose output folder already holds the finished run
of the same recipe is skipped, so the same command picks up after a failure.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from ..data.build import check_local_inputs
from ..errors import DataError, RecipeError
from ..model.load import check_source
from ..recipe.parse import apply_overrides, parse_recipe, read_yaml, recipe_to_dict
from ..recipe.schema import Recipe
from ..runs import RunPaths
from .resume import changed_keys
from .tracking import check_tracker

STAGE_OVERRIDE = re.compile(r"^(\d+):(.+)$")


def split_overrides(overrides: list[str], n_stages: int) -> list[list[str]]:
    """Per stage, the overrides that apply to it: unprefixed ones to all, `N:...` to stage N."""
    per_stage: list[list[str]] = [[] for _ in range(n_stages)]
    bad = []
    for item in overrides:
        m = STAGE_OVERRIDE.match(item)
        if not m:
            for stage in per_stage:
                stage.append(item)
        elif 1 <= int(m.group(1)) <= n_stages:
            per_stage[int(m.group(1)) - 1].append(m.group(2))
        else:
            bad.append(f"{item}: there is no stage {m.group(1)} (stages 1 to {n_stages})")
    if bad:
        raise RecipeError("<command line>", bad)
    return per_stage


def plan_stages(recipe_files: list[str | Path], overrides: list[str]) -> tuple[list[Recipe], list[list[str]]]:
    """The recipes of all stages, each stage after stage 1 wired to its predecessor's output; and notes on what was wired."""
    per_stage = split_overrides(list(overrides), len(recipe_files))
    recipes: list[Recipe] = []
    notes: list[list[str]] = []
    for i, (path, own) in enumerate(zip(recipe_files, per_stage)):
        raw = apply_overrides(read_yaml(path), own)
        wired = _follow(raw, recipes[-1], i + 1, str(path)) if recipes else []
        recipes.append(parse_recipe(raw, str(path)))
        notes.append(wired)
    outputs = [Path(r.train.output_dir).resolve() for r in recipes]
    for i, out in enumerate(outputs):
        if out in outputs[:i]:
            first = outputs.index(out) + 1
            raise RecipeError(
                str(recipe_files[i]),
                [
                    f"train.output_dir: stages {first} and {i + 1} both write to {out}; give each stage its own (e.g. {i + 1}:train.output_dir=...)"
                ],
            )
    return recipes, notes


def _follow(raw: dict, previous: Recipe, stage: int, source: str) -> list[str]:
    """Point the model section of `raw` (stage `stage`) at the output of the stage before; returns what was set."""
    if previous.stage != "align":
        raise RecipeError(
            source, [f"stage {stage} follows a stage-2 (instruct) run; only a stage-1 (align) run can start another stage"]
        )
    model = raw.setdefault("model", {})
    if not isinstance(model, dict):
        return []  # parse_recipe reports the malformed section
    run = previous.train.output_dir
    wired = [f"model.projector = {run} (the projector stage {stage - 1} aligned)"]
    model["projector"] = run
    if previous.model.vision_tower:
        model_dir = str(RunPaths(Path(run)).model_dir)
        model["name_or_path"] = model_dir
        model.pop("vision_tower", None)
        model.pop("language_model", None)
        model.pop("revision", None)
        wired.append(f"model.name_or_path = {model_dir} (the model stage {stage - 1} composed)")
    elif model.get("name_or_path") != previous.model.name_or_path or model.get("vision_tower"):
        mine = model.get("name_or_path") or f"{model.get('vision_tower')} + {model.get('language_model')}"
        raise RecipeError(
            source,
            [
                f"model.name_or_path: stage {stage} trains {mine} but stage {stage - 1} aligned the projector of "
                f"{previous.model.name_or_path}; the projector fits that model only (override model.name_or_path for both stages)"
            ],
        )
    return wired


def check_inputs(recipes: list[Recipe]) -> None:
    """What can be checked cheaply before hours of stage 1: data files, image folders, model sources not made by a stage."""
    for i, r in enumerate(recipes):
        check_tracker(r)
        try:
            check_local_inputs(r)
        except DataError as e:
            raise DataError(f"{e} (stage {i + 1})") from None
        if i == 0 or recipes[i - 1].stage != "align":
            m = r.model
            for key, value in (
                ("model.name_or_path", m.name_or_path),
                ("model.vision_tower", m.vision_tower),
                ("model.language_model", m.language_model),
            ):
                if value:
                    check_source(value, key)


def finished(recipe: Recipe) -> bool:
    """Whether the recipe's output folder holds the finished run of this very recipe."""
    paths = RunPaths(Path(recipe.train.output_dir))
    if not paths.recipe.is_file():
        return False
    old = yaml.safe_load(paths.recipe.read_text(encoding="utf-8")) or {}
    return paths.is_finished(recipe.stage) and not changed_keys(old, recipe_to_dict(recipe))


def train_stages(recipe_files: list[str | Path], overrides: list[str], overwrite: bool = False) -> list[Path]:
    """Train the stages in order, each from the previous one's output; returns the run folders."""
    from .run import train

    recipes, notes = plan_stages(recipe_files, overrides)
    check_inputs(recipes)
    outs = []
    for i, (recipe, wired) in enumerate(zip(recipes, notes), start=1):
        out = Path(recipe.train.output_dir)
        if not overwrite and finished(recipe):
            print(f"stage {i}/{len(recipes)} ({recipe.stage}): {out} holds this finished run; skipped", flush=True)
            outs.append(out)
            continue
        print(f"stage {i}/{len(recipes)} ({recipe.stage}): {recipe_files[i - 1]} -> {out}", flush=True)
        for line in wired:
            print(f"  {line}", flush=True)
        outs.append(train(recipe, overwrite=overwrite))
        print(f"stage {i} done: {out}", flush=True)
    return outs
