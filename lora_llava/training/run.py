"""The training recipe, top to bottom: check inputs, load, set what trains, train, save.

Everything a user can get wrong (recipe, model folder, data files, the
structure of every sample, the output folder) is checked before anything is
written, so a failed start leaves the output folder as it was.
"""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import torch
from transformers import set_seed

from .. import distributed
from ..data.batching import estimated_padding
from ..data.build import build_dataset, check_local_inputs
from ..data.dataset import collate
from ..evaluate.callback import eval_callbacks
from ..io import move_into
from ..memory.checkpointing import plan_for_training
from ..model.build import load_for_training
from ..model.load import resolve_dtype
from ..recipe.parse import dump_recipe
from ..recipe.paths import absolute_paths
from ..recipe.schema import Recipe
from ..runs import FINAL_STAGING, RunPaths, read_metrics
from .guards import NO_SPACE, Interrupted, StopOnNonFiniteWeights, StopOnSignal, all_finite, no_space, nonfinite_weights
from .lora import check_rank, enable_checkpointing, param_report, setup_align, setup_instruct
from .plots import plot_run
from .progress import show_bar, use_progress_lines
from .resume import prepare_output_dir
from .tracking import check_tracker, tracker_arguments
from .trainer import LlavaTrainer, MetricsCallback

log = logging.getLogger("lora_llava")


def training_arguments(recipe: Recipe, out: Path, has_eval: bool, text_only: bool = False):
    """transformers' TrainingArguments for the recipe; `text_only`: the data holds samples without images."""
    from transformers import TrainingArguments

    t = recipe.train
    dtype = resolve_dtype(recipe.model.dtype)
    return TrainingArguments(
        output_dir=str(out),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm if t.max_grad_norm > 0 else None,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if (has_eval and t.eval_steps) else "no",
        eval_steps=t.eval_steps,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        seed=t.seed,
        data_seed=t.seed,
        remove_unused_columns=False,  # the collator's pixel_values are not in the dataset's columns
        dataloader_num_workers=recipe.data.num_workers,
        **tracker_arguments(recipe, out),
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not show_bar(),  # off: one line per log instead (use_progress_lines)
        # A batch of text-only samples never reaches the projector: under DDP its trained weights then get no
        # gradient, which DDP must be told to expect (LLaVA-1.5's mixture has 40K text-only ShareGPT samples).
        ddp_find_unused_parameters=text_only,
        log_level_replica="error",  # logs come from rank 0; other ranks speak only to report errors
    )


def print_start(report, recipe: Recipe, train_ds, world_size: int) -> None:
    """What the run will do, once: the trainable parameters, the global batch, the expected padding."""
    t = recipe.train
    print(report, flush=True)
    print(
        f"{len(train_ds)} training samples; global batch {t.batch_size} x {t.grad_accum} "
        f"x {world_size} process(es) = {t.global_batch(world_size)}",
        flush=True,
    )
    padding = estimated_padding(train_ds, t.batch_size, t.global_batch(world_size), recipe.group_by_modality_length, t.seed)
    print(f"padding: about {padding:.1%} of the tokens of an epoch (estimated; `lora-llava check` measures it)", flush=True)


