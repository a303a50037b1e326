"""The model card (README.md) and recipe of a merged checkpoint.

A released model should say what it is without the run folder beside it:
the base model, the data, the recipe, how training went, how faithful the
merge is (the parity figures), and how to load it with plain transformers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..recipe.parse import dump_recipe
from ..recipe.schema import DatasetSpec, Recipe
from .parity import ParityReport

MODES = {
    "trained": "the weights the adapter was trained against",
    "original": "the base checkpoint's original weights",
}


def _datasets(specs: tuple[DatasetSpec, ...]) -> list[str]:
    lines = []
    for s in specs:
        extra = [f"{k} {v}" for k, v in (("weight", s.weight), ("max_samples", s.max_samples)) if v is not None]
        lines.append(f"- `{Path(s.path).name}`" + (f" ({', '.join(extra)})" if extra else ""))
    return lines or ["- none"]


def _training(recipe: Recipe, metrics: list[dict]) -> list[str]:
    m, t = recipe.model, recipe.train
    if recipe.stage == "align":
        what = f"stage 1 (alignment): the projector alone, learning rate {t.learning_rate:g}"
    else:
        lora = recipe.lora
        what = (
            f"stage 2 (instruction tuning): LoRA r={lora.r}, alpha={lora.alpha:g}, dropout {lora.dropout:g} on "
            f"{', '.join(lora.target_modules)} of the language model, learning rate {t.learning_rate:g}"
        )
        if recipe.projector.trainable:
            what += f"; projector trained fully at {recipe.projector.learning_rate or t.learning_rate:g}"
    quant = {"nf4": "4-bit NF4 (QLoRA)", "int8": "8-bit", "none": "16/32-bit, not quantized"}[m.quantization]
    lines = [
        f"- {what}",
        f"- language model loaded {quant}, dtype {m.dtype}",
        f"- template `{recipe.template}`, max length {recipe.data.max_length}, images `{recipe.data.image_aspect}`",
        f"- batch {t.batch_size} x {t.grad_accum} accumulation, {t.lr_scheduler} schedule, warmup {t.warmup_ratio:g}, seed {t.seed}",
    ]
    losses = [r for r in metrics if "loss" in r]
    if losses:
        lines.append(
            f"- {losses[-1]['step']} steps; loss {losses[0]['loss']:.4f} (step {losses[0]['step']}) -> {losses[-1]['loss']:.4f}"
        )
    for r in metrics:
        if "train_loss" in r:
            lines.append(f"- mean training loss {r['train_loss']:.4f}, {r.get('train_runtime', 0):.0f} s")
        if "eval_loss" in r:
            lines.append(f"- eval loss {r['eval_loss']:.4f} at step {r['step']}")
    return lines


def _parity(parity: ParityReport | None) -> list[str]:
    if parity is None:
        return ["Not run (`--no-check`)."]
    return [
        f"The adapter model as trained and this checkpoint, on {parity.samples} sample(s) from {parity.source}, "
        f"compared at {parity.positions} token positions:",
        "",
        "| max abs logit difference | mean abs logit difference | top-1 agreement | tolerance |",
        "|---|---|---|---|",
        f"| {parity.max_abs:.3g} | {parity.mean_abs:.3g} | {100 * parity.top1:.2f}% | {parity.tolerance:.3g} |",
    ]


def _usage(name: str, dtype: torch.dtype, cls: str = "LlavaForConditionalGeneration") -> list[str]:
    dt = str(dtype).removeprefix("torch.")
    return [
        "```python",
        "import torch",
        "from PIL import Image",
        f"from transformers import AutoProcessor, {cls}",
        "",
        f'model = {cls}.from_pretrained("{name}", dtype=torch.{dt}, device_map="auto")',
        f'processor = AutoProcessor.from_pretrained("{name}")',
        'messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown here?"}]}]',
        "prompt = processor.apply_chat_template(messages, add_generation_prompt=True)",
        f'inputs = processor(images=Image.open("image.png"), text=prompt, return_tensors="pt").to(model.device, torch.{dt})',
        "output = model.generate(**inputs, max_new_tokens=128)",
        'print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
    ]


def model_card(name: str, src, mode: str, dtype: torch.dtype, parity: ParityReport | None, model_type: str = "llava") -> str:
    """README.md text for the merged checkpoint `name` made from the run `src` (a MergeSource)."""
    recipe: Recipe = src.recipe
    next_ = model_type == "llava_next"
    kind = ("LLaVA-1.5-HD (AnyRes)" if recipe.model.anyres else "LLaVA-NeXT") if next_ else "LLaVA-1.5"
    cls = "LlavaNextForConditionalGeneration" if next_ else "LlavaForConditionalGeneration"
    base = recipe.model.name_or_path or src.base
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-text-to-text",
        f"base_model: {base}",
        f"tags: [llava, {'llava-next' if next_ else 'llava-1.5'}, lora, lora-llava]",
        "---",
        "",
        f"# {name}",
        "",
        f"{kind} adapted with lora-llava {__version__}, merged into one standalone checkpoint: "
        "transformers loads it without peft.",
        "",
        "## Base model",
        "",
        f"- `{src.base}`",
        f"- merged into {MODES[mode]}; weights in {str(dtype).removeprefix('torch.')}",
        "",
        "## Data",
        "",
        "Training:",
        *_datasets(recipe.data.train),
        "",
        "Evaluation:",
        *_datasets(recipe.data.eval),
        "",
        "## Training",
        "",
        *_training(recipe, src.metrics),
        "",
        "The full recipe is `recipe.yaml` in this folder.",
        "",
        "## Merge check",
        "",
        *_parity(parity),
        "",
        "## Use with transformers",
        "",
        f"The chat template renders the `{recipe.template}` prompt the model was trained on.",
        "",
        *_usage(name, dtype, cls),
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path, name: str, src, mode: str, dtype: torch.dtype, parity: ParityReport | None) -> None:
    """README.md and recipe.yaml (the run's recipe file, else the resolved recipe) in `folder`."""
    model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type", "llava")
    (folder / "README.md").write_text(model_card(name, src, mode, dtype, parity, model_type), encoding="utf-8")
    if src.recipe_file is not None and src.recipe_file.is_file():
        shutil.copyfile(src.recipe_file, folder / "recipe.yaml")
    else:
        dump_recipe(src.recipe, folder / "recipe.yaml")
