"""`lora-llava convert`: an original-format LLaVA-1.5 checkpoint becomes a llava-hf folder with the same outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import TINY_IMAGE_SIZE, run_cli


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    """A tiny checkpoint in the liuhaotian/llava-v1.5-7b layout (`llava/`) and the CLIP it names (`clip/`)."""
    from lora_llava.model.tiny import make_tiny_original

    return make_tiny_original(tmp_path_factory.mktemp("original"), image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "llava-hf"
    result = run_cli("convert", str(original), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"converted: {out}" in result.stdout
    return out


def _by_hand(original: Path):
    """The same weights put into LlavaForConditionalGeneration module by module, without lora_llava's converter."""
    from transformers import AutoTokenizer, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    raw = json.loads((original / "config.json").read_text())
    weights = load_file(str(original / "model.safetensors"))
    clip = CLIPVisionModel.from_pretrained(raw["mm_vision_tower"], dtype=torch.float32)
    n = len(AutoTokenizer.from_pretrained(original))
    sizes = (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
    )
    text = LlamaConfig(**{k: raw[k] for k in sizes})
    text.vocab_size = 64 * -(-(n + 2) // 64)
    config = LlavaConfig(
        vision_config=clip.config, text_config=text, image_token_index=n, vision_feature_layer=-2, projector_hidden_act="gelu"
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.model.vision_tower.load_state_dict(clip.state_dict())
    llm = {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.") and "mm_projector" not in k and "image_newline" not in k}
    for key, rows in (("embed_tokens.weight", llm), ("lm_head.weight", weights)):
        w = rows[key]
        rows[key] = torch.cat([w, w.mean(0).expand(text.vocab_size - n, -1)])
    model.model.language_model.load_state_dict(llm)
    model.lm_head.weight.data.copy_(weights["lm_head.weight"])
    proj = model.model.multi_modal_projector
    for mine, theirs in (("linear_1", "0"), ("linear_2", "2")):
        getattr(proj, mine).weight.data.copy_(weights[f"model.mm_projector.{theirs}.weight"])
        getattr(proj, mine).bias.data.copy_(weights[f"model.mm_projector.{theirs}.bias"])
    return model


def _inputs(folder: Path):
    from lora_llava.model.load import load_processor

    processor = load_processor(str(folder))
    images = [Image.new("RGB", (70, 40), (200, 30, 30)), Image.new("RGB", (40, 60), (30, 60, 220))]
    text = ["USER: <image>\nWhat colour is the shape? ASSISTANT: red", "USER: <image>\nIs there a circle? ASSISTANT: no"]
    return processor(images=images, text=text, padding=True, return_tensors="pt")


def _logits(folder: Path, batch) -> torch.Tensor:
    from lora_llava.model.load import load_model
    from lora_llava.recipe.schema import ModelConfig

    with torch.no_grad():
        return load_model(ModelConfig(name_or_path=str(folder), dtype="float32"))(**batch).logits


def test_converted_checkpoint_gives_the_logits_of_the_hand_assembled_model(original, converted):
    batch = _inputs(converted)
    with torch.no_grad():
        expected = _by_hand(original)(**batch).logits
    got = _logits(converted, batch)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_converted_folder_is_llava15_hf(original, converted):
    from lora_llava.model.load import load_processor

    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert (config["vision_feature_layer"], config["vision_feature_select_strategy"]) == (-2, "default")
    processor = load_processor(str(converted))
    tok = processor.tokenizer
    n = tok.convert_tokens_to_ids("<image>")
    assert config["image_token_index"] == n and tok.pad_token == "<pad>" and tok.pad_token_id == n + 1
    assert config["text_config"]["vocab_size"] % 64 == 0
    assert processor.image_processor.do_pad and processor.chat_template
    assert _inputs(converted)["input_ids"].eq(n).sum() == 2 * 16


def test_pytorch_bin_shards_and_vision_tower_option(original, converted, tmp_path):
    """The .bin shards liuhaotian/llava-v1.5-7b ships, with the CLIP given on the command line."""
    src = tmp_path / "bin-checkpoint"
    shutil.copytree(original, src)
    weights = load_file(str(src / "model.safetensors"))
    (src / "model.safetensors").unlink()
    keys = sorted(weights)
    torch.save({k: weights[k] for k in keys[::2]}, src / "pytorch_model-00001-of-00002.bin")
    torch.save({k: weights[k] for k in keys[1::2]}, src / "pytorch_model-00002-of-00002.bin")
    raw = json.loads((src / "config.json").read_text())
    clip = raw["mm_vision_tower"]
    raw["mm_vision_tower"] = "/not/on/this/machine/clip-vit-large-patch14-336"
    (src / "config.json").write_text(json.dumps(raw))

    from lora_llava.model.convert import convert_checkpoint

    out = convert_checkpoint(src, tmp_path / "out", vision_tower=clip)
    batch = _inputs(converted)
    assert torch.equal(_logits(out, batch), _logits(converted, batch))


def test_existing_target_is_refused_then_replaced_with_overwrite(original, tmp_path):
    out = tmp_path / "target"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run_cli("convert", str(original), str(out))
    assert result.returncode == 2 and "not empty (use --overwrite to replace it)" in result.stderr
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    result = run_cli("convert", str(original), str(out), "--overwrite")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".target*"))  # no staging folder left behind


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type 'linear' (LLaVA-1.5 uses mlp2x_gelu)"),
        ({"architectures": ["LlavaForConditionalGeneration"]}, "already llava-hf"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ],
)
def test_unsupported_checkpoints_are_refused_before_writing(original, tmp_path, change, message):
    from lora_llava.errors import ModelError
    from lora_llava.model.convert import convert_checkpoint

    src = tmp_path / "src"
    src.mkdir()
    raw = {**json.loads((original / "config.json").read_text()), **change}
    (src / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="cannot convert|not an original LLaVA") as e:
        convert_checkpoint(src, tmp_path / "out")
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_original_stage1_projector_file_loads_as_model_projector(converted, tmp_path):
    """LLaVA's own stage-1 output (mm_projector.bin, Sequential names) works as model.projector."""
    from lora_llava.model.load import load_model
    from lora_llava.model.projector import load_projector
    from lora_llava.recipe.schema import ModelConfig

    model = load_model(ModelConfig(name_or_path=str(converted), dtype="float32"))
    proj = model.model.multi_modal_projector
    new = {k: torch.randn_like(v) for k, v in proj.state_dict().items()}
    names = {"linear_1": "0", "linear_2": "2"}
    torch.save(
        {f"model.mm_projector.{names[k.split('.')[0]]}.{k.split('.')[1]}": v for k, v in new.items()},
        tmp_path / "mm_projector.bin",
    )
    load_projector(model, tmp_path)
    assert all(torch.equal(proj.state_dict()[k], v) for k, v in new.items())


