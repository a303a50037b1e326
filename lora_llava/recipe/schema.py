"""What a recipe may say: typed frozen dataclasses, one declaration per key (type, default, help, bounds)."""

from __future__ import annotations

import dataclasses
import functools
import json
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

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


# Far beyond any real run, yet small enough that a typo (an extra zero, 1e9 for 1e-9) is caught.
MAX_COUNT = 10**9


def _f(default: Any = dataclasses.MISSING, help: str = "", **checks: Any) -> Any:
    """A dataclass field with help text and value checks (gt, min, lt, max); every number must also be finite."""
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
    anyres: bool = _f(
        False,
        "LLaVA-1.5-HD: turn a LLaVA-1.5 (checkpoint or composition) into the AnyRes architecture of LLaVA-NeXT with the "
        "same tower (a global view plus best-fit tiles; a new image_newline, seeded). LLaVA-NeXT checkpoints are AnyRes already.",
    )
    image_grid_pinpoints: tuple[tuple[int, ...], ...] | None = _f(
        None,
        "AnyRes grid as [width, height] pairs in pixels, whole tiles of the tower's resolution. null: LLaVA-NeXT's "
        "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]] at 336 px (the same tiles at another resolution).",
    )


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    r: int = _f(128, "LoRA rank (LLaVA-1.5: 128); at most the smallest size of a layer it adapts.", gt=0, max=65536)
    alpha: float = _f(256, "LoRA alpha (LLaVA-1.5: 256).", gt=0, max=65536)
    dropout: float = _f(0.05, "LoRA dropout (LLaVA-1.5: 0.05); 1 would drop every input.", min=0, lt=1)
    shared_dropout: bool = _f(
        True,
        "One dropout mask per input, shared by the projections that read it (q/k/v; gate/up): each still sees the same "
        "rate, drawn 4 times per layer instead of 7. false: peft's own mask per projection.",
    )
    target_modules: tuple[str, ...] = _f(
        LLM_LINEAR_LAYERS, "Linear layers of the language model that get adapters. Never the vision tower, projector or lm_head."
    )


@dataclass(frozen=True, kw_only=True)
class ProjectorConfig:
    learning_rate: float | None = _f(
        2e-5,
        "Learning rate of the fully trained projector in stage 2 (LLaVA-1.5 mm_projector_lr: 2e-5); null: train.learning_rate.",
        gt=0,
        max=1,
    )
    trainable: bool = _f(True, "Train the projector fully in stage 2 (LLaVA-1.5 does).")


# Splits data.eval reads when it names none: the first of these that the dataset has.
EVAL_SPLITS = ("test", "validation", "val")


@dataclass(frozen=True, kw_only=True)
class Columns:
    """Which field of a record is what, for datasets that are not in a conversation layout; null: detected."""

    image: str | None = _f(
        None, "The image(s): a path relative to image_folder, a list of paths, an HF Image feature or image bytes."
    )
    question: str | None = _f(None, "The question (one round: question, then answer).")
    answer: str | None = _f(None, "The reference answer.")
    system: str | None = _f(None, "A system prompt per record.")
    id: str | None = _f(None, "The sample id named in reports.")
    metadata: tuple[str, ...] | None = _f(
        None,
        "Fields kept for evaluation (answer_type groups CLOSED/OPEN; a language field groups by language). "
        "null: those of answer_type, question_type, q_lang, lang, language, content_type, modality the data has.",
    )


