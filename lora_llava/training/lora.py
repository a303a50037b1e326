"""What trains: LoRA on the language model's linear layers, the projector in full.

peft's `target_modules=["q_proj", ...]` as a list also matches CLIP's
attention layers (same names), so the targets are a regex anchored on
`language_model`. The projector goes into `modules_to_save`: peft trains a full
copy and stores it inside adapter_model.safetensors, which keeps the adapter
folder self-contained. `prepare_model_for_kbit_training` is not used: it casts
every frozen parameter (CLIP, embeddings, lm_head) to fp32 and switches on
reentrant checkpointing; only the trained weights need fp32 here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from ..model.projector import NEWLINE, PROJECTOR_MODULE
from ..recipe.schema import Recipe
from .dropout import share_lora_dropout
from .lora_forward import fuse_lora_forward


def lora_target_regex(layers: tuple[str, ...]) -> str:
    """A peft target regex (full match) for `layers` inside the language model only."""
    return rf".*language_model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(map(re.escape, layers))})"


def enable_checkpointing(model, layers: int | None = None) -> None:
    """Non-reentrant activation checkpointing (works with frozen inputs and without input grads).

    `layers`: checkpoint only the first that many decoder layers of the language model; the
    others keep their activations (None: all of them).
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if layers is not None:
        for i, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = i < layers


def vision_tower_without_graph(model) -> None:
    """Let the frozen vision tower run once per step, building no autograd graph.

    transformers' enable_input_require_grads (called by checkpointing, and by peft
    again) hooks the input embeddings of every sub-model, CLIP's patch embedding
    included: the frozen tower then builds a graph, is back-propagated through
    and, checkpointed, recomputed, for gradients nothing reads. The projector's
    gradients need the tower's output, not gradients through it.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.model.vision_tower.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") == "make_inputs_require_grads":
                del module._forward_hooks[key]
        if getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False


def decoder_layers(model) -> list:
    """The language model's decoder layers, in order (LLaVA-1.5 and NeXT, with or without peft around them)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.model.language_model.layers)


