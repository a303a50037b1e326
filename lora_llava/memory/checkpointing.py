"""`train.gradient_checkpointing: auto`: checkpoint only as many decoder layers as the memory needs.

Checkpointing a layer keeps only its input and recomputes the rest in the
backward pass: a third more forward work for that layer. On a card with room
to spare that recompute buys nothing, so auto checkpoints the fewest first
layers whose estimated peak (`lora-llava estimate`'s, slack and CUDA context
included) still leaves MARGIN of the card free; the other layers keep their
activations. When no choice fits, the one with the lowest peak is taken and the
estimate says by how much the card is short (the lowest peak is chosen then).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..recipe.schema import Recipe
from .estimate import Estimate, estimate
from .shapes import GiB, ModelShape

MARGIN = 0.05  # of the card left free beyond the estimate: what the estimate cannot see (other processes, drift)


@dataclass(frozen=True)
class CheckpointPlan:
    layers: int  # the first `layers` decoder layers are checkpointed
    of: int
    estimate: Estimate  # the predicted peak with that choice
    auto: bool
    budget: float | None = None  # the memory auto planned for
    card: str = ""

    @property
    def fits(self) -> bool:
        return self.budget is None or self.estimate.total <= self.budget * (1 - MARGIN)

    def describe(self) -> str:
        """One line: what is checkpointed and, for auto, why."""
        chosen = {0: "none", self.of: "all"}.get(self.layers, f"the first {self.layers}")
        what = f"{chosen} of {self.of} decoder layers checkpointed"
        if not self.auto:
            return f"gradient checkpointing: {what}"
        peak = f"predicted peak {self.estimate.total / GiB:.1f} GiB of {self.card}"
        if self.fits:
            return f"gradient checkpointing auto: {what}; {peak}, {MARGIN:.0%} kept free"
        return f"gradient checkpointing auto: {what} (the lowest peak), and still the {peak} leaves less than {MARGIN:.0%} free"


def plan(recipe: Recipe, shape: ModelShape, budget: float, card: str, device: str = "cuda") -> CheckpointPlan:
    """How many decoder layers `recipe` checkpoints on a card of `budget` bytes, and the peak that gives."""
    n = shape.layers
    fixed = recipe.train.checkpointed_layers(n)
    if fixed is not None:
        return CheckpointPlan(fixed, n, estimate(recipe, shape, device, fixed), auto=False, budget=budget, card=card)
    plans = [CheckpointPlan(k, n, estimate(recipe, shape, device, k), auto=True, budget=budget, card=card) for k in range(n + 1)]
    fitting = [p for p in plans if p.fits]
    if fitting:
        return fitting[0]  # the fewest recomputes that fit
    # Nothing fits: the lowest peak. (Checkpointing the last layer too can cost more than keeping its
    # activations: its input is kept and it is recomputed first thing in the backward pass.)
    return min(plans, key=lambda p: p.estimate.total)


def plan_for_training(recipe: Recipe, config) -> CheckpointPlan:
    """The plan of a run about to train: the loaded model's config, the memory it may fill, the device it runs on."""
    import torch

    from .budget import training_memory
    from .shapes import shape_from_config

    shape = shape_from_config(config.to_dict(), source="the loaded model")
    budget, card = training_memory(recipe.train.gpu_memory)
    return plan(recipe, shape, budget, card, "cuda" if torch.cuda.is_available() else "cpu")
