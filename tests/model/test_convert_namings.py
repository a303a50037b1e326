"""`convert` of checkpoints that store their CLIP tower inside, under transformers 4's and 5's names, in their dtype."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import TINY_IMAGE_SIZE, run_cli
from tests.model.test_convert import _by_hand, _inputs, _logits

# How LLaVA's CLIPVisionTower (a CLIPVisionModel at `model.vision_tower.vision_tower`) is named in a
# checkpoint saved under each transformers version; written out here, independent of lora_llava.
PREFIXES = {
    "transformers4": "model.vision_tower.vision_tower.vision_model.",
    "transformers5": "model.vision_tower.vision_tower.",
}


@pytest.fixture(scope="module", params=sorted(PREFIXES))
def saved(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """(naming, original checkpoint with its tower inside, the llava-hf folder `convert` made of it)."""
    from lora_llava.model.tiny import make_tiny_original

    original = make_tiny_original(tmp_path_factory.mktemp(request.param), image_size=TINY_IMAGE_SIZE, saved_by=request.param)
    out = original.parent / "converted"
    result = run_cli("convert", str(original), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return request.param, original, out


def _reference(naming: str, original: Path, tmp_path: Path, inline: bool = True):
    """The original model assembled by hand: the LLM and projector by `_by_hand`, the tower from inside the checkpoint."""
    weights = load_file(str(original / "model.safetensors"))
    tower = {k[len(PREFIXES[naming]) :]: v for k, v in weights.items() if k.startswith(PREFIXES[naming])}
    assert len(tower) > 10 and not any(k.startswith("vision_model.") for k in tower)
    rest = tmp_path / "without-tower"
    shutil.copytree(original, rest)
    save_file({k: v for k, v in weights.items() if not k.startswith(PREFIXES[naming])}, str(rest / "model.safetensors"))
    model = _by_hand(rest)
    if inline:
        model.model.vision_tower.load_state_dict(tower)
    return model


def test_config_says_which_naming_and_dtype_key(saved):
    naming, original, _ = saved
    raw = json.loads((original / "config.json").read_text())
    keys = list(load_file(str(original / "model.safetensors")))
    assert any(k.startswith(PREFIXES[naming] + "embeddings.") for k in keys)
    assert ("dtype" in raw, "torch_dtype" in raw) == ((True, False) if naming == "transformers5" else (False, True))


def test_converted_logits_equal_the_original_models_in_fp32(saved, tmp_path):
    naming, original, converted = saved
    batch = _inputs(converted)
    with torch.no_grad():
        expected = _reference(naming, original, tmp_path)(**batch).logits
        named_clip = _reference(naming, original, tmp_path / "named", inline=False)(**batch).logits
    got = _logits(converted, batch)
    assert expected.dtype == got.dtype == torch.float32
    assert (got - expected).abs().max() <= 1e-5
    # The tower stored inside differs from the CLIP the config names: taking that one would show.
    assert (named_clip - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "naming, dtype",
    [("transformers5", "bfloat16"), ("transformers4", "float16"), ("transformers5", "float32"), (None, "bfloat16")],
)
def test_the_source_dtype_is_kept(naming, dtype, tmp_path):
    from lora_llava.model.convert import convert_checkpoint
    from lora_llava.model.tiny import make_tiny_original

    original = make_tiny_original(tmp_path / "src", image_size=TINY_IMAGE_SIZE, saved_by=naming, dtype=dtype)
    out = convert_checkpoint(original, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == dtype
    stored = {v.dtype for v in load_file(str(out / "model.safetensors")).values() if v.is_floating_point()}
    assert stored == {getattr(torch, dtype)}


@pytest.mark.parametrize(
    "config, expected",
    [
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"torch_dtype": "float32"}, "float32"),
        ({"dtype": "bfloat16", "torch_dtype": "float16"}, "bfloat16"),
        ({}, "float16"),
    ],
)
def test_source_dtype_reads_both_config_keys(config, expected):
    from lora_llava.model.convert import source_dtype

    assert source_dtype(config) == expected


def test_an_inline_weight_clip_does_not_have_is_one_line(saved, tmp_path):
    naming, original, _ = saved
    src = tmp_path / "src"
    shutil.copytree(original, src)
    weights = load_file(str(src / "model.safetensors"))
    weights[PREFIXES[naming] + "extra_head.weight"] = torch.zeros(2, 2)
    save_file(weights, str(src / "model.safetensors"))
    result = run_cli("convert", str(src), str(tmp_path / "out"))
    assert result.returncode == 2
    message = [line for line in result.stderr.splitlines() if "error" in line]  # progress bars aside
    assert len(message) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(src) in message[0] and "model.vision_tower.extra_head.weight" in message[0]
    assert not (tmp_path / "out").exists()


def test_make_tiny_cli_writes_the_naming(tmp_path):
    naming = "transformers5"
    result = run_cli("make-tiny", str(tmp_path / naming), "--original", "--saved-by", naming, "--image-size", "28")
    assert result.returncode == 0, result.stderr[-2000:]
    keys = list(load_file(str(tmp_path / naming / "llava" / "model.safetensors")))
    assert any(k.startswith(PREFIXES[naming] + "encoder.") for k in keys)
    assert not any(k.startswith(PREFIXES["transformers4"]) for k in keys)
    result = run_cli("make-tiny", str(tmp_path / "x"), "--saved-by", "transformers5")
    assert result.returncode == 2 and "add --original" in result.stderr
