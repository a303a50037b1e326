"""Labelled regions of a training step, the same in every Trainer, timed in CPU time.

Used by peers_probe_profile while it profiles. Each region wraps one of the
Trainer's own entry points as an instance attribute (so a trainer that
overrides the method is still labelled and the class stays as it is):

  data          get_batch_samples: fetching and collating the batch
  forward       compute_loss: the forward pass and the loss
  backward      accelerator.backward
  layer_forward a checkpointed decoder layer's forward pass (inside forward)
  recompute     the same layer replayed inside the backward pass (activation checkpointing)
  clip          accelerator.clip_grad_norm_
  optimizer     the optimizer's step (with whatever the trainer wrapped around it)
  step_end      the callbacks' on_step_end
  log           _maybe_log_save_evaluate: logging (and the save / eval checks)
  lora_dropout  the forward of PEFT's LoRA dropout modules (inside forward or recompute)

A region's time is thread CPU time (time.thread_time), so a process that
waits for a core on a shared machine is not charged for the wait. Each region
is also a torch.profiler record_function ("probe::<name>").
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.profiler import record_function

# The labels open now, innermost last; read by the op timer to attribute each op.
STACK: list[str] = []
# Inclusive CPU seconds per region, while `ACTIVE[0]` is set.
TOTALS: dict[str, float] = defaultdict(float)
ACTIVE = [False]


def region(label: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not ACTIVE[0]:
            return fn(*args, **kwargs)
        STACK.append(label)
        start = time.thread_time()
        try:
            with record_function("probe::" + label):
                return fn(*args, **kwargs)
        finally:
            TOTALS[label] += time.thread_time() - start
            STACK.pop()

    return wrapper


def _label_checkpointed(layer: torch.nn.Module) -> None:
    """Label what a checkpointed layer runs: `recompute` when autograd replays it during backward.

    The label goes on the function handed to the layer's checkpoint function, which is what the backward
    pass calls again (transformers 5.6 and 5.19 hand it `__call__`, 5.24 `forward`).
    """
    checkpoint = layer._gradient_checkpointing_func
    forward_run = region("layer_forward", lambda f, *a, **k: f(*a, **k))
    recompute_run = region("recompute", lambda f, *a, **k: f(*a, **k))

    def labelled_checkpoint(function, *args, **kwargs):
        def run(*a, **k):
            in_backward = torch._C._current_graph_task_id() != -1
            return (recompute_run if in_backward else forward_run)(function, *a, **k)

        # LLaMA-Factory's checkpoint function finds the layer through `function.__self__`.
        run.__self__ = getattr(function, "__self__", None) or getattr(getattr(function, "func", None), "__self__", layer)
        return checkpoint(run, *args, **kwargs)

    layer._gradient_checkpointing_func = labelled_checkpoint


def attach(trainer: Any, model: Any, optimizer: Any) -> None:
    """Put the region labels on this trainer's entry points and on the model's layers."""
    for name, label in (("get_batch_samples", "data"), ("compute_loss", "forward"), ("_maybe_log_save_evaluate", "log")):
        if hasattr(trainer, name):
            setattr(trainer, name, region(label, getattr(trainer, name)))
    acc = trainer.accelerator
    acc.backward = region("backward", acc.backward)
    acc.clip_grad_norm_ = region("clip", acc.clip_grad_norm_)
    handler = trainer.callback_handler
    handler.on_step_end = region("step_end", handler.on_step_end)
    opt = optimizer if optimizer is not None else trainer.optimizer
    if opt is not None:
        opt.step = region("optimizer", opt.step)
    for name, module in model.named_modules():
        if type(module).__name__.endswith("DecoderLayer") and getattr(module, "gradient_checkpointing", False):
            _label_checkpointed(module)
        elif ".lora_dropout." in name:
            module.forward = region("lora_dropout", module.forward)
