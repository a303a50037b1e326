"""The cheapest changes to a recipe that make it fit a card."""

from __future__ import annotations

from ..recipe.parse import apply_overrides, parse_recipe, recipe_to_dict
from ..recipe.schema import Recipe
from .estimate import Estimate, estimate
from .shapes import ModelShape


def with_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    return parse_recipe(apply_overrides(recipe_to_dict(recipe), overrides), "<estimate>")


def candidate_changes(recipe: Recipe) -> list[list[str]]:
    """Changes that lower memory, cheapest first (in speed and in fidelity to LLaVA-1.5's recipe)."""
    t, changes = recipe.train, []
    if t.loss != "chunked":
        changes.append(["train.loss=chunked"])
    if t.gradient_checkpointing is not True and t.gradient_checkpointing != "auto":  # auto reaches all layers itself
        changes.append(["train.gradient_checkpointing=true"])
    if t.optimizer in ("adamw", "paged_adamw"):
        changes.append(["train.optimizer=adamw_8bit"])
    if t.batch_size > 1:
        changes.append(["train.batch_size=1", f"train.grad_accum={t.batch_size * t.grad_accum}"])  # same global batch
    if recipe.model.quantization == "none" and recipe.stage == "instruct":
        changes.append(["model.quantization=nf4"])
    if recipe.stage == "instruct" and recipe.lora.r > 16:
        changes.append([f"lora.r={recipe.lora.r // 2}", f"lora.alpha={recipe.lora.alpha / 2:g}"])  # same alpha/r scale
    for length in (1536, 1024):
        if recipe.data.max_length > length:
            changes.append([f"data.max_length={length}"])
    return changes


def cheapest_fit(recipe: Recipe, shape: ModelShape, budget: float, device: str = "cuda") -> tuple[list[str], Estimate] | None:
    """The cheapest set of changes that makes `recipe` fit `budget`: add in cost order, then drop the unneeded ones."""
    chosen: list[list[str]] = []
    for change in candidate_changes(recipe):
        chosen.append(change)
        if estimate(with_overrides(recipe, sum(chosen, [])), shape, device).total <= budget:
            break
    else:
        return None
    for change in reversed(chosen[:-1]):  # the last one was needed; try without each earlier one, costliest first
        rest = [c for c in chosen if c is not change]
        if estimate(with_overrides(recipe, sum(rest, [])), shape, device).total <= budget:
            chosen = rest
    overrides = sum(chosen, [])
    return overrides, estimate(with_overrides(recipe, overrides), shape, device)
