"""A domain user's first day: the shipped recipes on replicas of the real layouts, portable run folders, offline order."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from lora_llava.check import check
from lora_llava.errors import DataError, ModelError
from lora_llava.recipe import load_recipe
from lora_llava.training.run import train
from tests import replicas

SMALL = [
    "model.quantization=none",
    "model.dtype=float32",
    "lora.r=8",
    "lora.alpha=16",
    "data.max_length=256",
    "train.max_steps=2",
    "train.batch_size=2",
    "train.grad_accum=1",
    "train.optimizer=adamw",
    "train.eval_steps=null",
]


def _shipped(name: str, tiny_model: Path, out: Path, data: list[str]):
    return load_recipe(name, [f"model.name_or_path={tiny_model}", f"train.output_dir={out}", *SMALL, *data])


def _replica(name: str, root: Path) -> list[str]:
    """Overrides pointing a shipped recipe at a replica of its dataset."""
    if name == "slake":
        replicas.slake(root)
        return [
            f"data.train.0.path={root / 'train.json'}",
            f"data.train.0.image_folder={root / 'imgs'}",
            f"data.eval.0.path={root / 'test.json'}",
            f"data.eval.0.image_folder={root / 'imgs'}",
        ]
    {"vqa_rad": replicas.vqa_rad, "vqa_rad_saved": replicas.vqa_rad_saved, "pathvqa": replicas.pathvqa}[name](root)
    return [f"data.train.0.path={root}", f"data.eval.0.path={root}"]


@pytest.mark.parametrize("name", ["vqa_rad", "vqa_rad_saved", "slake", "pathvqa"])
def test_shipped_recipe_checks_clean_and_trains_on_its_replica(name, tmp_path, tiny_model):
    recipe = _shipped(name.removesuffix("_saved"), tiny_model, tmp_path / "run", _replica(name, tmp_path / name))
    report = check(recipe)
    assert report.bad == [] and not report.failed
    expected = {"vqa_rad": (12, 8), "vqa_rad_saved": (12, 8), "slake": (8, 4), "pathvqa": (12, 6)}[name]  # splits, filters
    assert [c.records for c in report.datasets] == list(expected)
    run = train(recipe)
    assert (run / "adapter_model.safetensors").is_file()


def test_prompt_completion_set_trains_with_recipe_keys_only(tmp_path, tiny_model):
    root = replicas.prompt_completion(tmp_path / "pc")
    recipe = _shipped(
        "medical",
        tiny_model,
        tmp_path / "run",
        [f"data.train=[{{path: {root / 'train.jsonl'}, image_folder: {root / 'images'}}}]", "data.eval=[]"],
    )
    assert check(recipe).bad == []
    assert (train(recipe) / "adapter_model.safetensors").is_file()


def test_run_folder_works_from_any_folder(tmp_path, tiny_model, monkeypatch):
    """Trained with relative paths from one folder; predicted and evaluated from another."""
    from lora_llava.evaluate.generate import load_predictor
    from lora_llava.evaluate.run import evaluate_recipe

    first = tmp_path / "first"
    replicas.slake(first / "data" / "slake")
    monkeypatch.chdir(first)
    recipe = load_recipe("slake", [f"model.name_or_path={tiny_model}", "train.output_dir=runs/slake", *SMALL])
    run = train(recipe)
    assert run.is_absolute() and run == first / "runs" / "slake"
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["data"]["train"][0]["path"] == str(first / "data" / "slake" / "train.json")
    assert saved["data"]["eval"][0]["image_folder"] == str(first / "data" / "slake" / "imgs")
    assert saved["model"]["name_or_path"] == str(tiny_model) and saved["train"]["output_dir"] == str(run)
    assert json.loads((run / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    answer = load_predictor(run).predict([first / "data" / "slake" / "imgs" / "xmlab0" / "source.jpg"], "Is the heart enlarged?")
    assert isinstance(answer, str)
    reports = evaluate_recipe(load_recipe(run / "recipe.yaml", ["train.batch_size=4"]))
    report = next(iter(reports.values()))
    assert report["n"] == 4 and set(report["groups"]["q_lang"]) == {"en"}  # the English filter held
    assert (run / "eval" / "metrics.json").is_file()


def test_missing_data_is_reported_before_any_hub_access(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    recipe = load_recipe(
        "medical", [f"train.output_dir={tmp_path / 'run'}", f"data.train.0.path={tmp_path / 'nothing.json'}", "data.eval=[]"]
    )
    assert recipe.model.name_or_path == "llava-hf/llava-1.5-13b-hf"
    start = time.monotonic()
    with pytest.raises(DataError, match=r"data.train.0.path: .*nothing.json: data file not found"):
        train(recipe)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "run").exists()


def test_unreachable_hub_fails_in_seconds_naming_the_id(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    from lora_llava.model import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(hub, "_reachable", {})
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "d.json").write_text("[]", encoding="utf-8")
    overrides = [
        f"train.output_dir={tmp_path / 'run'}",
        f"data.train.0.path={tmp_path / 'd.json'}",
        f"data.train.0.image_folder={tmp_path}",
    ]
    recipe = load_recipe("medical", [*overrides, "data.eval=[]"])
    start = time.monotonic()
    with pytest.raises(ModelError) as e:
        train(recipe)
    assert time.monotonic() - start < 10
    message = str(e.value)
    assert message.startswith(
        "model.name_or_path: llava-hf/llava-1.5-13b-hf is a hub id, but the Hugging Face Hub cannot be reached"
    )
    assert "huggingface-cli download llava-hf/llava-1.5-13b-hf --local-dir DIR" in message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        train(recipe)


NOT_SOURCES = (".git", "runs", "build", "dist", "*.egg-info", "__pycache__", ".venv", "venv", ".pytest_cache")


@pytest.mark.skipif(os.environ.get("LORA_LLAVA_SKIP_INSTALL") == "1", reason="install test turned off")
def test_non_editable_install_runs_demo_and_predict_from_unrelated_folders(tmp_path):
    """pip install (not -e) into a fresh venv; the demo from one folder, predict on its run from a third."""
    import shutil
    import subprocess
    import sys

    from tests.helpers import ROOT

    # A wheel built from a copy of the sources (a build writes build/ and egg-info beside them), as `pip install .` would.
    src = shutil.copytree(ROOT, tmp_path / "src", symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
        check=True,
        env=env,
        timeout=600,
    )
    wheel = next((tmp_path / "dist").glob("lora_llava-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    py = venv / "bin" / "python"
    # --no-deps: the dependencies are those of this interpreter (system site packages), installed already.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, env=env, timeout=600)
    cli = str(venv / "bin" / "lora-llava")
    somewhere, third = tmp_path / "somewhere", tmp_path / "third"
    somewhere.mkdir()
    third.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import lora_llava; print(lora_llava.__file__)"], cwd=third, env=env, capture_output=True, text=True
    )
    assert str(venv) in where.stdout  # the installed copy, not the source tree
    demo = subprocess.run(
        [cli, "demo", "--workdir", "w", "train.max_steps=4"], cwd=somewhere, env=env, capture_output=True, text=True, timeout=900
    )
    assert demo.returncode == 0, demo.stderr[-2000:]
    run = somewhere / "w" / "run"
    assert (run / "adapter_model.safetensors").is_file(), demo.stdout[-2000:]
    data = somewhere / "w" / "data"
    pred = subprocess.run(
        [
            cli,
            "predict",
            "--model",
            str(run),
            "--data",
            str(data / "test.json"),
            "--image-folder",
            str(data / "images"),
            "--output",
            "preds.jsonl",
            "--limit",
            "3",
            "--max-new-tokens",
            "4",
        ],
        cwd=third,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pred.returncode == 0, pred.stderr[-2000:]
    rows = [json.loads(line) for line in (third / "preds.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("answer" in r for r in rows)
    listing = subprocess.run([cli, "recipes"], cwd=third, env=env, capture_output=True, text=True)
    assert "vqa_rad" in listing.stdout and str(venv) in listing.stdout
