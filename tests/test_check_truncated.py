"""`check` names the samples it would truncate to data.max_length, the first five as for bad samples, all in --json."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.helpers import recipe_dict, run_cli, write_recipe

ROUND = [{"from": "human", "value": "What colour is the shape?"}, {"from": "gpt", "value": "red " * 8}]


def _data(root, n_long: int, n_short: int = 3):
    """`n_long` three-round samples (only the first round fits max_length 96) among short ones."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(root / "images" / "a.png")
    first = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": f"short-{i}", "image": "a.png", "conversations": first} for i in range(n_short)]
    records += [{"id": f"long-{i}", "image": "a.png", "conversations": first + ROUND * 2} for i in range(n_long)]
    (root / "train.json").write_text(json.dumps(records))
    return root


def _check(tmp_path, tiny_model, tiny_processor, n_long: int):
    from lora_llava.check import check
    from lora_llava.recipe.parse import load_recipe

    data = _data(tmp_path / "data", n_long)
    spec = [{"path": str(data / "train.json"), "image_folder": str(data / "images")}]
    raw = recipe_dict(tiny_model, data, tmp_path / "run", data={"train": spec, "max_length": 96})
    return check(load_recipe(write_recipe(tmp_path / "recipe.yaml", raw)), processor=tiny_processor, workers=0), data


@pytest.mark.parametrize("n_long", [0, 2, 5, 7])
def test_truncated_samples_are_named_first_five(tmp_path, tiny_model, tiny_processor, n_long):
    report, data = _check(tmp_path, tiny_model, tiny_processor, n_long)
    path = str(data / "train.json")
    assert report.truncated == n_long
    assert [sid for _, _, sid in report.truncated_samples] == [f"long-{i}" for i in range(n_long)]
    text = report.format()
    named = [line.strip() for line in text.splitlines() if line.startswith(f"    {path}: sample ")]
    assert named == [f"{path}: sample long-{i}" for i in range(min(n_long, 5))]
    assert ("truncated to data.max_length" in text) == (n_long > 0)
    assert (f"... and {n_long - 5:,} more" in text) == (n_long > 5)
    saved = report.to_dict()["truncated_samples"]
    assert saved == [{"split": "train", "path": path, "id": f"long-{i}"} for i in range(n_long)]
    assert not report.failed  # truncation keeps the sample: it is no defect


def test_check_cli_prints_and_saves_the_truncated_ids(tmp_path, tiny_model):
    data = _data(tmp_path / "data", n_long=6)
    spec = [{"path": str(data / "train.json"), "image_folder": str(data / "images")}]
    raw = recipe_dict(tiny_model, data, tmp_path / "run", data={"train": spec, "max_length": 96})
    result = run_cli("check", str(write_recipe(tmp_path / "recipe.yaml", raw)), "--json", str(tmp_path / "r.json"))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    lines = result.stdout.splitlines()
    at = lines.index("truncated to data.max_length (image tokens kept): 6 samples")
    assert lines[at + 1 : at + 7] == [f"    {data / 'train.json'}: sample long-{i}" for i in range(5)] + ["    ... and 1 more"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["truncated"] == 6 and [t["id"] for t in saved["truncated_samples"]] == [f"long-{i}" for i in range(6)]
