"""transformers' Trainer, told about LLaVA-1.5's two learning rates and its batching.

What differs from a plain Trainer: the optimizer has one parameter group per
learning rate (LoRA, projector), optionally bitsandbytes' 8-bit / paged AdamW;
the sampler groups batches by modality and length; samples skipped by the
dataset are counted; metrics go to a JSON-lines file in the run folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .data.dataset import ModalityLengthSampler
from .errors import TrainingError
from .lora import param_groups
from .recipe import Recipe


def build_optimizer(groups: list[dict], name: str) -> torch.optim.Optimizer:
    """AdamW (torch, fused on CUDA) or bitsandbytes' 8-bit / paged variants."""
    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    betas = (0.9, 0.999)
    if name == "adamw":
        fused = all(p.is_cuda for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, betas=betas, fused=fused or None)
    import bitsandbytes as bnb

    cls = {
        "adamw_8bit": bnb.optim.AdamW8bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw": bnb.optim.PagedAdamW32bit,
    }[name]
    return cls(groups, betas=betas)


class LlavaTrainer(Trainer):
    def __init__(self, *args, recipe: Recipe, lengths: list[int] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.lengths = lengths
        self.skipped_samples = 0

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = build_optimizer(param_groups(self.model, self.recipe), self.recipe.train.optimizer)
        return self.optimizer

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        a = self.args
        megabatch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        return ModalityLengthSampler(self.lengths, megabatch, seed=a.data_seed if a.data_seed is not None else a.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", None)
        if skipped:
            self.skipped_samples += len(skipped)
        loss_and_out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = loss_and_out[0] if return_outputs else loss_and_out
        if not torch.isfinite(loss.detach()).all():
            raise TrainingError(
                f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}; the last good checkpoint is kept in "
                f"{self.args.output_dir} (lower train.learning_rate, or check the data)"
            )
        return loss_and_out


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, learning rates, grad norm) as a JSON line; main process only."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, **logs}
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