def setup_instruct(model, recipe: Recipe):
    """Stage 2: LoRA adapters on the LLM, projector fully trainable in fp32; returns a PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=recipe.lora.r,
        lora_alpha=recipe.lora.alpha,
        lora_dropout=recipe.lora.dropout,
        target_modules=lora_target_regex(recipe.lora.target_modules),
        modules_to_save=[PROJECTOR_MODULE] if recipe.projector.trainable else None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)  # adapters start in fp32 (autocast_adapter_dtype)
    share_lora_dropout(peft_model, shared=recipe.lora.shared_dropout)
    fuse_lora_forward(peft_model)
    vision_tower_without_graph(peft_model)
    if getattr(model.model, NEWLINE, None) is not None:
        # AnyRes: trained with the projector, at its rate; saved in the adapter either way (a HD model's is new)
        getattr(model.model, NEWLINE).requires_grad_(recipe.projector.trainable)
        keep_newline_in_adapter(peft_model)
    for p in peft_model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # fp32 master weights for everything that trains
    check_trainable(peft_model, recipe)
    return peft_model


def check_rank(model, recipe: Recipe) -> None:
    """lora.r may not exceed the smaller size of any layer it adapts: beyond that rank the update cannot grow."""
    if recipe.stage != "instruct":
        return
    pattern = re.compile(lora_target_regex(recipe.lora.target_modules))
    sizes = {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if pattern.fullmatch(name) and hasattr(m, "in_features") and hasattr(m, "out_features")
    }
    if not sizes:
        return
    name, (fan_in, fan_out) = min(sizes.items(), key=lambda item: min(item[1]))
    if recipe.lora.r > min(fan_in, fan_out):
        raise ModelError(
            f"lora.r: {recipe.lora.r} is larger than the {fan_in} x {fan_out} layer {name.rsplit('.', 1)[-1]} it adapts "
            f"in {recipe.model.name_or_path or recipe.model.language_model}; use at most {min(fan_in, fan_out)}"
        )


def setup_align(model, recipe: Recipe):
    """Stage 1: only the projector trains (fp32); vision tower and LLM stay frozen."""
    model.requires_grad_(False)
    projector = model.model.multi_modal_projector
    projector.float()
    projector.requires_grad_(True)
    newline = getattr(model.model, NEWLINE, None)
    if newline is not None:  # AnyRes: stage 1 aligns the row separator with the projector
        newline.data = newline.data.float()
        newline.requires_grad_(True)
    vision_tower_without_graph(model)
    check_trainable(model, recipe)
    return model


def keep_newline_in_adapter(peft_model) -> None:
    """Save `image_newline` in adapter_model.safetensors beside LoRA and the projector.

    peft saves adapter weights and `modules_to_save` only, and image_newline is a parameter, not a
    module. Its key, `base_model.model.model.image_newline`, carries no adapter name, so peft's
    loader hands it to `load_state_dict` as it is and it lands on the parameter again.
    """
    import types

    from safetensors.torch import load_file, save_file

    original = peft_model.save_pretrained
    key = f"base_model.model.model.{NEWLINE}"

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        original(save_directory, *args, state_dict=state_dict, **kwargs)
        path = Path(save_directory) / "adapter_model.safetensors"
        if not path.is_file():
            return
        value = state_dict.get(key) if state_dict is not None else None
        value = value if value is not None else getattr(self.get_base_model().model, NEWLINE)
        tensors = load_file(str(path))
        tensors[key] = value.detach().to("cpu").contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})

    peft_model.save_pretrained = types.MethodType(save_pretrained, peft_model)


def is_projector(name: str) -> bool:
    return f"{PROJECTOR_MODULE}." in name


def is_newline(name: str) -> bool:
    return name.endswith(NEWLINE)


def is_lora(name: str) -> bool:
    return ".lora_" in name


def check_trainable(model, recipe: Recipe) -> None:
    """Fail loudly if what trains is not exactly what the recipe says."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if recipe.stage == "align":
        wrong = [n for n in trainable if not (is_projector(n) or is_newline(n))]
        missing = not any(is_projector(n) for n in trainable)
    else:
        wrong = [
            n
            for n in trainable
            if not ((is_lora(n) and "language_model" in n) or (is_projector(n) and "modules_to_save" in n) or is_newline(n))
        ]
        missing = not any(is_lora(n) for n in trainable) or (
            recipe.projector.trainable and not any(is_projector(n) for n in trainable)
        )
    if wrong or missing:
        raise RuntimeError(f"trainable parameters differ from the recipe: unexpected {wrong[:5]}, missing={missing}")


@dataclass(frozen=True)
class ParamReport:
    lora: int
    projector: int
    total: int

    @property
    def trainable(self) -> int:
        return self.lora + self.projector

    def __str__(self) -> str:
        pct = 100 * self.trainable / max(self.total, 1)
        return (
            f"trainable parameters: {self.trainable:,} of {self.total:,} ({pct:.2f}%) = "
            f"LoRA {self.lora:,} + projector {self.projector:,}"
        )


def param_report(model) -> ParamReport:
    """Counts of trainable LoRA and projector parameters against all parameters.

    4-bit weights are packed two per byte; they count as the parameters they hold.
    The frozen original projector that peft keeps beside its trained copy is not counted twice.
    """
    lora = proj = total = 0
    for name, p in model.named_parameters():
        n = p.numel() * 2 if p.dtype == torch.uint8 else p.numel()
        if "original_module" in name:
            continue
        total += n
        if p.requires_grad:
            if is_lora(name):
                lora += n
            elif is_projector(name) or is_newline(name):
                proj += n
    return ParamReport(lora, proj, total)


def param_groups(model, recipe: Recipe) -> list[dict]:
    """Optimizer groups: LoRA at train.learning_rate, the projector at its own rate (LLaVA-1.5: 2e-5)."""
    lora, proj = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if is_projector(name) or is_newline(name) else lora).append(p)
    if recipe.stage == "align":
        return [
            {"params": proj, "lr": recipe.train.learning_rate, "weight_decay": recipe.train.weight_decay, "name": "projector"}
        ]
    proj_lr = recipe.projector.learning_rate or recipe.train.learning_rate
    groups = [{"params": lora, "lr": recipe.train.learning_rate, "weight_decay": recipe.train.weight_decay, "name": "lora"}]
    if proj:
        groups.append({"params": proj, "lr": proj_lr, "weight_decay": recipe.train.weight_decay, "name": "projector"})
    return groups
