"""A measuring probe for any trainer built on transformers.Trainer, loaded by Python itself at start-up.

Put this folder first on PYTHONPATH and name a result file in PEERS_PROBE_OUT:
Python imports `sitecustomize` before the program starts, in the trainer's
process and in any process it spawns, so lora-llava, LLaMA-Factory and ms-swift
are measured by the same code without touching theirs. Without PEERS_PROBE_OUT
the probe does nothing.

When `transformers.trainer` is first imported, `Trainer.__init__` is wrapped;
each trainer built afterwards gets
* its `training_step` wrapped: the tokens of the batch actually fed to the
  model (sum of its attention mask: no padding), its supervised tokens, its
  padded shape and the loss it returned;
* a callback that takes the process CPU time (time.process_time) and the wall
  time at the end of every optimizer step. A step's time is the difference to
  the previous step's end, so it holds everything the loop does once per step:
  fetching and collating the batch, forward, backward, clipping, the optimizer,
  callbacks, and the logging of the step before;
* at train begin: the trainable parameters, the LoRA layout and the settings
  that must be equal between trainers; at train end, the JSON result file.

Environment:
  PEERS_PROBE_OUT             result JSON file (required to switch the probe on)
  PEERS_PROBE_LABEL           a name stored in the result
  PEERS_PROBE_THREADS         torch.set_num_threads(N) when a trainer is built
  PEERS_PROBE_PROFILE         path prefix: profile some steps with torch.profiler (see peers_probe_profile)
  PEERS_PROBE_PROFILE_STEPS   "FIRST-LAST", 1-based optimizer steps to profile (default 4-8)
  PEERS_PROBE_PROFILE_KIND    cpu (thread CPU time per op and region, the default) or torch (torch.profiler)
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import resource
import sys
import time
from typing import Any

_ENV_OUT = "PEERS_PROBE_OUT"
IGNORE_INDEX = -100
# Trainer arguments as each trainer resolved them (the benchmark compares the effective settings below them).
_ARGS = (
    "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "optim", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay",
    "max_grad_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "bf16", "fp16", "seed", "max_steps", "logging_steps",
    "save_strategy", "eval_strategy", "dataloader_num_workers", "torch_compile",
)  # fmt: skip


class _Recorder:
    """What one trainer did, step by step; written as JSON when its training ends."""

    def __init__(self, trainer: Any):
        self.trainer_class = [c.__module__ + "." + c.__qualname__ for c in type(trainer).__mro__[:4]]
        self.steps: list[dict] = []
        self.pending = self._empty()
        self.settings: dict = {}
        self.last_cpu = self.last_wall = 0.0
        self.first_batch: dict | None = None

    @staticmethod
    def _empty() -> dict:
        return {"tokens": 0, "label_tokens": 0, "padded_tokens": 0, "samples": 0, "loss": 0.0, "micro_batches": 0}

    def micro_batch(self, inputs: dict) -> None:
        """Counted before the step runs: some trainers pop keys from the batch they are given."""
        ids = inputs.get("input_ids")
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        p = self.pending
        p["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
        p["label_tokens"] += int((labels != IGNORE_INDEX).sum()) if labels is not None else 0
        p["padded_tokens"] += int(ids.numel()) if ids is not None else 0
        p["samples"] += int(ids.shape[0]) if ids is not None else 0
        p["micro_batches"] += 1
        if self.first_batch is None and ids is not None:
            # The first sample as the trainer encoded it, to compare templates between trainers.
            self.first_batch = {
                "input_ids": ids[0].tolist(),
                "labels": labels[0].tolist() if labels is not None else None,
                "keys": sorted(inputs),
            }

    def loss(self, loss: Any) -> None:
        self.pending["loss"] += float(loss.detach().float()) if hasattr(loss, "detach") else float(loss)

    def begin(self) -> None:
        self.last_cpu, self.last_wall = time.process_time(), time.perf_counter()

    def step_end(self, step: int) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.steps.append({"step": step, "cpu_s": cpu - self.last_cpu, "wall_s": wall - self.last_wall, **self.pending})
        self.pending = self._empty()
        self.last_cpu, self.last_wall = cpu, wall

    def write(self, path: str) -> None:
        import torch

        result = {
            "label": os.environ.get("PEERS_PROBE_LABEL", ""),
            "trainer_class": self.trainer_class,
            "argv": sys.argv,
            "versions": _versions(),
            "threads": torch.get_num_threads(),
            "settings": self.settings,
            "first_sample": self.first_batch,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
            "steps": self.steps,
        }
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "llamafactory", "ms-swift", "lora-llava"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def _model_settings(model: Any) -> dict:
    """Trainable parameters and the LoRA layout: what the benchmark asserts to be equal between trainers."""
    import torch

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n, _ in model.named_modules() if n.endswith(".lora_A")]
    dropout = sorted(
        {type(m).__name__ + f"(p={getattr(m, 'p', None)})" for n, m in model.named_modules() if ".lora_dropout." in n}
    )
    peft = getattr(model, "peft_config", {}).get("default")
    # Layers that run under checkpointing (transformers' GradientCheckpointingLayer), by class.
    checkpointed: dict[str, int] = {}
    func = None
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func"):
            checkpointed[type(m).__name__] = checkpointed.get(type(m).__name__, 0) + 1
            func = func or m._gradient_checkpointing_func
    func = getattr(func, "__wrapped__", func)  # LLaMA-Factory wraps torch's checkpoint in its own function
    return {
        "trainable_params": sum(p.numel() for p in trainable.values()),
        "trainable_lora_params": sum(p.numel() for n, p in trainable.items() if "lora_" in n),
        "trainable_projector_params": sum(p.numel() for n, p in trainable.items() if "multi_modal_projector" in n),
        "trainable_dtypes": sorted({str(p.dtype) for p in trainable.values()}),
        "lora_modules": len(lora),
        "lora_modules_in_vision_tower": sum("vision_tower" in n for n in lora),
        "lora_modules_in_projector": sum("multi_modal_projector" in n for n in lora),
        "lora_dropout_modules": dropout,
        "peft": {k: getattr(peft, k, None) for k in ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora")}
        if peft
        else None,
        "checkpointed_layers": checkpointed,
        "checkpoint_func": repr(func)[:200],
        "model_dtype": str(next(model.parameters()).dtype),
        "grad_enabled_default": torch.is_grad_enabled(),
    }


def _optimizer_settings(optimizer: Any) -> dict | None:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    if inner is None:
        return None
    groups = [
        {
            "lr": g.get("initial_lr", g.get("lr")),
            "weight_decay": g.get("weight_decay"),
            "betas": list(g.get("betas", ())),
            "eps": g.get("eps"),
            "foreach": g.get("foreach"),
            "fused": g.get("fused"),
            "params": sum(p.numel() for p in g["params"]),
        }
        for g in inner.param_groups
    ]
    return {"class": type(inner).__name__, "groups": groups}


def _callback_class():
    from transformers import TrainerCallback

    class ProbeCallback(TrainerCallback):
        """Times optimizer steps and records the settings; also drives the optional profiler."""

        def __init__(self, trainer: Any, recorder: _Recorder, profiler: Any):
            self.trainer, self.recorder, self.profiler = trainer, recorder, profiler

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            self.recorder.settings = {
                "args": {k: getattr(args, k, None) for k in _ARGS},
                "model": _model_settings(model) if model is not None else {},
                "optimizer": _optimizer_settings(optimizer),
                "mixed_precision": str(getattr(self.trainer.accelerator, "mixed_precision", None)),
            }
            if self.profiler is not None:
                self.profiler.attach(self.trainer, model, optimizer)
                self.profiler.maybe_start(0)
            self.recorder.begin()

        def on_step_end(self, args, state, control, **kwargs):
            self.recorder.step_end(state.global_step)
            if self.profiler is not None:
                self.profiler.at_step_end(state.global_step, self.recorder.steps)

        def on_train_end(self, args, state, control, **kwargs):
            if self.recorder.settings.get("optimizer") is None:
                self.recorder.settings["optimizer"] = _optimizer_settings(kwargs.get("optimizer"))
            self.recorder.write(os.environ[_ENV_OUT])

    return ProbeCallback


def _instrument(trainer: Any) -> None:
    """Wrap one trainer's `training_step` and add the probe's callback."""
    if getattr(trainer, "_peers_probe", None) is not None:
        return
    threads = os.environ.get("PEERS_PROBE_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    recorder = _Recorder(trainer)
    profiler = None
    if os.environ.get("PEERS_PROBE_PROFILE"):
        from peers_probe_profile import StepProfiler

        env = os.environ
        profiler = StepProfiler(
            env["PEERS_PROBE_PROFILE"], env.get("PEERS_PROBE_PROFILE_STEPS", "4-8"), env.get("PEERS_PROBE_PROFILE_KIND", "cpu")
        )
    step = trainer.training_step  # the most derived class's: some trainers override it

    @functools.wraps(step)
    def training_step(model, inputs, *args, **kwargs):
        recorder.micro_batch(inputs)
        loss = step(model, inputs, *args, **kwargs)
        recorder.loss(loss)
        return loss

    trainer.training_step = training_step
    trainer._peers_probe = recorder
    trainer.add_callback(_callback_class()(trainer, recorder, profiler))


def patch_trainer(trainer_cls: type) -> None:
    """Make every Trainer (and subclass) built from now on report to the probe."""
    original = trainer_cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _instrument(self)

    trainer_cls.__init__ = __init__


class _TrainerImportHook(importlib.abc.MetaPathFinder):
    """Finds `transformers.trainer` as the path finder does, and patches it as soon as it has run."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            patch_trainer(module.Trainer)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(_ENV_OUT) and not any(isinstance(f, _TrainerImportHook) for f in sys.meta_path):
    sys.meta_path.insert(0, _TrainerImportHook())
