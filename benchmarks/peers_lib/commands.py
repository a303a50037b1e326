"""Each trainer's own command line and configuration for the shared workload and settings.

lora-llava runs through its CLI (`python -m lora_llava train recipe.yaml`) in
the main Python; LLaMA-Factory through `llamafactory-cli train config.yaml` and
ms-swift through `swift sft ...`, each from its own virtual environment. The
settings are spelled in each trainer's own terms; where a trainer's default
differs from the shared settings (reentrant checkpointing in LLaMA-Factory,
weight decay 0.1, AdamW beta2 0.95, fp16 mixed precision and dataset shuffling in
ms-swift), it is set explicitly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .workload import LLM_LINEAR, VICUNA_SYSTEM, Settings, Workload

TRAINERS = ("lora-llava", "llamafactory", "swift")


@dataclass(frozen=True)
class Command:
    argv: list[str]
    cwd: Path
    env: dict[str, str]


def _yaml(data: dict) -> str:
    """YAML that every trainer's loader reads: JSON values are valid YAML scalars, one key per line."""
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {json.dumps(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def lora_llava(s: Settings, w: Workload, out: Path, root: Path, overrides: tuple[str, ...] = ()) -> Command:
    """`overrides`: key.path=value items for the recipe, as the CLI takes them (e.g. lora.shared_dropout=false)."""
    recipe = {
        "stage": "instruct",
        "model": {"name_or_path": str(w.model), "dtype": "float32"},
        "lora": {"r": s.lora_r, "alpha": s.lora_alpha, "dropout": s.lora_dropout, "target_modules": list(LLM_LINEAR)},
        # null: the projector learns at train.learning_rate, as the peers' single rate (LLaVA-1.5 itself uses 2e-5).
        "projector": {"learning_rate": None, "trainable": True},
        "data": {
            "train": [{"path": str(w.llava_json), "image_folder": str(w.images)}],
            "template": "vicuna_v1",
            "max_length": s.max_length,
            "group_by_modality_length": False,  # the peers sample uniformly
            "num_workers": 0,
            "validate": "index",
        },
        "train": {
            "output_dir": str(out / "run"), "max_steps": s.steps, "batch_size": s.batch_size, "grad_accum": 1,
            "learning_rate": s.learning_rate, "lr_scheduler": "cosine", "warmup_ratio": 0.0,
            "weight_decay": s.weight_decay, "max_grad_norm": s.max_grad_norm, "optimizer": "adamw",
            "gradient_checkpointing": True, "logging_steps": s.logging_steps, "save_steps": 100000, "seed": s.seed,
        },
    }  # fmt: skip
    path = out / "recipe.yaml"
    path.write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in recipe.items()) + "\n", encoding="utf-8")
    argv = [sys.executable, "-m", "lora_llava", "train", str(path), *overrides, "--overwrite"]
    return Command(argv, root, {"PYTHONPATH": str(root)})


def llamafactory(s: Settings, w: Workload, out: Path, venv: Path) -> Command:
    config = {
        "model_name_or_path": str(w.model), "stage": "sft", "do_train": True, "finetuning_type": "lora",
        "lora_rank": s.lora_r, "lora_alpha": s.lora_alpha, "lora_dropout": s.lora_dropout,
        "lora_target": ",".join(LLM_LINEAR),
        # The projector is kept out of the LoRA targets and trained fully as a PEFT module to save.
        "additional_target": "multi_modal_projector", "freeze_vision_tower": True, "freeze_multi_modal_projector": True,
        "dataset": "shapes", "dataset_dir": str(w.llamafactory_dir), "template": "llava", "cutoff_len": s.max_length,
        "overwrite_cache": True, "packing": False, "output_dir": str(out / "run"), "overwrite_output_dir": True,
        "logging_steps": s.logging_steps, "save_strategy": "no", "plot_loss": False, "report_to": "none",
        "per_device_train_batch_size": s.batch_size, "gradient_accumulation_steps": 1, "learning_rate": s.learning_rate,
        "max_steps": s.steps, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "weight_decay": s.weight_decay,
        "max_grad_norm": s.max_grad_norm, "optim": "adamw_torch", "bf16": False, "fp16": False, "seed": s.seed,
        "data_seed": s.seed, "disable_gradient_checkpointing": False,
        "use_reentrant_gc": False,  # LLaMA-Factory's default is reentrant; the others checkpoint non-reentrantly
        "dataloader_num_workers": 0, "use_cpu": True,
    }  # fmt: skip
    path = out / "llamafactory.yaml"
    path.write_text(_yaml(config), encoding="utf-8")
    return Command([str(venv / "bin" / "llamafactory-cli"), "train", str(path)], out, {})


def swift(s: Settings, w: Workload, out: Path, venv: Path) -> Command:
    args = {
        "model": str(w.model), "model_type": "llava1_5_hf", "template": "llava1_5_hf", "torch_dtype": "float32",
        "attn_impl": "sdpa", "dataset": str(w.swift_jsonl), "split_dataset_ratio": 0, "dataset_shuffle": False,
        "dataset_num_proc": 1, "max_length": s.max_length, "padding_free": False, "packing": False,
        "tuner_type": "lora", "lora_rank": s.lora_r, "lora_alpha": s.lora_alpha, "lora_dropout": s.lora_dropout,
        # all-linear: every linear layer of the language model; the tower and the projector stay out of LoRA.
        "target_modules": "all-linear", "freeze_vit": True, "freeze_aligner": True,
        "modules_to_save": "multi_modal_projector",
        "per_device_train_batch_size": s.batch_size, "gradient_accumulation_steps": 1, "learning_rate": s.learning_rate,
        "max_steps": s.steps, "lr_scheduler_type": "cosine", "warmup_ratio": 0.0, "weight_decay": s.weight_decay,
        "max_grad_norm": s.max_grad_norm, "optim": "adamw_torch", "seed": s.seed, "data_seed": s.seed,
        # ms-swift's defaults differ here: fp16 mixed precision for an fp32 model, AdamW beta2 0.95, and a hub
        # query for a newer model version (retried for seconds without network).
        "fp16": False, "bf16": False, "adam_beta2": 0.999, "check_model": False,
        "gradient_checkpointing": True, "gradient_checkpointing_kwargs": json.dumps({"use_reentrant": False}),
        "logging_steps": s.logging_steps, "save_strategy": "no", "eval_strategy": "no", "report_to": "none",
        "dataloader_num_workers": 0, "output_dir": str(out / "run"), "add_version": False, "use_hf": True,
    }  # fmt: skip
    if s.swift_system:
        args["system"] = VICUNA_SYSTEM
    argv = [str(venv / "bin" / "swift"), "sft"]
    for key, value in args.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return Command(argv, out, {})


def build(name: str, s: Settings, w: Workload, out: Path, root: Path, venvs: Path, overrides: tuple[str, ...] = ()) -> Command:
    out.mkdir(parents=True, exist_ok=True)
    if name == "lora-llava":
        return lora_llava(s, w, out, root, overrides)
    if name == "llamafactory":
        return llamafactory(s, w, out, venvs / "llamafactory")
    if name == "swift":
        return swift(s, w, out, venvs / "swift")
    raise ValueError(f"unknown trainer {name!r}; one of {', '.join(TRAINERS)}")
