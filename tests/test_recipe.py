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


def _every_number_field():
    """(section, key) of every numeric recipe field, found from the declarations."""
    import typing

    from lora_llava.recipe.schema import DataConfig, DatasetSpec, LoraConfig, ProjectorConfig

    found = []
    for section, cls in (("train", TrainConfig), ("lora", LoraConfig), ("projector", ProjectorConfig), ("data", DataConfig)):
        hints = typing.get_type_hints(cls)
        found += [(section, f.name) for f in dataclasses.fields(cls) if hints[f.name] in (int, float, int | None, float | None)]
    hints = typing.get_type_hints(DatasetSpec)
    found += [("data.train.0", f.name) for f in dataclasses.fields(DatasetSpec) if hints[f.name] in (float | None, int | None)]
    return found


def _with(section: str, key: str, value) -> dict:
    raw = minimal()
    raw.setdefault("lora", {})
    raw.setdefault("projector", {})
    return apply_overrides(raw, [f"{section}.{key}={value}"])


@pytest.mark.parametrize("section, key", _every_number_field())
def test_every_number_is_finite_and_bounded(section, key):
    for value in (".nan", ".inf", "-.inf", "1e999"):
        found = problems(_with(section, key, value))
        assert len(found) == 1 and found[0].startswith(f"{section}.{key}: "), (value, found)
        assert "finite" in found[0] or "expected an integer" in found[0], found  # ints refuse floats outright
    huge = problems(_with(section, key, 10**12))
    assert len(huge) == 1 and ("must be at most" in huge[0] or "must be less than" in huge[0]), huge  # typos caught


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.learning_rate", 2, "must be at most 1, got 2.0"),
        ("projector.learning_rate", 10, "must be at most 1, got 10.0"),
        ("train.warmup_ratio", 1, "must be less than 1, got 1.0"),  # 1 would be read as one warmup step
        ("lora.dropout", 1, "must be less than 1, got 1.0"),
        ("train.seed", -1, "must be at least 0, got -1"),
        ("data.max_length", 2**21, "must be at most 1048576"),
        ("train.epochs", "'nan'", "must be a finite number, got nan"),  # a quoted string that float() reads
    ],
)
def test_sane_ranges(key, value, message):
    section, name = key.rsplit(".", 1)
    found = problems(_with(section, name, value))
    assert found == [f"{key}: {message}"] or (len(found) == 1 and message in found[0]), found


@pytest.mark.parametrize(
    "text, key, line, first",
    [
        ("train:\n  seed: 1\n  seed: 2\n", "seed", 3, 2),
        ("train: {seed: 1}\nmodel: {}\ntrain: {seed: 2}\n", "train", 3, 1),
        ("lora: {r: 4, alpha: 8, r: 16}\n", "r", 1, 1),
        ("data:\n  train:\n    - path: a.json\n      path: b.json\n", "path", 4, 3),
    ],
)
def test_duplicate_keys_name_both_lines(tmp_path, text, key, line, first):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.problems == [f"line {line}: duplicate key '{key}' (first at line {first})"]


def test_merge_keys_may_be_overridden_and_overrides_refuse_duplicates_too(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "base: &base {output_dir: runs/x, seed: 1}\n"
        "model: {name_or_path: llava-hf/llava-1.5-7b-hf}\n"
        "data: {train: [{path: d.json}]}\n"
        "train: {<<: *base, seed: 2}\n"
    )
    with pytest.raises(RecipeError, match="base: unknown key"):  # the anchor's key itself is not a recipe key
        load_recipe(path)
    with pytest.raises(RecipeError, match="duplicate key 'seed'"):
        apply_overrides(minimal(), ["train={seed: 1, seed: 2}"])


@pytest.mark.parametrize(
    "data, message",
    [
        ("train: {seed: 1}\n# caf\xe9\n".encode("latin-1"), "line 2: not UTF-8 text (invalid continuation byte at byte 22)"),
        (b"\xef\xbb\xbftrain: {seed: 1}\n\x00\x00", "line 2: not a text file (character #x0000)"),  # a BOM is fine, NULs not
        (("x: " + "[" * 60 + "]" * 60 + "\n").encode(), "line 1: nested more than 50 levels deep"),
        (("a:\n" + "".join(" " * i + f"k{i}:\n" for i in range(1, 60))).encode(), "line 50: nested more than 50 levels deep"),
    ],
)
def test_undecodable_or_absurd_files_are_one_line(tmp_path, data, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert e.value.problems == [message]


def test_the_resolved_recipe_is_written_atomically(tmp_path, monkeypatch):
    import lora_llava.io as io

    path = tmp_path / "recipe.yaml"
    path.write_text("the previous recipe")

    def full_disk(f, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full_disk)
    with pytest.raises(OSError):
        dump_recipe(parse_recipe(minimal()), path)
    assert path.read_text() == "the previous recipe"
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]