@dataclass(frozen=True, kw_only=True)
class DatasetSpec:
    path: str = _f(help="LLaVA JSON / JSONL file, a Hugging Face dataset folder (save_to_disk), or parquet / jsonl.")
    image_folder: str | None = _f(None, "Folder that image paths are relative to.")
    format: Literal["auto", "llava", "hf"] = _f(
        "auto", "auto: from the path (.json/.jsonl: read as JSON, LLaVA or chat layout per record; folder/.parquet/.arrow: hf)."
    )
    weight: float | None = _f(
        None, "Sampling weight in a mixture: the dataset is repeated or subsampled to weight x its size.", gt=0, max=1000
    )
    max_samples: int | None = _f(None, "Use at most this many samples of the dataset.", gt=0, max=MAX_COUNT)
    response_suffix: str | None = _f(
        None, "Appended to each question, e.g. 'Answer the question using a single word or phrase.' for short-answer VQA."
    )
    columns: Columns = field(
        default_factory=Columns,
        metadata={"help": "Field names of a question/answer layout (VQA-RAD, SLAKE, PathVQA, query/response, prompt/completion)."},
    )
    filters: dict[str, str | tuple[str, ...]] | None = _f(
        None, "Keep only records whose field equals the value (or one of the list), e.g. {q_lang: en}."
    )
    split: str | tuple[str, ...] | None = _f(
        None,
        "Split of a dataset folder (DatasetDict, or parquet files named train-*.parquet / test-*.parquet); a list: the "
        "first that exists. null: train for data.train, the first of test, validation, val for data.eval.",
    )


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: tuple[DatasetSpec, ...] = _f(help="Training datasets (a mixture when several).")
    eval: tuple[DatasetSpec, ...] = _f((), "Evaluation datasets.")
    template: Literal["vicuna_v1", "plain", "mistral_instruct", "chatml_direct", "chat_template", "auto"] = _f(
        "auto",
        "Prompt template. auto: plain for stage align; for stage instruct the checkpoint's own (mistral_instruct for "
        "LLaVA-NeXT-Mistral, chatml_direct for LLaVA-NeXT-34B), else vicuna_v1 (LLaVA-1.5, LLaVA-NeXT-Vicuna).",
    )
    system_prompt: str | None = _f(
        None, "System prompt for samples without one of their own (default: the template's; vicuna_v1, chat_template)."
    )
    max_length: int = _f(2048, "Maximum tokens per sample, image tokens included; image tokens are never cut.", gt=0, max=2**20)
    image_aspect: Literal["pad", "crop"] = _f(
        "pad", "pad: pad to a square with the CLIP mean colour, then resize (LLaVA-1.5). crop: centre crop."
    )
    group_by_modality_length: bool | None = _f(
        None, "Batches of image-only or text-only samples of similar length. null: on for instruct, off for align."
    )
    num_workers: int = _f(0, "DataLoader workers that decode images and tokenise.", min=0, max=1024)
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

    def __post_init__(self):
        # Each split default is written into its spec, so the resolved recipe says what was read.
        object.__setattr__(self, "train", _default_split(self.train, "train"))
        object.__setattr__(self, "eval", _default_split(self.eval, EVAL_SPLITS))


def _default_split(specs: tuple[DatasetSpec, ...], split: str | tuple[str, ...]) -> tuple[DatasetSpec, ...]:
    if not isinstance(specs, tuple):  # a wrong type, which the recipe parser reports
        return specs
    return tuple(s if not isinstance(s, DatasetSpec) or s.split is not None else dataclasses.replace(s, split=split) for s in specs)


