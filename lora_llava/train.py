"""The training recipe, top to bottom: check inputs, load, set what trains, train, save.

Everything a user can get wrong (recipe, model folder, data files, the
structure of every sample, the output folder) is checked before anything is
written, so a failed start leaves the output folder as it was.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from .data.dataset import LlavaDataset, collate
from .errors import DataError
from .lora import enable_checkpointing, param_report, setup_align, setup_instruct
from .model import load_model, load_processor, resolve_dtype
from .plots import plot_run
from .recipe import Recipe, dump_recipe
from .runs import prepare_output_dir, RunPaths
from .trainer import LlavaTrainer, MetricsCallback, read_metrics

log = logging.getLogger("lora_llava")


def build_dataset(recipe: Recipe, processor, specs=None) -> LlavaDataset:
    """The recipe's training mixture (or `specs`), its index validated; bad samples per `data.on_bad_sample`."""
    d = recipe.data
    ds = LlavaDataset(
        specs if specs is not None else d.train,
        processor,
        template=recipe.template,
        max_length=d.max_length,
        image_aspect=d.image_aspect,
        system_prompt=d.system_prompt,
        allow_absolute_paths=d.allow_absolute_paths,
        seed=recipe.train.seed,
    )
    report = ds.scan()
    if report.bad:
        share = len(report.bad) / max(report.total, 1)
        path, first = report.bad[0]
        if d.on_bad_sample == "error" or share > d.max_bad_fraction:
            raise DataError(
                f"{path}: {first} ({len(report.bad)} bad sample(s) of {report.total}; "
                f"`lora-llava check` lists them, data.on_bad_sample: skip skips them)"
            )
        log.warning("skipping %d bad sample(s) of %d (first: %s)", len(report.bad), report.total, first)
        ds.drop_bad()
    if len(ds) == 0:
        raise DataError(f"{d.train[0].path if d.train else 'data.train'}: no usable samples")
    return ds


def load_for_training(recipe: Recipe):
    """Model and processor as the recipe describes them, before anything trains."""
    from .compose import load_or_compose

    model, processor = load_or_compose(recipe.model)
    if recipe.model.projector:
        from .compose import load_projector

        load_projector(model, recipe.model.projector)
    return model, processor


def training_arguments(recipe: Recipe, out: Path, has_eval: bool):
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
        ddp_find_unused_parameters=False,
    )


def train(recipe: Recipe, overwrite: bool = False, resume: str | bool | None = None) -> Path:
    """Train `recipe`; returns the run folder (adapter or projector, recipe, metrics, loss curve)."""
    out = Path(recipe.train.output_dir)
    checkpoint = prepare_output_dir(out, recipe, overwrite=overwrite, resume=resume, create=False)
    model, processor = load_for_training(recipe)
    train_ds = build_dataset(recipe, processor)
    eval_ds = build_dataset(recipe, processor, recipe.data.eval) if recipe.data.eval else None

    if recipe.train.gradient_checkpointing:
        enable_checkpointing(model)
    model = setup_align(model, recipe) if recipe.stage == "align" else setup_instruct(model, recipe)
    report = param_report(model)

    paths = RunPaths(out)
    prepare_output_dir(out, recipe, overwrite=overwrite, resume=resume, create=True)
    args = training_arguments(recipe, out, eval_ds is not None)
    if args.process_index == 0:
        print(report, flush=True)
        print(
            f"{len(train_ds)} training samples; global batch {recipe.train.batch_size} x {recipe.train.grad_accum} "
            f"x {args.world_size} process(es) = {recipe.train.batch_size * recipe.train.grad_accum * args.world_size}",
            flush=True,
        )
    trainer = LlavaTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=lambda b: collate(b, processor.tokenizer.pad_token_id),
        callbacks=[MetricsCallback(paths.metrics)],
        recipe=recipe,
        lengths=train_ds.modality_lengths() if recipe.group_by_modality_length else None,
    )
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if eval_ds is not None:
        trainer.evaluate()
    if trainer.skipped_samples:
        log.warning("%d sample(s) were skipped during training (see warnings above)", trainer.skipped_samples)

    if args.process_index == 0:
        save_outputs(trainer.model, processor, recipe, paths)
    return out


def save_outputs(model, processor, recipe: Recipe, paths: RunPaths) -> None:
    """The adapter (PEFT format, projector inside) or the stage-1 projector, and the run's records."""
    if recipe.stage == "align":
        from .compose import save_projector

        save_projector(model, paths.projector)
        model.save_pretrained(paths.model_dir)
        processor.save_pretrained(paths.model_dir)
    else:
        model.save_pretrained(paths.root)
    processor.save_pretrained(paths.root)
    dump_recipe(recipe, paths.recipe)
    plot_run(read_metrics(paths.metrics), paths.loss_plot, title=f"{recipe.stage}: {recipe.model.name_or_path or 'composed'}")
