"""Experiment trackers (`train.report_to`): checked before anything is written, then left to transformers' integrations.

The run folder's metrics.jsonl and loss.png are written whatever the tracker; a tracker
only adds a second copy of the same logs where a team already looks (TensorBoard event
files under `<output_dir>/runs/`, a W&B or MLflow run named after the run folder).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..errors import RecipeError
from ..recipe.schema import Recipe


def _installed() -> dict[str, Callable[[], bool]]:
    # transformers' own tests, so that "installed" means what its callbacks will accept
    # (tensorboardX counts for TensorBoard; DISABLE_MLFLOW_INTEGRATION turns MLflow off).
    from transformers.integrations import is_mlflow_available, is_tensorboard_available, is_wandb_available

    return {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}


def check_tracker(recipe: Recipe) -> None:
    """A tracker that is not installed is one line naming the key and the pip extra, not a traceback mid-setup."""
    name = recipe.train.report_to
    if name == "none" or _installed()[name]():
        return
    raise RecipeError(
        "train.report_to", [f'{name} is not installed: pip install "lora-llava[{name}]" (or set train.report_to: none)']
    )


def tracker_arguments(recipe: Recipe, out: Path) -> dict:
    """The TrainingArguments that choose the tracker and name the run (default: the run folder's name)."""
    return {"report_to": recipe.train.report_to, "run_name": recipe.train.run_name or Path(out).name}
