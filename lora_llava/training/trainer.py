"""transformers' Trainer, told about LLaVA-1.5's two learning rates and its batching.

What differs from a plain Trainer: the optimizer has one parameter group per
learning rate (LoRA, projector), optionally bitsandbytes' 8-bit / paged AdamW;
the sampler groups batches by modality and length; samples skipped by the
dataset are counted; metrics go to a JSON-lines file in the run folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from .. import distributed
from ..data.batching import ModalityLengthSampler
from ..io import replace_dir
from ..recipe.parse import dump_recipe
from ..recipe.schema import Recipe
from ..runs import STAGING, append_metrics, write_manifest
from .guards import NO_SPACE, StepGuard, no_space
from .lora import param_groups
from .loss import causal_lm_loss, lm_head_sharded
from .resume import refused_pickles_name_the_file


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
            # Under FSDP the Trainer passes the wrapped model, whose parameters are the ones to optimise.
            target = model if model is not None else self.model
            self.optimizer = build_optimizer(param_groups(target, self.recipe), self.recipe.train.optimizer)
            self.step_guard = StepGuard(self.optimizer, self.recipe.train.on_nonfinite, lambda: self.state.global_step + 1)
        return self.optimizer

    def _save_checkpoint(self, model, trial):
        """Write `checkpoint-<step>` into a staging folder, then rename it into place.

        A kill during the save leaves only the staging folder, which resumption
        ignores and removes; the previous checkpoint stays whole. So does a full
        disk: the partial save is removed and the run stops saying so.
        """
        run_dir = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        try:
            self._stage_checkpoint(model, trial, run_dir, name)
        except OSError as e:
            if e.errno not in NO_SPACE:
                raise
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
            raise no_space(name, run_dir, run_dir) from None

    def _stage_checkpoint(self, model, trial, run_dir: Path, name: str) -> None:
        self._staging_root = run_dir / STAGING
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        # Every rank writes its own RNG state (and, sharded, its shards) into the staging folder:
        # rank 0 may only move it once all of them are done.
        distributed.barrier()
        if self.args.should_save:
            staged = run_dir / STAGING / name
            (staged / "training_args.bin").unlink(missing_ok=True)  # a pickle; recipe.yaml says the same safely
            dump_recipe(self.recipe, staged / "recipe.yaml")
            write_manifest(staged)  # last: it lists what every rank wrote
            # The same step may be saved again (a signal right after a scheduled save): replace it whole.
            replace_dir(staged, run_dir / name)
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
            rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit, use_mtime=False)

    def _load_rng_state(self, checkpoint):
        with refused_pickles_name_the_file(checkpoint):
            super()._load_rng_state(checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with refused_pickles_name_the_file(checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _get_output_dir(self, trial):
        staging = getattr(self, "_staging_root", None)
        return str(staging) if staging is not None else super()._get_output_dir(trial)

    def _get_train_sampler(self, train_dataset=None):
        if self.lengths is None:
            return super()._get_train_sampler(train_dataset)
        a = self.args
        # The global batch as the Trainer counts it (= recipe.train.global_batch(world_size)).
        megabatch = a.per_device_train_batch_size * a.gradient_accumulation_steps * a.world_size
        return ModalityLengthSampler(self.lengths, megabatch, seed=a.data_seed if a.data_seed is not None else a.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        skipped = inputs.pop("skipped", None)
        if skipped:
            self.skipped_samples += len(skipped)
        # A non-finite loss makes non-finite gradients, which StepGuard refuses at the optimizer step.
        # FSDP / ZeRO-3 shard lm_head, which the chunked loss reads outside its forward: the model's loss there.
        if self.recipe.train.loss == "standard" or "labels" not in inputs or lm_head_sharded(self.accelerator):
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = causal_lm_loss(model, inputs, num_items_in_batch)
        # As Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, learning rates, grad norm) as a JSON line; main process only."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        append_metrics(self.path, {"step": state.global_step, "epoch": state.epoch, **logs})
