"""Crash-safe runs: SIGKILL mid-step and mid-save, SIGTERM, non-finite steps, run-folder rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, recipe_dict, run_cli, write_recipe

KILL_AT = Path(__file__).parent / "faults" / "kill_at.py"
STEPS = 6


def _recipe(tiny_model, shapes, out: Path, **train) -> dict:
    return recipe_dict(
        tiny_model, shapes, out, train={"max_steps": STEPS, "save_steps": 2, "save_total_limit": 2, "batch_size": 2, **train}
    )


def _fault(where: str, step: int, signame: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(KILL_AT), where, str(step), signame, "--", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _assert_same_adapter(a: Path, b: Path) -> None:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model, shapes) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    recipe = write_recipe(out.parent / "recipe.yaml", _recipe(tiny_model, shapes, out))
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-6"]  # keep the last K=2
    return out


@pytest.mark.parametrize("where, step, resumed_from", [("step", 5, 4), ("save", 4, 2)])
def test_sigkill_then_same_command_resumes_to_the_same_adapter(
    reference, tiny_model, shapes, tmp_path, where, step, resumed_from
):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out))
    killed = _fault(where, step, "SIGKILL", "train", str(recipe))
    assert killed.returncode == -signal.SIGKILL
    if where == "save":  # the half-written checkpoint never appears; the previous one is whole
        assert not (out / f"checkpoint-{step}").exists()
        assert (out / ".staging").exists()
    assert (out / f"checkpoint-{resumed_from}" / "trainer_state.json").is_file()
    assert not (out / "adapter_model.safetensors").exists()

    again = run_cli("train", str(recipe))
    assert again.returncode == 0, again.stderr[-2000:]
    assert not (out / ".staging").exists()
    _assert_same_adapter(reference, out)
    ref, got = _losses(reference), _losses(out)
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):  # the curve after the resume continues the uninterrupted one
        assert got[s] == pytest.approx(ref[s], rel=1e-4, abs=1e-5), s


def test_sigterm_saves_at_the_step_boundary_and_says_how_to_resume(reference, tiny_model, shapes, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out))
    stopped = _fault("step", 3, "SIGTERM", "train", str(recipe))
    assert stopped.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM at step 3" in stopped.stderr and "run the same command again to resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out / "checkpoint-3" / "training_args.bin").exists()  # no pickles in run folders
    again = run_cli("train", str(recipe))
    assert again.returncode == 0, again.stderr[-2000:]
    _assert_same_adapter(reference, out)


def test_resume_options_and_recipe_changes(reference, tiny_model, shapes, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out))
    assert _fault("step", 5, "SIGKILL", "train", str(recipe)).returncode == -signal.SIGKILL
    before = sorted(p.name for p in out.iterdir())

    changed = run_cli("train", str(recipe), "train.learning_rate=0.5", "lora.r=4")
    assert changed.returncode == 2
    assert "holds a run of a different recipe (changed: lora.r, train.learning_rate)" in changed.stderr
    refused = run_cli("train", str(recipe), "--no-resume")
    assert refused.returncode == 2 and "--no-resume" in refused.stderr
    missing = run_cli("train", str(recipe), "--resume", str(out / "checkpoint-99"))
    assert missing.returncode == 2 and "is not a complete checkpoint" in missing.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # refusals leave the folder as it was

    chosen = run_cli("train", str(recipe), "--resume", str(out / "checkpoint-2"))
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    _assert_same_adapter(reference, out)
    finished = run_cli("train", str(recipe))
    assert finished.returncode == 2 and "holds a finished run" in finished.stderr


def test_foreign_folder_is_refused_without_overwrite(tiny_model, shapes, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out, max_steps=1))
    refused = run_cli("train", str(recipe))
    assert refused.returncode == 2 and "holds no lora-llava run" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    replaced = run_cli("train", str(recipe), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert not (out / "notes.txt").exists() and (out / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_steps_stop_naming_the_step_or_are_skipped(tiny_model, shapes, tmp_path, monkeypatch, mode):
    from lora_llava.errors import TrainingError
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train
    from lora_llava.training.trainer import LlavaTrainer

    original = LlavaTrainer.compute_loss

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step + 1 == 3 else loss

    monkeypatch.setattr(LlavaTrainer, "compute_loss", poisoned)
    out = tmp_path / "run"
    recipe = parse_recipe(_recipe(tiny_model, shapes, out, max_steps=4, on_nonfinite=mode))
    if mode == "stop":
        with pytest.raises(TrainingError, match="non-finite gradients at step 3"):
            train(recipe)
        assert (out / "checkpoint-2" / "trainer_state.json").is_file()  # the last good checkpoint
        assert not (out / "adapter_model.safetensors").exists()
    else:
        train(recipe)
        state = load_file(str(out / "adapter_model.safetensors"))
        assert all(torch.isfinite(v).all() for v in state.values())
