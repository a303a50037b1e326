"""The recipe module: strict keys, types, bounds, synonyms, overrides, the resolved dump and the key listing."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lora_llava.errors import RecipeError
from lora_llava.recipe import apply_overrides, dump_recipe, load_recipe, parse_recipe, recipe_to_dict
from lora_llava.recipe.describe import choices, describe_fields
from lora_llava.recipe.schema import ModelConfig, Recipe, TrainConfig


def minimal(**train) -> dict:
    return {
        "model": {"name_or_path": "llava-hf/llava-1.5-7b-hf"},
        "data": {"train": [{"path": "data/train.json"}]},
        "train": {"output_dir": "runs/x", **train},
    }


def problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as e:
        parse_recipe(raw, "r.yaml")
    return e.value.problems


def test_defaults_are_llava15s():
    r = parse_recipe(minimal())
    assert (r.lora.r, r.lora.alpha, r.lora.dropout) == (128, 256, 0.05)
    assert r.projector.learning_rate == 2e-5 and r.train.learning_rate == 2e-4
    assert r.template == "vicuna_v1" and r.data.image_aspect == "pad"
    assert r.train.lr_scheduler == "cosine" and r.train.warmup_ratio == 0.03 and r.train.weight_decay == 0.0
    assert r.group_by_modality_length is True
    assert dataclasses.is_dataclass(r) and isinstance(r, Recipe)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.learning_rate = 1.0  # type: ignore[misc]


def test_every_problem_is_reported_at_once_with_its_key_path():
    raw = minimal(learning_rat=1e-4, batch_size="four")
    raw["lora"] = {"rank": 8}
    raw["model"]["quantization"] = "nf5"
    found = problems(raw)
    text = "\n".join(found)
    assert len(found) == 4, found
    assert "train.learning_rat" in text and "learning_rate" in text  # did-you-mean
    assert "lora.rank" in text and "'r'" in text or "lora.r" in text  # a peft synonym
    assert "train.batch_size" in text
    assert "model.quantization: 'nf5' is not one of" in text and "nf4" in text


@pytest.mark.parametrize(
    "key, value",
    [("batch_size", 0), ("grad_accum", -1), ("learning_rate", 0), ("epochs", 0), ("max_steps", 0)],
)
def test_bounds(key, value):
    assert any(f"train.{key}" in p for p in problems(minimal(**{key: value})))


def test_overrides_use_yaml_values_and_list_indices():
    raw = apply_overrides(minimal(), ["train.max_steps=10", "data.train.0.path=other.json", "data.eval=[]", "lora.r=16"])
    r = parse_recipe(raw)
    assert r.train.max_steps == 10 and r.data.train[0].path == "other.json" and r.data.eval == () and r.lora.r == 16


def test_bad_overrides_are_recipe_errors():
    with pytest.raises(RecipeError, match="key.path=value"):
        apply_overrides(minimal(), ["train.max_steps"])
    with pytest.raises(RecipeError, match="not valid YAML"):
        apply_overrides(minimal(), ["train.max_steps=[1"])


def test_dump_then_load_gives_the_same_recipe(tmp_path):
    r = parse_recipe(minimal(seed=3))
    dump_recipe(r, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == r
    assert yaml.safe_load((tmp_path / "recipe.yaml").read_text())["train"]["seed"] == 3
    assert recipe_to_dict(again)["lora"]["r"] == 128  # every default written out


def test_missing_file_and_invalid_yaml(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x\n  dtype: [unclosed\n")
    with pytest.raises(RecipeError, match="line 4: invalid YAML"):
        load_recipe(bad)


def test_global_batch():
    t = parse_recipe(minimal(batch_size=2, grad_accum=8)).train
    assert isinstance(t, TrainConfig)
    assert t.global_batch() == 16 and t.global_batch(4) == 64


def test_choices_come_from_the_declarations():
    assert choices(ModelConfig, "quantization") == ("none", "nf4", "int8")
    assert "auto" in choices(ModelConfig, "dtype")
    with pytest.raises(TypeError):
        choices(ModelConfig, "name_or_path")


def test_describe_lists_every_key_with_type_default_and_help():
    lines = describe_fields()
    assert any(line.strip().startswith("lora.r (integer; default 128): LoRA rank") for line in lines)
    assert any(line.strip().startswith("data.train[].path (string; required)") for line in lines)
    section = describe_fields(section="train")
    assert section[0].startswith("train:") and all("train." in line or line.startswith("train:") for line in section)
    assert describe_fields(section="lora.r") == [line for line in lines if line.strip().startswith("lora.r ")]
    with pytest.raises(RecipeError, match="did you mean data.train"):
        describe_fields(section="data.trian")


def test_recipe_verb_prints_the_listing(capsys):
    from lora_llava.cli import main

    assert main(["recipe", "projector"]) == 0
    out = capsys.readouterr().out
    assert "projector.learning_rate" in out and "2e-05" in out
    assert main(["recipe", "nosuch"]) == 2
    assert "no such section or key" in capsys.readouterr().err