# A memory size: 24GiB, 24GB, 24G, 24 (GiB), 16000MiB, 1TB; GB counts as GiB, as GPU makers label memory.
MEMORY_SIZE = r"\s*([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib|t|tb|tib)?\s*"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    output_dir: str = _f(help="Run folder: adapter, checkpoints, resolved recipe, metrics, plots.")
    epochs: float = _f(1.0, "Passes over the training data.", gt=0, max=10_000)
    max_steps: int | None = _f(None, "Stop after this many optimizer steps (overrides epochs).", gt=0, max=MAX_COUNT)
    learning_rate: float = _f(
        2e-4, "Learning rate of the LoRA weights (LLaVA-1.5: 2e-4), or of the projector in stage align (1e-3).", gt=0, max=1
    )
    batch_size: int = _f(16, "Samples per device per forward pass.", gt=0, max=1_000_000)
    grad_accum: int = _f(
        1, "Gradient accumulation steps; global batch = batch_size x grad_accum x world size.", gt=0, max=1_000_000
    )
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _f(
        "cosine", "Learning-rate schedule (LLaVA-1.5: cosine)."
    )
    warmup_ratio: float = _f(0.03, "Share of steps spent warming up (LLaVA-1.5: 0.03).", min=0, lt=1)
    weight_decay: float = _f(0.0, "AdamW weight decay (LLaVA-1.5: 0).", min=0, max=1)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 turns clipping off.", min=0, max=1e6)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"] = _f(
        "adamw", "adamw (torch), or bitsandbytes' 8-bit / paged AdamW."
    )
    gradient_checkpointing: bool | int | Literal["auto"] = _f(
        True,
        "Non-reentrant activation checkpointing of the language model's decoder layers: true (all), false (none), "
        "N (the first N), or auto (as few as fit the card's memory, see train.gpu_memory; `lora-llava estimate` shows the choice).",
    )
    gpu_memory: str | None = _f(
        None,
        "Memory gradient_checkpointing: auto plans for, e.g. 24GiB (null: the GPU's own; on the CPU, the machine's RAM).",
    )
    loss: Literal["chunked", "standard"] = _f(
        "chunked",
        "chunked: cross-entropy over lm_head in chunks, never the full fp32 logits (same loss). standard: the model's own loss.",
    )
    logging_steps: int = _f(1, "Log the loss every N steps.", gt=0, max=MAX_COUNT)
    save_steps: int = _f(500, "Save a checkpoint every N steps.", gt=0, max=MAX_COUNT)
    save_total_limit: int | None = _f(2, "Keep at most this many checkpoints.", gt=0, max=MAX_COUNT)
    eval_steps: int | None = _f(None, "Evaluate on data.eval every N steps (null: only at the end).", gt=0, max=MAX_COUNT)
    report_to: Literal["none", "tensorboard", "wandb", "mlflow"] = _f(
        "none",
        "Also log to an experiment tracker, through transformers' integration (pip extra of the same name, "
        'e.g. pip install "lora-llava[tensorboard]"); metrics.jsonl and loss.png are written either way.',
    )
    run_name: str | None = _f(None, "The run's name in the tracker (null: the name of the output folder).")
    seed: int = _f(42, "Seed of initialisation, data order and dropout.", min=0, max=2**32 - 1)
    on_nonfinite: Literal["stop", "skip"] = _f(
        "stop",
        "A step with a non-finite loss or gradients: stop (the last good checkpoint stays), or skip the step and count it.",
    )

    def checkpointed_layers(self, layers: int) -> int | None:
        """How many of `layers` decoder layers are checkpointed (the first ones); None for auto: the memory decides."""
        g = self.gradient_checkpointing
        if g == "auto":
            return None
        if isinstance(g, bool):  # before int: True == 1 in Python
            return layers if g else 0
        return min(g, layers)

    def global_batch(self, world_size: int = 1) -> int:
        """Samples per optimizer step over every process: the batch LLaVA-1.5's hyperparameters are quoted for."""
        return self.batch_size * self.grad_accum * world_size


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
        return "plain" if self.stage == "align" else checkpoint_template(self.model.name_or_path or "")

    @property
    def group_by_modality_length(self) -> bool:
        if self.data.group_by_modality_length is not None:
            return self.data.group_by_modality_length
        return self.stage == "instruct"


@functools.lru_cache(maxsize=64)
def checkpoint_template(name_or_path: str) -> str:
    """The conversation format a LLaVA checkpoint was trained with, as the reference code pairs them.

    A local folder says it in its config (the language model's type, ChatML tokens in a NeXT model's
    vocabulary); a hub id not yet on disk by its name. vicuna_v1 otherwise.
    """
    if not name_or_path:  # a composed model: LLaVA-1.5's own
        return "vicuna_v1"
    config = Path(name_or_path).expanduser() / "config.json"
    if config.is_file():
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "vicuna_v1"
        text = (raw.get("text_config") or {}).get("model_type", "")
        if text == "mistral":
            return "mistral_instruct"
        vocab = Path(name_or_path).expanduser() / "tokenizer.json"
        if raw.get("model_type") == "llava_next" and vocab.is_file() and "<|im_start|>" in vocab.read_text(encoding="utf-8"):
            return "chatml_direct"
        return "vicuna_v1"
    name = name_or_path.lower()
    if "mistral" in name:
        return "mistral_instruct"
    if "34b" in name and ("v1.6" in name or "next" in name):
        return "chatml_direct"
    return "vicuna_v1"


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of {_type_name(get_args(tp)[0])} to {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {type(None): "null", str: "string", int: "integer", float: "number", bool: "true/false"}.get(tp, str(tp))