def train(recipe: Recipe, overwrite: bool = False, resume: str | bool | None = None) -> Path:
    """Train `recipe`; returns the run folder (adapter or projector, recipe, metrics, loss curve)."""
    recipe = absolute_paths(recipe)  # the run folder's recipe must work from any working directory
    out = Path(recipe.train.output_dir)
    distributed.use_deepspeed_config()  # the shipped configs' JSON from any folder, before accelerate reads it
    distributed.check_engine(recipe)
    check_tracker(recipe)
    distributed.init()
    checkpoint = prepare_output_dir(out, recipe, overwrite=overwrite, resume=resume, create=False)
    check_local_inputs(recipe)  # every local input before the first download
    model, processor = load_for_training(recipe)
    check_rank(model, recipe)
    train_ds = build_dataset(recipe, processor)
    eval_ds = build_dataset(recipe, processor, recipe.data.eval) if recipe.data.eval else None

    # Seed before the adapters exist: LoRA's A matrices are drawn here, and resumed or
    # repeated runs must draw the same ones.
    set_seed(recipe.train.seed)
    checkpointing = plan_for_training(recipe, model.config)
    if checkpointing.layers:
        enable_checkpointing(model, checkpointing.layers)
    model = setup_align(model, recipe) if recipe.stage == "align" else setup_instruct(model, recipe)
    report = param_report(model)

    paths = RunPaths(out)
    # Every rank has checked the folder above; only rank 0 changes it, while the others wait.
    distributed.barrier()
    if distributed.is_main():
        prepare_output_dir(out, recipe, overwrite=overwrite, resume=resume, create=True)
    distributed.barrier()
    args = training_arguments(recipe, out, eval_ds is not None, text_only=min(train_ds.modality_lengths()) < 0)
    if args.process_index == 0:
        print_start(report, recipe, train_ds, args.world_size)
        print(checkpointing.describe(), flush=True)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=lambda b: collate(b, processor.tokenizer.pad_token_id),
        callbacks=[MetricsCallback(paths.metrics), StopOnNonFiniteWeights(), stop := StopOnSignal()]
        + eval_callbacks(recipe, processor, paths.metrics),
        recipe=recipe,
        lengths=train_ds.modality_lengths() if recipe.group_by_modality_length else None,
    )
    use_progress_lines(trainer)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.stopped is not None:
        raise _interrupted(stop.stopped, trainer.state.global_step, out)
    distributed.dump_rank_state(trainer.model)
    if eval_ds is not None:
        trainer.evaluate()
    _report_skipped(trainer, args.device)

    state_dict = distributed.gathered_state_dict(trainer)  # ZeRO-3 / FSDP: every rank helps gather the weights
    if args.process_index == 0:
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_outputs(model, processor, recipe, paths, state_dict, step=trainer.state.global_step)
    distributed.barrier()  # when train() returns, on any rank, the run folder is complete
    return out


def _interrupted(signum: int, step: int, out: Path) -> Interrupted:
    name = signal.Signals(signum).name
    return Interrupted(
        f"stopped by {name} at step {step}; checkpoint saved in {out / f'checkpoint-{step}'}; "
        "run the same command again to resume",
        signum,
    )


def _report_skipped(trainer, device) -> None:
    skipped = distributed.sum_over_ranks(trainer.skipped_samples, device)
    if skipped:
        log.warning("%d sample(s) were skipped during training (see warnings above)", skipped)
    if getattr(trainer, "step_guard", None) and trainer.step_guard.skipped:
        log.warning("%d step(s) with non-finite gradients were skipped (train.on_nonfinite: skip)", trainer.step_guard.skipped)


def save_outputs(model, processor, recipe: Recipe, paths: RunPaths, state_dict: dict | None = None, step: int = 0) -> None:
    """The adapter (PEFT format, projector inside) or the stage-1 projector, and the run's records.

    `state_dict`: the weights gathered from ranks that each hold a shard (ZeRO-3 / FSDP, stage instruct).
    """
    trained = state_dict.values() if state_dict is not None else (p for p in model.parameters() if p.requires_grad)
    if not all_finite(trained):
        raise nonfinite_weights(step, paths.root)
    # Written into a staging folder and moved into place, so that a kill while saving never
    # leaves a half-written adapter that looks like a finished run.
    staging = paths.root / FINAL_STAGING
    try:
        _stage_outputs(model, processor, recipe, paths, staging, state_dict)
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise no_space("the final adapter" if recipe.stage == "instruct" else "the projector", paths.root, paths.root) from None
    move_into(staging, paths.root, last="config.json")
    dump_recipe(recipe, paths.recipe)
    plot_run(read_metrics(paths.metrics), paths.loss_plot, title=f"{recipe.stage}: {recipe.model.name_or_path or 'composed'}")


def _stage_outputs(model, processor, recipe: Recipe, paths: RunPaths, staging: Path, state_dict: dict | None) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if recipe.stage == "align":
        from ..model.projector import save_projector

        save_projector(model, staging / paths.projector.name)
        model.save_pretrained(staging / paths.model_dir.name)
        processor.save_pretrained(staging / paths.model_dir.name)
    else:
        model.save_pretrained(staging, state_dict=state_dict)
    processor.save_pretrained(staging)
