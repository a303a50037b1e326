"""Composing a LLaVA-1.5 from a CLIP vision tower and a LLaMA-family LLM (model.vision_tower + model.language_model)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, TINY_IMAGE_SIZE, run_cli


def _cfg(parts, **kw):
    from lora_llava.recipe.schema import ModelConfig

    clip, llm = parts
    return ModelConfig(vision_tower=str(clip), language_model=str(llm), **{"dtype": "float32", **kw})


@pytest.fixture(scope="module")
def composed(tiny_parts):
    from lora_llava.model.compose import compose_model

    return compose_model(_cfg(tiny_parts), seed=0)


def test_composed_model_has_llava15_architecture(composed, tiny_parts):
    model, _ = composed
    c = model.config
    assert (c.vision_feature_layer, c.vision_feature_select_strategy, c.projector_hidden_act) == (-2, "default", "gelu")
    proj = model.model.multi_modal_projector
    assert (proj.linear_1.in_features, proj.linear_1.out_features) == (32, 64)  # vision hidden -> LLM hidden
    assert (proj.linear_2.in_features, proj.linear_2.out_features) == (64, 64)
    assert c.image_seq_length == (TINY_IMAGE_SIZE // 14) ** 2
    assert not any(p.requires_grad for p in model.parameters())


def test_composed_weights_are_the_parts_weights(composed, tiny_parts):
    from transformers import AutoModelForCausalLM, CLIPModel

    model, _ = composed
    clip, llm = tiny_parts
    source_llm = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).state_dict()
    mine = model.state_dict()
    for k, v in source_llm.items():
        if "embed_tokens" in k or k == "lm_head.weight":
            assert torch.equal(mine[k.replace("model.", "model.language_model.", 1)][: v.shape[0]], v)
        else:
            assert torch.equal(mine[k.replace("model.", "model.language_model.", 1)], v), k
    vision = CLIPModel.from_pretrained(clip, dtype=torch.float32).vision_model.state_dict()
    assert vision and all(torch.equal(mine[f"model.vision_tower.{k}"], v) for k, v in vision.items())


def test_image_and_pad_tokens_are_added_and_new_rows_start_at_the_mean(composed, tiny_parts):
    from transformers import AutoTokenizer

    model, processor = composed
    plain = AutoTokenizer.from_pretrained(tiny_parts[1])
    n = len(plain)
    tok = processor.tokenizer
    assert "<image>" not in plain.get_vocab()
    assert tok.convert_tokens_to_ids("<image>") == n == model.config.image_token_id
    assert tok.pad_token == "<pad>" and tok.pad_token_id == n + 1 == model.config.text_config.pad_token_id
    rows = model.config.text_config.vocab_size
    assert rows % 64 == 0 and rows >= n + 2  # llava-hf pads the vocabulary (32000 + 2 -> 32064)
    for w in (model.get_input_embeddings().weight, model.lm_head.weight):
        assert w.shape[0] == rows
        assert torch.allclose(w[n:], w[:n].mean(0).expand(rows - n, -1), atol=1e-6)


def test_processor_has_llava15_image_settings(composed):
    _, processor = composed
    ip = processor.image_processor
    assert ip.do_pad and ip.crop_size == {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
    assert processor.num_additional_image_tokens == 1 and processor.vision_feature_select_strategy == "default"
    assert processor.chat_template and "ASSISTANT" in processor.chat_template
    batch = processor(images=[Image.new("RGB", (70, 40), "red")], text=["USER: <image>\nWhat? ASSISTANT:"], return_tensors="pt")
    assert (batch["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 16


def test_real_clip_geometry_gives_576_image_tokens(composed):
    """CLIP ViT-L/14 at 336 px: the processor composition builds inserts 24 x 24 tokens, as LLaVA-1.5."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from lora_llava.model.compose import llava_config
    from lora_llava.model.processor import llava_processor

    _, processor = composed
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, num_attention_heads=16)
    config = llava_config(vision, LlamaConfig(hidden_size=4096, num_attention_heads=32), processor.tokenizer)
    real = llava_processor(processor.tokenizer, config)
    assert config.image_seq_length == 576 and real.image_processor.crop_size == {"height": 336, "width": 336}
    batch = real(images=[Image.new("RGB", (500, 300), "red")], text=["<image>\nhi"], return_tensors="pt")
    assert batch["pixel_values"].shape[-2:] == (336, 336)
    assert (batch["input_ids"] == config.image_token_id).sum() == 576


