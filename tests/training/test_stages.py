"""Two stages in one `lora-llava train` command: stage 2 starts from what stage 1 wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import ROOT, recipe_dict, run_cli, write_recipe

STAGE1 = str(ROOT / "recipes/stage1_align.yaml")
STAGE2 = str(ROOT / "recipes/medical.yaml")


def _overrides(parts, captions: Path, shapes: Path, root: Path) -> list[str]:
    clip, llm = parts
    return [
        f"1:model.vision_tower={clip}",
        f"1:model.language_model={llm}",
        f"1:data.train.0.path={captions / 'captions.json'}",
        f"1:data.train.0.image_folder={captions / 'images'}",
        f"1:train.output_dir={root / 'stage1'}",
        "1:train.learning_rate=1e-2",
        f"2:data.train.0.path={shapes / 'train.json'}",
        f"2:data.train.0.image_folder={shapes / 'images'}",
        "2:data.eval=[]",
        "2:lora.r=16",  # the tiny LLM's layers are narrower than rank 128
        f"2:train.output_dir={root / 'stage2'}",
        "2:train.learning_rate=1e-2",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.grad_accum=1",
    ]


@pytest.fixture(scope="module")
def two_stages(tmp_path_factory, tiny_parts, captions, shapes):
    """recipes/stage1_align.yaml (composed) then recipes/medical.yaml (QLoRA), one command, as the README shows."""
    root = tmp_path_factory.mktemp("pipeline")
    args = _overrides(tiny_parts, captions, shapes, root)
    result = run_cli("train", STAGE1, STAGE2, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, args, result


def test_both_stages_run_and_stage2_reads_stage1(two_stages):
    root, _, result = two_stages
    stage1, stage2 = root / "stage1", root / "stage2"
    assert (stage1 / "projector.safetensors").is_file() and (stage1 / "model" / "config.json").is_file()
    assert (stage2 / "adapter_model.safetensors").is_file()
    recipe = yaml.safe_load((stage2 / "recipe.yaml").read_text())
    assert recipe["model"]["name_or_path"] == str(stage1 / "model")  # stage 1 composed: stage 2 trains that model
    assert recipe["model"]["projector"] == str(stage1)
    assert recipe["model"]["vision_tower"] is None and recipe["model"]["quantization"] == "nf4"
    assert "stage 1/2 (align)" in result.stdout and "stage 2/2 (instruct)" in result.stdout
    assert f"model.name_or_path = {stage1 / 'model'}" in result.stdout


def test_stage2_trained_lora_and_the_aligned_projector(two_stages):
    root, _, _ = two_stages
    aligned = load_file(str(root / "stage1" / "projector.safetensors"))
    adapter = load_file(str(root / "stage2" / "adapter_model.safetensors"))
    assert any("lora_A" in k for k in adapter)
    for k, v in aligned.items():
        saved = next(t for name, t in adapter.items() if name.endswith(f"multi_modal_projector.{k}"))
        assert saved.shape == v.shape and not torch.equal(saved.float(), v.float())


def test_same_command_again_skips_finished_stages(two_stages, capsys):
    from lora_llava.training.stages import train_stages

    root, args, _ = two_stages
    mtime = (root / "stage2" / "adapter_model.safetensors").stat().st_mtime_ns
    assert train_stages([STAGE1, STAGE2], args) == [root / "stage1", root / "stage2"]
    assert capsys.readouterr().out.count("holds this finished run; skipped") == 2
    assert (root / "stage2" / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_overrides_apply_to_all_stages_or_to_the_numbered_one():
    from lora_llava.training.stages import split_overrides

    assert split_overrides(["a.b=1", "2:c.d=2", "1:e=3"], 2) == [["a.b=1", "e=3"], ["a.b=1", "c.d=2"]]


def test_stage_numbers_and_output_folders_are_checked_first(tiny_parts, captions, shapes, tmp_path):
    from lora_llava.errors import RecipeError
    from lora_llava.training.stages import plan_stages

    args = _overrides(tiny_parts, captions, shapes, tmp_path)
    with pytest.raises(RecipeError, match="there is no stage 3"):
        plan_stages([STAGE1, STAGE2], args + ["3:train.seed=1"])
    with pytest.raises(RecipeError, match="stages 1 and 2 both write to"):
        plan_stages([STAGE1, STAGE2], args + [f"train.output_dir={tmp_path / 'same'}"])


def test_stage2_on_another_model_than_stage1_is_refused(tiny_model, captions, shapes, tmp_path):
    from lora_llava.errors import RecipeError
    from lora_llava.training.stages import plan_stages

    align = recipe_dict(tiny_model, captions, tmp_path / "s1", stage="align")
    align["data"] = {"train": [{"path": str(captions / "captions.json"), "image_folder": str(captions / "images")}]}
    first = write_recipe(tmp_path / "s1.yaml", align)
    second = write_recipe(tmp_path / "s2.yaml", recipe_dict(tmp_path / "other-model", shapes, tmp_path / "s2"))
    with pytest.raises(RecipeError, match="the projector fits that model only"):
        plan_stages([first, second], [])
    recipes, _ = plan_stages([first, second], [f"model.name_or_path={tiny_model}"])
    assert recipes[1].model.name_or_path == str(tiny_model) and recipes[1].model.projector == str(tmp_path / "s1")
    with pytest.raises(RecipeError, match="follows a stage-2 \\(instruct\\) run"):
        plan_stages([second, first], [f"model.name_or_path={tiny_model}"])


def test_missing_stage2_data_stops_before_stage1_writes_anything(tiny_parts, captions, shapes, tmp_path):
    from lora_llava.errors import DataError
    from lora_llava.training.stages import train_stages

    args = _overrides(tiny_parts, captions, shapes, tmp_path) + ["2:data.train.0.path=/no/such/train.json"]
    with pytest.raises(DataError, match=r"/no/such/train.json: data file not found \(stage 2\)"):
        train_stages([STAGE1, STAGE2], args)
    assert not (tmp_path / "stage1").exists()
