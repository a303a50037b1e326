"""Eval during training: every `train.eval_steps`, generate on the eval set, score it, log it to metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from ..recipe.schema import Recipe
from ..runs import append_metrics
from .generate import Predictor
from .metrics import score
from .questions import answer_questions, read_questions
from .sampling import Sampling


class GenerationEval(TrainerCallback):
    """Generates on `data.eval` whenever the Trainer evaluates (every `train.eval_steps`, and at the end).

    The scores go to the run's metrics.jsonl as `{"step": N, "eval": {dataset: report}}`, beside
    the eval loss the Trainer logs. Only the main process generates.
    """

    def __init__(self, recipe: Recipe, processor, metrics_path: Path, sampling: Sampling = Sampling()):
        self.recipe = recipe
        self.processor = processor
        self.path = metrics_path
        self.sampling = sampling
        self.last_step: int | None = None
        allow = recipe.data.allow_absolute_paths
        self.questions = {spec.path: read_questions(spec, None, allow) for spec in recipe.data.eval}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        # The Trainer evaluates at the last step, and train() once more after it: score each step once.
        if not state.is_world_process_zero or model is None or state.global_step == self.last_step:
            return
        self.last_step = state.global_step
        was_training = model.training
        predictor = Predictor(
            model, self.processor, self.recipe.template, self.recipe.data.system_prompt, self.recipe.data.image_aspect
        )
        # Trained weights are fp32 beside a 16-bit base: run them as the training step does, under autocast.
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        try:
            with torch.autocast(model.device.type, dtype=dtype, enabled=dtype is not None):
                reports = {
                    path: score(qs, answer_questions(predictor, qs, self.sampling, args.per_device_eval_batch_size))[1]
                    for path, qs in self.questions.items()
                }
        finally:
            model.train(was_training)
        append_metrics(self.path, {"step": state.global_step, "eval": reports})


def eval_callbacks(recipe: Recipe, processor, metrics_path: Path) -> list:
    """[GenerationEval] when the recipe has eval data and `train.eval_steps`; else none."""
    if not (recipe.data.eval and recipe.train.eval_steps):
        return []
    return [GenerationEval(recipe, processor, metrics_path)]