def test_composed_model_runs_and_round_trips_through_a_folder(composed, tmp_path):
    from lora_llava.model.load import load_model, load_processor
    from lora_llava.recipe.schema import ModelConfig

    model, processor = composed
    batch = processor(images=[Image.new("RGB", (60, 40), "blue")], text=["USER: <image>\nWhat? ASSISTANT:"], return_tensors="pt")
    logits = model(**batch).logits
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    again = load_model(ModelConfig(name_or_path=str(tmp_path / "m"), dtype="float32"))
    batch2 = load_processor(str(tmp_path / "m"))(
        images=[Image.new("RGB", (60, 40), "blue")], text=["USER: <image>\nWhat? ASSISTANT:"], return_tensors="pt"
    )
    assert torch.equal(batch["input_ids"], batch2["input_ids"])
    assert torch.allclose(again(**batch2).logits, logits, atol=1e-5)


def test_composition_is_reproducible_and_seeded(composed, tiny_parts):
    from lora_llava.model.compose import compose_model

    model, _ = composed
    again, _ = compose_model(_cfg(tiny_parts), seed=0)
    other, _ = compose_model(_cfg(tiny_parts), seed=1)
    key = "model.multi_modal_projector.linear_1.weight"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.state_dict()[key], other.state_dict()[key])


def test_a_clip_vision_model_folder_composes_the_same_model(composed, tiny_parts, tmp_path):
    from transformers import CLIPVisionModel

    from lora_llava.model.compose import compose_model

    CLIPVisionModel.from_pretrained(tiny_parts[0]).save_pretrained(tmp_path / "vision-only")
    model, _ = composed
    other, _ = compose_model(_cfg((tmp_path / "vision-only", tiny_parts[1])), seed=0)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_qlora_on_a_composed_model_quantizes_only_the_llm_linears(tiny_parts):
    from lora_llava.model.compose import compose_model
    from lora_llava.model.load import quantized_module_names

    model, _ = compose_model(_cfg(tiny_parts, dtype="bfloat16", quantization="nf4"), seed=0)
    linears = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    expected = {
        n for n, _ in model.named_modules() if n.startswith("model.language_model.layers.") and n.rsplit(".", 1)[-1] in linears
    }
    assert quantized_module_names(model) == expected
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert next(model.model.vision_tower.parameters()).dtype == torch.bfloat16
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16


def test_bad_parts_are_one_line_errors(tiny_parts, captions, tmp_path):
    clip, llm = tiny_parts
    result = run_cli(
        "train",
        str(ROOT / "recipes/stage1_align.yaml"),
        f"model.vision_tower={llm}",
        f"model.language_model={clip}",
        f"data.train.0.path={captions / 'captions.json'}",
        f"data.train.0.image_folder={captions / 'images'}",
        f"train.output_dir={tmp_path / 'out'}",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"model.vision_tower: {llm} is a 'llama' checkpoint; LLaVA-1.5 uses a CLIP vision tower" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_or_wrong_language_model_names_the_key(tiny_parts):
    from lora_llava.errors import ModelError
    from lora_llava.model.compose import compose_model

    with pytest.raises(ModelError, match="model.language_model: model folder /no/such/llm not found"):
        compose_model(_cfg((tiny_parts[0], "/no/such/llm")))
    with pytest.raises(ModelError, match="model.language_model: .* is a 'clip' checkpoint, not a language model"):
        compose_model(_cfg((tiny_parts[0], tiny_parts[0])))


def test_recipe_needs_both_parts_and_not_name_or_path_too(tiny_parts, tiny_model):
    from lora_llava.errors import RecipeError
    from lora_llava.recipe.parse import parse_recipe

    base = {"stage": "align", "data": {"train": [{"path": "x.json"}]}, "train": {"output_dir": "o"}}
    with pytest.raises(RecipeError, match="composing a model needs both"):
        parse_recipe({**base, "model": {"vision_tower": str(tiny_parts[0])}})
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe({**base, "model": {"name_or_path": str(tiny_model), "vision_tower": "a", "language_model": "b"}})
    with pytest.raises(RecipeError, match="model.revision: applies to model.name_or_path only"):
        parse_recipe({**base, "model": {"vision_tower": "a", "language_model": "b", "revision": "main"}})


def test_make_tiny_parts_cli_writes_a_clip_tower_and_a_plain_llm(tmp_path):
    result = run_cli("make-tiny", str(tmp_path / "parts"), "--parts", "--image-size", "56")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(tmp_path / "parts" / "clip"), str(tmp_path / "parts" / "llm")]
    assert json.loads((tmp_path / "parts/clip/config.json").read_text())["model_type"] == "clip"
    assert json.loads((tmp_path / "parts/llm/config.json").read_text())["model_type"] == "llama"
    tok = json.loads((tmp_path / "parts/llm/tokenizer.json").read_text())
    assert not any(t["content"] in ("<image>", "<pad>") for t in tok["added_tokens"])
