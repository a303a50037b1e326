"""Stage 1 (`stage: align`): only the projector trains; its output starts stage 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, recipe_dict, run_cli


def _align_recipe(parts, captions: Path, out: Path, **train) -> dict:
    clip, llm = parts
    return {
        "stage": "align",
        "model": {"vision_tower": str(clip), "language_model": str(llm), "dtype": "float32"},
        "data": {
            "train": [{"path": str(captions / "captions.json"), "image_folder": str(captions / "images")}],
            "max_length": 128,
        },
        "train": {
            "output_dir": str(out),
            "max_steps": 20,
            "learning_rate": 1e-2,
            "batch_size": 8,
            "warmup_ratio": 0.0,
            "lr_scheduler": "constant",
            "save_steps": 1000,
            "seed": 0,
            **train,
        },
    }


@pytest.fixture(scope="module")
def align_run(tmp_path_factory, tiny_parts, captions) -> Path:
    """20 steps of stage 1 on a model composed from the tiny CLIP and LLM."""
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    return train(parse_recipe(_align_recipe(tiny_parts, captions, tmp_path_factory.mktemp("stage1") / "run")))


def _losses(run: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]


def test_align_lowers_the_caption_loss(align_run):
    losses = _losses(align_run)
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < losses[0] - 0.2, losses


def test_align_writes_projector_and_a_loadable_llava_hf_model(align_run):
    from lora_llava.model.load import load_model, load_processor
    from lora_llava.recipe.schema import ModelConfig

    written = (
        "projector.safetensors",
        "recipe.yaml",
        "metrics.jsonl",
        "loss.png",
        "model/config.json",
        "model/model.safetensors",
    )
    assert all((align_run / name).is_file() for name in written)
    projector = load_file(str(align_run / "projector.safetensors"))
    assert set(projector) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    model = load_model(ModelConfig(name_or_path=str(align_run / "model"), dtype="float32"))
    for k, v in projector.items():
        assert torch.equal(model.model.multi_modal_projector.state_dict()[k], v), k
    processor = load_processor(str(align_run / "model"))
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_align_changes_only_the_projector(align_run, tiny_parts):
    """The saved model equals the composition it started from, except for the projector."""
    from transformers import LlavaForConditionalGeneration

    from lora_llava.model.compose import compose_model
    from lora_llava.recipe.schema import ModelConfig

    clip, llm = tiny_parts
    start, _ = compose_model(ModelConfig(vision_tower=str(clip), language_model=str(llm), dtype="float32"), seed=0)
    trained = LlavaForConditionalGeneration.from_pretrained(align_run / "model", dtype=torch.float32).state_dict()
    changed = {k for k, v in start.state_dict().items() if not torch.equal(v, trained[k])}
    projector = {k for k in trained if "multi_modal_projector" in k}
    assert changed == projector


def test_stage2_starts_from_the_aligned_projector_and_trains_lora_and_projector(align_run, shapes, tmp_path):
    from lora_llava.model.build import load_for_training
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.lora import setup_instruct
    from lora_llava.training.run import train

    raw = recipe_dict(align_run / "model", shapes, tmp_path / "stage2", model={"projector": str(align_run)})
    recipe = parse_recipe(raw)
    aligned = load_file(str(align_run / "projector.safetensors"))
    model, _ = load_for_training(recipe)
    for k, v in aligned.items():
        assert torch.equal(model.model.multi_modal_projector.state_dict()[k], v), k
    trainable = {n for n, p in setup_instruct(model, recipe).named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert any("modules_to_save" in n and "multi_modal_projector" in n for n in trainable)

    out = train(recipe)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: nonzero means it trained
    for k, v in aligned.items():
        saved = next(t for name, t in adapter.items() if name.endswith(f"multi_modal_projector.{k}"))
        assert not torch.equal(saved, v), f"projector {k} did not train in stage 2"


def test_align_on_an_existing_llava_changes_only_its_projector(tiny_model, captions, tmp_path):
    """LLaVA-Med style: stage 1 again on top of a LLaVA-1.5 checkpoint."""
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    raw = _align_recipe((None, None), captions, tmp_path / "run", max_steps=3)
    raw["model"] = {"name_or_path": str(tiny_model), "dtype": "float32"}
    out = train(parse_recipe(raw))
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert set(before) == set(after)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed == {k for k in before if k.startswith("multi_modal_projector.")}


def test_stage1_recipe_validates_and_runs_on_the_tiny_model(tiny_parts, captions, tmp_path):
    from lora_llava.recipe.parse import load_recipe

    recipe = load_recipe(ROOT / "recipes/stage1_align.yaml")
    assert recipe.stage == "align" and recipe.template == "plain"
    t = recipe.train  # LLaVA-1.5's pretrain.sh
    assert (t.learning_rate, t.batch_size * t.grad_accum, t.epochs, t.lr_scheduler, t.warmup_ratio, t.weight_decay) == (
        1e-3, 256, 1.0, "cosine", 0.03, 0.0
    )  # fmt: skip
    assert recipe.data.max_length == 2048 and recipe.model.language_model == "lmsys/vicuna-7b-v1.5"
    assert recipe.model.vision_tower == "openai/clip-vit-large-patch14-336"
    domain = load_recipe(ROOT / "recipes/stage1_domain_align.yaml")
    assert domain.stage == "align" and domain.model.name_or_path and domain.train.learning_rate == 1e-3

    clip, llm = tiny_parts
    out = tmp_path / "run"
    result = run_cli(
        "train",
        str(ROOT / "recipes/stage1_align.yaml"),
        f"model.vision_tower={clip}",
        f"model.language_model={llm}",
        f"data.train.0.path={captions / 'captions.json'}",
        f"data.train.0.image_folder={captions / 'images'}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.grad_accum=1",
        f"train.output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LoRA 0 + projector" in result.stdout
    assert (out / "projector.safetensors").is_file() and (out / "model" / "config.json").is_file()
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["text_config"]["dtype"] == "bfloat16"  # the recipe's dtype, kept by the saved model


def test_align_refuses_quantization(tiny_parts, captions, tmp_path):
    from lora_llava.errors import RecipeError
    from lora_llava.recipe.parse import parse_recipe

    raw = _align_recipe(tiny_parts, captions, tmp_path / "run")
    raw["model"]["quantization"] = "nf4"
    with pytest.raises(RecipeError, match="model.quantization: stage align"):
        parse_recipe(raw)
