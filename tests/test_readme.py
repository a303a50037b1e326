"""The README's examples do what they say, as written, outside the source tree."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests import replicas
from tests.helpers import ROOT, recipe_dict

README = (ROOT / "README.md").read_text(encoding="utf-8")


def _block(language: str, containing: str) -> str:
    blocks = re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)
    return next(b for b in blocks if containing in b)


def test_the_mixture_example_loads_as_written(tmp_path, monkeypatch, tiny_processor):
    from lora_llava.data.build import build_dataset
    from lora_llava.recipe import parse_recipe

    data = yaml.safe_load(_block("yaml", "data/sharegpt_text.jsonl"))["data"]
    monkeypatch.chdir(tmp_path)
    replicas.slake(tmp_path / "data" / "slake")
    replicas.vqa_rad(tmp_path / "data" / "vqa_rad")
    chats = [
        {"id": f"t{i}", "conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": str(i)}]}
        for i in range(6)
    ]
    (tmp_path / "data" / "sharegpt_text.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    raw = recipe_dict(tmp_path / "model", tmp_path, tmp_path / "out")
    raw["data"].update(data)
    ds = build_dataset(parse_recipe(raw, "README"), tiny_processor)
    assert ds.report.counts == {"data/slake/train.json": 8, "data/vqa_rad": 12, "data/sharegpt_text.jsonl": 6}
    assert ds.report.bad == []
    assert len(ds) == 8 + 2 * 12 + 6  # weight 2.0 repeats VQA-RAD's train split; its test split stays out


@pytest.mark.e2e
def test_the_library_example_runs_outside_the_repo(tmp_path, monkeypatch, capsys):
    code = _block("python", "lora_llava.make_tiny(")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "runs" / "library" / "adapter_model.safetensors").is_file()
    assert capsys.readouterr().out.strip()  # the answer it printed
