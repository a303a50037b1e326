"""Recipes: YAML -> typed, frozen dataclasses, with strict keys and overrides.

Every default lives in exactly one place, the dataclass field below, and each
field's help text sits beside it (`metadata["help"]`). Parsing collects every
problem of a file (unknown keys with a did-you-mean, wrong types, bad values,
contradictory options) and raises them together as one `RecipeError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from .errors import RecipeError

# Names used by peft, transformers and LLaVA's scripts for keys this recipe spells differently.
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lr": "learning_rate",
    "mm_projector_lr": "learning_rate",
    "num_train_epochs": "epochs",
    "num_epochs": "epochs",
    "gradient_accumulation_steps": "grad_accum",
    "per_device_train_batch_size": "batch_size",
    "model_max_length": "max_length",
    "image_aspect_ratio": "image_aspect",
    "model_name_or_path": "name_or_path",
    "conv_version": "template",
}
LLM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _f(default: Any = dataclasses.MISSING, help: str = "", **checks: Any) -> Any:
    """A dataclass field with help text and simple value checks (min, gt, max)."""
    meta = {"help": help, **checks}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name_or_path: str | None = _f(None, "llava-hf checkpoint: hub id or local folder.")
    quantization: Literal["none", "nf4", "int8"] = _f(
        "none", "Load the language model in 4-bit NF4 (QLoRA) or 8-bit; vision tower, projector and lm_head stay 16-bit."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _f(
        "auto", "Dtype of the frozen 16-bit weights and of compute. auto: bfloat16 on a GPU that supports it, float32 on CPU."
    )
    attn_implementation: str = _f("sdpa", "Attention kernel passed to transformers (sdpa, eager, flash_attention_2).")
    trust_remote_code: bool = _f(False, "Run code shipped with a checkpoint. Off: a stranger's folder must not run code here.")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of name_or_path.")
    vision_tower: str | None = _f(None, "Compose a new LLaVA-1.5: CLIP vision checkpoint (with language_model).")
    language_model: str | None = _f(None, "Compose a new LLaVA-1.5: LLaMA-family LLM checkpoint (with vision_tower).")
    projector: str | None = _f(
        None,
        "Start from this projector: a stage-1 run folder, a projector.safetensors, a llava-hf folder, or LLaVA's mm_projector.bin.",
    )


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = _f(128, "LoRA rank (LLaVA-1.5: 128).", gt=0)
    alpha: float = _f(256, "LoRA alpha (LLaVA-1.5: 256).", gt=0)
    dropout: float = _f(0.05, "LoRA dropout (LLaVA-1.5: 0.05).", min=0, max=1)
    target_modules: tuple[str, ...] = _f(
        LLM_LINEAR_LAYERS, "Linear layers of the language model that get adapters. Never the vision tower, projector or lm_head."
    )


@dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    learning_rate: float | None = _f(
        2e-5,
        "Learning rate of the fully trained projector in stage 2 (LLaVA-1.5 mm_projector_lr: 2e-5); null: train.learning_rate.",
        gt=0,
    )
    trainable: bool = _f(True, "Train the projector fully in stage 2 (LLaVA-1.5 does).")


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    path: str = _f(help="LLaVA JSON / JSONL file, a Hugging Face dataset folder (save_to_disk), or parquet / jsonl.")
    image_folder: str | None = _f(None, "Folder that image paths are relative to.")
    format: Literal["auto", "llava", "hf"] = _f(
        "auto", "auto: from the path (.json/.jsonl: read as JSON, LLaVA or chat layout per record; folder/.parquet/.arrow: hf)."
    )
    weight: float | None = _f(
        None, "Sampling weight in a mixture: the dataset is repeated or subsampled to weight x its size.", gt=0
    )
    max_samples: int | None = _f(None, "Use at most this many samples of the dataset.", gt=0)
    response_suffix: str | None = _f(
        None, "Appended to each question, e.g. 'Answer the question using a single word or phrase.' for short-answer VQA."
    )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: tuple[DatasetSpec, ...] = _f(help="Training datasets (a mixture when several).")
    eval: tuple[DatasetSpec, ...] = _f((), "Evaluation datasets.")
    template: Literal["vicuna_v1", "plain", "chat_template", "auto"] = _f(
        "auto", "Prompt template. auto: plain for stage align, vicuna_v1 for stage instruct (LLaVA-1.5)."
    )
    system_prompt: str | None = _f(
        None, "System prompt for samples without one of their own (default: the template's; vicuna_v1, chat_template)."
    )
    max_length: int = _f(2048, "Maximum tokens per sample, image tokens included; image tokens are never cut.", gt=0)
    image_aspect: Literal["pad", "crop"] = _f(
        "pad", "pad: pad to a square with the CLIP mean colour, then resize (LLaVA-1.5). crop: centre crop."
    )
    group_by_modality_length: bool | None = _f(
        None, "Batches of image-only or text-only samples of similar length. null: on for instruct, off for align."
    )
    num_workers: int = _f(0, "DataLoader workers that decode images and tokenise.", min=0)
    validate: Literal["full", "index"] = _f(
        "full",
        "Before training: full decodes every image and tokenises every sample (as `lora-llava check`, in num_workers "
        "processes); index reads the index only (structure, image paths) and starts in seconds, and an unreadable or "
        "too-long sample met during training is then skipped and counted.",
    )
    on_bad_sample: Literal["error", "skip"] = _f(
        "error", "Bad samples found before training: stop with an error, or skip and count them."
    )
    max_bad_fraction: float = _f(
        0.0, "Share of bad samples `lora-llava check` and on_bad_sample: skip tolerate (per split).", min=0, max=1
    )
    allow_absolute_paths: bool = _f(
        False, "Allow image paths outside their image folder (absolute, ../, or symlinks that lead out)."
    )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str = _f(help="Run folder: adapter, checkpoints, resolved recipe, metrics, plots.")
    epochs: float = _f(1.0, "Passes over the training data.", gt=0)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).", gt=0)
    learning_rate: float = _f(
        2e-4, "Learning rate of the LoRA weights (LLaVA-1.5: 2e-4), or of the projector in stage align (1e-3).", gt=0
    )
    batch_size: int = _f(16, "Samples per device per forward pass.", gt=0)
    grad_accum: int = _f(1, "Gradient accumulation steps; global batch = batch_size x grad_accum x world size.", gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f(
        "cosine", "Learning-rate schedule (LLaVA-1.5: cosine)."
    )
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up (LLaVA-1.5: 0.03).", min=0, max=1)
    weight_decay: float = _f(0.0, "AdamW weight decay (LLaVA-1.5: 0).", min=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 turns clipping off.", min=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = _f(
        "adamw", "adamw (torch), or bitsandbytes' 8-bit / paged AdamW."
    )
    gradient_checkpointing: bool = _f(True, "Non-reentrant activation checkpointing of the language model.")
    loss: Literal["chunked", "standard"] = _f(
        "chunked",
        "chunked: cross-entropy over lm_head in chunks, never the full fp32 logits (same loss). standard: the model's own loss.",
    )
    logging_steps: int = _f(1, "Log the loss every N steps.", gt=0)
    save_steps: int = _f(500, "Save a checkpoint every N steps.", gt=0)
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints.", gt=0)
    eval_steps: int | None = _f(None, "Evaluate on data.eval every N steps (null: only at the end).", gt=0)
    seed: int = _f(42, "Seed of initialisation, data order and dropout.")
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop",
        "A step with a non-finite loss or gradients: stop (the last good checkpoint stays), or skip the step and count it.",
    )


@dataclass(frozen=True, kw_only=True)
class Recipe:
    stage: Literal["align", "instruct"] = _f("instruct", "align: projector only (stage 1). instruct: LoRA + projector (stage 2).")
    model: ModelConfig = _f(help="The model to adapt.")
    data: DataConfig = _f(help="Datasets, template, lengths.")
    train: TrainConfig = _f(help="Optimisation and outputs.")
    lora: LoraConfig = field(
        default_factory=LoraConfig, metadata={"help": "LoRA adapters on the language model (stage instruct)."}
    )
    projector: ProjectorConfig = field(default_factory=ProjectorConfig, metadata={"help": "The multi-modal projector."})

    @property
    def template(self) -> str:
        """The template actually used: `auto` resolves per stage as LLaVA-1.5 does."""
        if self.data.template != "auto":
            return self.data.template
        return "plain" if self.stage == "align" else "vicuna_v1"

    @property
    def group_by_modality_length(self) -> bool:
        if self.data.group_by_modality_length is not None:
            return self.data.group_by_modality_length
        return self.stage == "instruct"


# ----------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {type(None): "null", str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], path, problems)
        for a in inner:
            sub: list[str] = []
            out = _convert(value, a, path, sub)
            if not sub:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}{extra}")
        return value
    if origin is tuple:
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {value!r}")
            return ()
        return tuple(_convert(v, get_args(tp)[0], f"{path}.{i}", problems) for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML reads `2e-5` (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {value!r}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp}")  # a bug in this module, not in a recipe


def _check_value(value: Any, meta: dict, path: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if "gt" in meta and not value > meta["gt"]:
        problems.append(f"{path}: must be greater than {meta['gt']}, got {value!r}")
    if "min" in meta and value < meta["min"]:
        problems.append(f"{path}: must be at least {meta['min']}, got {value!r}")
    if "max" in meta and value > meta["max"]:
        problems.append(f"{path}: must be at most {meta['max']}, got {value!r}")


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(raw, dict):
        problems.append(f"{path or 'recipe'}: expected a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = (
                [SYNONYMS[key]]
                if SYNONYMS.get(key) in fields
                else difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            )
            extra = f" (did you mean {prefix}{hint[0]}?)" if hint else f" (allowed: {', '.join(fields)})"
            problems.append(f"{prefix}{key}: unknown key{extra}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            value = _convert(raw[name], hints[name], prefix + name, problems)
            _check_value(value, f.metadata, prefix + name, problems)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing keys: already reported


def _cross_checks(r: Recipe, problems: list[str]) -> None:
    """Combinations that each key allows alone but that cannot work together."""
    m = r.model
    if not m.name_or_path and not (m.vision_tower and m.language_model):
        problems.append("model.name_or_path: required (or both model.vision_tower and model.language_model)")
    if m.name_or_path and (m.vision_tower or m.language_model):
        problems.append("model.name_or_path: give either name_or_path or vision_tower + language_model, not both")
    if bool(m.vision_tower) != bool(m.language_model):
        problems.append("model.vision_tower / model.language_model: composing a model needs both")
    if m.revision and not m.name_or_path:
        problems.append("model.revision: applies to model.name_or_path only (pin a composed part's revision in its folder)")
    if r.stage == "align" and m.quantization != "none":
        problems.append("model.quantization: stage align trains only the projector on a frozen model; use quantization: none")
    if r.template == "plain" and r.stage == "instruct":
        problems.append("data.template: 'plain' is the stage-1 caption template; stage instruct needs vicuna_v1 or chat_template")
    if not r.data.train:
        problems.append("data.train: at least one dataset is required")
    if r.data.on_bad_sample == "skip" and r.data.max_bad_fraction == 0:
        problems.append(
            "data.on_bad_sample: skip needs data.max_bad_fraction > 0, the share of bad samples you accept (e.g. 0.01); "
            "with 0 any bad sample stops the run"
        )
    bad = [t for t in r.lora.target_modules if t not in LLM_LINEAR_LAYERS]
    if bad:
        problems.append(
            f"lora.target_modules: {bad} are not linear layers of the language model ({', '.join(LLM_LINEAR_LAYERS)})"
        )


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Build a `Recipe` from a parsed YAML mapping; every problem is raised at once."""
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    if recipe is not None and not problems:
        _cross_checks(recipe, problems)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def apply_overrides(raw: dict, overrides: list[str], source: str = "<command line>") -> dict:
    """Apply `key.path=value` overrides (value in YAML syntax; list items by index)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"{item}: an override is key.path=value")
            continue
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as e:
            problems.append(f"{key}: value {text!r} is not valid YAML ({e.problem})")
            continue
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"{where}: no list item {part!r} (the list has {len(node)})")
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                problems.append(f"{where}: cannot set a key inside {node!r}")
                break
    if problems:
        raise RecipeError(source, problems)
    return raw


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with the safe loader (no Python objects from a stranger's file)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(str(path), ["file not found"])
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}invalid YAML ({getattr(e, 'problem', e)})"]) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    raw = read_yaml(path)
    raw = apply_overrides(raw, list(overrides))
    return parse_recipe(raw, str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every default filled in) so a run can be reproduced."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")


def describe_fields(cls: type = Recipe, prefix: str = "") -> list[str]:
    """One line per recipe key with its default and help text (for `lora-llava recipe-help`)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        sub = get_args(tp)[0] if get_origin(tp) is tuple else tp
        if dataclasses.is_dataclass(sub):
            lines.append(f"{key}: {f.metadata.get('help', '')}")
            lines.extend(describe_fields(sub, key + ("[]." if sub is not tp else ".")))
            continue
        default = "required" if f.default is dataclasses.MISSING else f"default {f.default!r}"
        lines.append(f"  {key} ({_type_name(tp)}; {default}): {f.metadata.get('help', '')}")
    return lines
