"""The training recipe, top to bottom: check inputs, load, set what trains, train, save.

Everything a user can get wrong (recipe, model folder, data files, the
structure of every sample, the output folder) is checked before anything is
written, so a failed start leaves the output folder as it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import torch
from transformers import set_seed

from . import distributed
from .data.batching import estimated_padding
from .data.dataset import LlavaDataset, collate
from .data.validate import validate
from .errors import DataError
from .evaluate import eval_callbacks
from .guards import Interrupted, StopOnSignal
from .lora import enable_checkpointing, param_report, setup_align, setup_instruct
from .model import resolve_dtype
from .plots import plot_run
from .recipe import Recipe, dump_recipe
from .runs import RunPaths, prepare_output_dir
from .trainer import LlavaTrainer, MetricsCallback, read_metrics

log = logging.getLogger("lora_llava")


def build_dataset(recipe: Recipe, processor, specs=None) -> LlavaDataset:
    """The recipe's training mixture (or `specs`), its index validated; bad samples per `data.on_bad_sample`."""
    d = recipe.data
    ds = LlavaDataset.for_recipe(recipe, processor, specs)
    if d.validate == "full":
        validate(ds, d.num_workers)  # unreadable images and samples that cannot fit, found before any step
    report = ds.scan()  # bad samples are already left out of ds; decide whether that is acceptable
    if report.bad:
        share = len(report.bad) / max(report.total, 1)
        path, first = report.bad[0]
        if d.on_bad_sample == "error":
            how = "data.on_bad_sample: skip with data.max_bad_fraction skips them"
        elif share > d.max_bad_fraction:
            how = f"more than data.max_bad_fraction {d.max_bad_fraction:g}"
        else:
            how = None
        if how:
            raise DataError(
                f"{path}: {first} ({len(report.bad)} bad sample(s) of {report.total}; `lora-llava check` lists them; {how})"
            )
        log.warning("skipping %d bad sample(s) of %d (first: %s)", len(report.bad), report.total, first)
    if len(ds) == 0:
        first_path = (specs if specs is not None else d.train)[0].path if (specs or d.train) else "data.train"
        raise DataError(f"{first_path}: no usable samples")
    return ds


def load_for_training(recipe: Recipe):
    """Model and processor as the recipe describes them, before anything trains."""
    from .compose import load_or_compose

    # The seed makes a composed model's fresh projector reproducible: loading the recipe again rebuilds it.
    model, processor = load_or_compose(recipe.model, seed=recipe.train.seed)
    if recipe.model.projector:
        from .compose import load_projector

        load_projector(model, recipe.model.projector)
    return model, processor


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
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=os.environ.get("LORA_LLAVA_PROGRESS", "1") == "0",
        # A batch of text-only samples never reaches the projector: under DDP its trained weights then get no
        # gradient, which DDP must be told to expect (LLaVA-1.5's mixture has 40K text-only ShareGPT samples).
        ddp_find_unused_parameters=text_only,
        log_level_replica="error",  # logs come from rank 0; other ranks speak only to report errors
    )


def train(recipe: Recipe, overwrite: bool = False, resume: str | bool | None = None) -> Path:
    """Train `recipe`; returns the run folder (adapter or projector, recipe, metrics, loss curve)."""
    out = Path(recipe.train.output_dir)
    distributed.check_engine(recipe)
    distributed.init()
    checkpoint = prepare_output_dir(out, recipe, overwrite=overwrite, resume=resume, create=False)
    model, processor = load_for_training(recipe)
    train_ds = build_dataset(recipe, processor)
    eval_ds = build_dataset(recipe, processor, recipe.data.eval) if recipe.data.eval else None

    # Seed before the adapters exist: LoRA's A matrices are drawn here, and resumed or
    # repeated runs must draw the same ones.
    set_seed(recipe.train.seed)
    if recipe.train.gradient_checkpointing:
        enable_checkpointing(model)
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
        print(report, flush=True)
        print(
            f"{len(train_ds)} training samples; global batch {recipe.train.batch_size} x {recipe.train.grad_accum} "
            f"x {args.world_size} process(es) = {recipe.train.batch_size * recipe.train.grad_accum * args.world_size}",
            flush=True,
        )
        t = recipe.train
        megabatch = t.batch_size * t.grad_accum * args.world_size
        padding = estimated_padding(train_ds, t.batch_size, megabatch, recipe.group_by_modality_length, t.seed)
        print(f"padding: about {padding:.1%} of the tokens of an epoch (estimated; `lora-llava check` measures it)", flush=True)
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=lambda b: collate(b, processor.tokenizer.pad_token_id),
        callbacks=[MetricsCallback(paths.metrics), stop := StopOnSignal(), *eval_callbacks(recipe, processor, paths.metrics)],
        recipe=recipe,
        lengths=train_ds.modality_lengths() if recipe.group_by_modality_length else None,
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if stop.stopped is not None:
        name = signal.Signals(stop.stopped).name
        raise Interrupted(
            f"stopped by {name} at step {trainer.state.global_step}; checkpoint saved in "
            f"{out / f'checkpoint-{trainer.state.global_step}'}; run the same command again to resume",
            stop.stopped,
        )
    distributed.dump_rank_state(trainer.model)
    if eval_ds is not None:
        trainer.evaluate()
    skipped = distributed.sum_over_ranks(trainer.skipped_samples, args.device)
    if skipped:
        log.warning("%d sample(s) were skipped during training (see warnings above)", skipped)
    if getattr(trainer, "step_guard", None) and trainer.step_guard.skipped:
        log.warning("%d step(s) with non-finite gradients were skipped (train.on_nonfinite: skip)", trainer.step_guard.skipped)

    state_dict = distributed.gathered_state_dict(trainer)  # ZeRO-3 / FSDP: every rank helps gather the weights
    if args.process_index == 0:
        save_outputs(trainer.accelerator.unwrap_model(trainer.model), processor, recipe, paths, state_dict)
    distributed.barrier()  # when train() returns, on any rank, the run folder is complete
    return out


def save_outputs(model, processor, recipe: Recipe, paths: RunPaths, state_dict: dict | None = None) -> None:
    """The adapter (PEFT format, projector inside) or the stage-1 projector, and the run's records.

    `state_dict`: the weights gathered from ranks that each hold a shard (ZeRO-3 / FSDP, stage instruct).
    """
    # Written into a staging folder and moved into place, so that a kill while saving never
    # leaves a half-written adapter that looks like a finished run.
    staging = paths.root / ".staging-final"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    if recipe.stage == "align":
        from .compose import save_projector

        save_projector(model, staging / paths.projector.name)
        model.save_pretrained(staging / paths.model_dir.name)
        processor.save_pretrained(staging / paths.model_dir.name)
    else:
        model.save_pretrained(staging, state_dict=state_dict)
    processor.save_pretrained(staging)
    # Weights first, configs last: a folder with adapter_config.json has its weights.
    for item in sorted(staging.iterdir(), key=lambda p: p.name.endswith("config.json")):
        target = paths.root / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    dump_recipe(recipe, paths.recipe)
    plot_run(read_metrics(paths.metrics), paths.loss_plot, title=f"{recipe.stage}: {recipe.model.name_or_path or 'composed'}")