@pytest.fixture(scope="module")
def original_next(tmp_path_factory) -> Path:
    """A tiny checkpoint in the liuhaotian/llava-v1.6-vicuna-7b layout: anyres, spatial_unpad, its grid, image_newline."""
    from lora_llava.model.tiny import make_tiny_original

    return make_tiny_original(tmp_path_factory.mktemp("original-next"), image_size=TINY_IMAGE_SIZE, next=True)


def test_an_original_next_checkpoint_converts_to_the_reference_models_logits(original_next, tmp_path):
    """The hand-assembled NeXT reads each pinpoint as the reference code does, (width, height): ties included."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    out = tmp_path / "llava-hf"
    result = run_cli("convert", str(original_next), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    raw = json.loads((original_next / "config.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llava_next" and saved["grid_pinpoints_order"] == "height_width"
    one_five = _by_hand(original_next)
    # transformers reads (height, width): the reference's (width, height) pairs, swapped by hand
    config = LlavaNextConfig(
        **{k: v for k, v in one_five.config.to_dict().items() if k not in ("model_type", "architectures")},
        image_grid_pinpoints=[[h, w] for w, h in raw["image_grid_pinpoints"]],
    )
    by_hand = LlavaNextForConditionalGeneration(config).eval()
    missing = by_hand.load_state_dict(one_five.state_dict(), strict=False).missing_keys
    assert missing == ["model.image_newline"]
    by_hand.model.image_newline.data.copy_(load_file(str(original_next / "model.safetensors"))["model.image_newline"])

    from lora_llava.model.load import load_processor

    processor = load_processor(str(out))
    for size in [(50, 20), (20, 50), (150, 40), (40, 150), (120, 110), (30, 30)]:  # ties (one tile or less), wide, tall
        image = Image.new("RGB", size, (200, 30, 30))
        batch = processor(images=[image], text=["USER: <image>\nWhat colour is the shape? ASSISTANT: red"], return_tensors="pt")
        with torch.no_grad():
            expected = by_hand(**batch).logits
        got = _logits(out, batch)
        assert got.shape == expected.shape, size
        assert torch.allclose(got, expected, atol=1e-5), (size, (got - expected).abs().max())
