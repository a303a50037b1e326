"""Crash-safe runs: SIGKILL mid-step and mid-save, SIGTERM, non-finite steps, run-folder rules."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, recipe_dict, run_cli, run_main, write_recipe

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
    return _reference(tmp_path_factory, tiny_model, shapes)


@pytest.fixture(scope="module")
def reference_next(tmp_path_factory, tiny_next, shapes) -> Path:
    """The uninterrupted run of the tiny LLaVA-NeXT."""
    return _reference(tmp_path_factory, tiny_next, shapes)


def _reference(tmp_path_factory, tiny_model, shapes) -> Path:
    out = tmp_path_factory.mktemp("ref") / "run"
    recipe = write_recipe(out.parent / "recipe.yaml", _recipe(tiny_model, shapes, out))
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-6"]  # keep the last K=2
    return out


@pytest.mark.parametrize(
    "where, step, resumed_from, family", [("step", 5, 4, "llava"), ("save", 4, 2, "llava"), ("step", 5, 4, "llava_next")]
)
def test_sigkill_then_same_command_resumes_to_the_same_adapter(request, shapes, tmp_path, where, step, resumed_from, family):
    next_ = family == "llava_next"  # NeXT's image_newline resumes with the adapter it is saved in
    reference = request.getfixturevalue("reference_next" if next_ else "reference")
    tiny_model = request.getfixturevalue("tiny_next" if next_ else "tiny_model")
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

    changed = run_main("train", str(recipe), "train.learning_rate=0.5", "lora.r=4")  # refusals: in this process
    assert changed.returncode == 2
    assert "holds a run of a different recipe (changed: lora.r, train.learning_rate)" in changed.stderr
    refused = run_main("train", str(recipe), "--no-resume")
    assert refused.returncode == 2 and "--no-resume" in refused.stderr
    missing = run_main("train", str(recipe), "--resume", str(out / "checkpoint-99"))
    assert missing.returncode == 2 and "is not a complete checkpoint" in missing.stderr
    assert sorted(p.name for p in out.iterdir()) == before  # refusals leave the folder as it was

    chosen = run_cli("train", str(recipe), "--resume", str(out / "checkpoint-2"))
    assert chosen.returncode == 0, chosen.stderr[-2000:]
    _assert_same_adapter(reference, out)
    finished = run_main("train", str(recipe))
    assert finished.returncode == 2 and "holds a finished run" in finished.stderr


def test_foreign_folder_is_refused_without_overwrite(tiny_model, shapes, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out, max_steps=1))
    refused = run_main("train", str(recipe))
    assert refused.returncode == 2 and "holds no lora-llava run" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    replaced = run_main("train", str(recipe), "--overwrite")
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


def _interrupted_copy(reference: Path, out: Path) -> Path:
    """The reference run as a kill right after its last checkpoint leaves it: checkpoints, recipe, metrics."""
    out.mkdir(parents=True)
    for name in ("recipe.yaml", "metrics.jsonl", "checkpoint-4", "checkpoint-6"):
        src = reference / name
        shutil.copytree(src, out / name) if src.is_dir() else shutil.copy(src, out / name)
    return out


def _damage(p: Path, how: str) -> None:
    data = p.read_bytes()
    if how == "truncate":
        p.write_bytes(data[: len(data) // 2])
    else:  # the same size, other bytes
        p.write_bytes((bytes(range(255, -1, -1)) * (len(data) // 256 + 1))[: len(data)])


STRUCTURED = (".json", ".safetensors", ".pt", ".pth", ".yaml")


def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one(reference, tiny_model, shapes, tmp_path, caplog):
    """Each file of checkpoint-6 damaged in turn: the run continues from checkpoint-4 and ends as the uninterrupted one.

    Alongside, the run folder's own records are torn as a kill or a full disk leaves them (the last line of
    metrics.jsonl, an empty or half-written recipe.yaml): neither may block the resume.
    """
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    files = sorted(p.name for p in (reference / "checkpoint-6").iterdir())
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= set(files)
    for i, name in enumerate(files):
        out = _interrupted_copy(reference, tmp_path / f"run-{i}")
        how = "garbage" if name.endswith(STRUCTURED) and i % 2 else "truncate"
        _damage(out / "checkpoint-6" / name, how)
        damaged = (out / "checkpoint-6" / name).read_bytes()
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"step": 7, "lo')  # a kill mid-line
        (out / "recipe.yaml").write_text(["", "stage: instruct\nmodel: {name_or_pa"][i % 2])
        caplog.clear()
        with caplog.at_level("WARNING", logger="lora_llava"):
            train(parse_recipe(_recipe(tiny_model, shapes, out)))
        notices = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
        assert len(notices) == 1 and f"checkpoint-6 is damaged ({name}: " in notices[0], (name, how, notices)
        assert notices[0].endswith("kept as damaged-checkpoint-6; resuming from checkpoint-4"), notices
        _assert_same_adapter(reference, out)
        assert (out / "damaged-checkpoint-6" / name).read_bytes() == damaged  # set aside, never deleted
        assert sorted(_losses(out)) == list(range(1, STEPS + 1))


def test_resume_to_a_damaged_checkpoint_is_one_line_naming_the_file(reference, tiny_model, shapes, tmp_path, capsys):
    from lora_llava.cli import main

    out = _interrupted_copy(reference, tmp_path / "run")
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out))
    _damage(out / "checkpoint-4" / "optimizer.pt", "truncate")
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["train", str(recipe), "--resume", str(out / "checkpoint-4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-llava train: error: --resume: "), err
    assert f"{out / 'checkpoint-4'} is not a complete checkpoint (optimizer.pt: " in err[0] and "truncated" in err[0]
    assert sorted(p.name for p in out.rglob("*")) == before  # refused before anything changed


def test_a_refused_pickle_in_a_checkpoint_is_one_line_naming_the_file(reference, tiny_model, shapes, tmp_path, capsys):
    """A checkpoint file rebuilt to hold a Python object (its manifest rewritten too): refused, named, exit 1."""
    from lora_llava.cli import main
    from lora_llava.runs import write_manifest

    class Payload:
        def __reduce__(self):
            return (os.getpid, ())

    out = _interrupted_copy(reference, tmp_path / "run")
    rng = out / "checkpoint-6" / "rng_state.pth"
    torch.save({"python": None, "extra": Payload()}, rng)
    write_manifest(out / "checkpoint-6")
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out))
    assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lora-llava train:")]
    assert lines == [
        f"lora-llava train: error: {rng}: holds pickled Python objects, not only tensors, and was refused "
        "(nothing in it ran); resume from a checkpoint you trust"
    ], err
    assert not (out / "adapter_model.safetensors").exists()


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tiny_model, shapes, tmp_path, monkeypatch, capsys):
    from lora_llava.cli import main

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):  # the disk fills up while the optimizer state of step 4 is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", _recipe(tiny_model, shapes, out, max_steps=4))
    assert main(["train", str(recipe)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-llava train:")]
    assert err == [
        f"lora-llava train: error: no space left on device while saving checkpoint-4 in {out}: the partial save was "
        f"removed and the last good checkpoint {out / 'checkpoint-2'} is kept; free some space and run the same "
        "command again to resume"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl", "recipe.yaml"]
    from lora_llava.runs import checkpoint_problem

    assert checkpoint_problem(out / "checkpoint-2") is None


def test_non_finite_weights_stop_the_run_before_anything_saves_them(tiny_model, shapes, tmp_path, monkeypatch):
    """Finite gradients, yet an update that overflows: the run stops at that step, naming it."""
    from lora_llava.errors import TrainingError
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    real_step = torch.optim.AdamW.step
    steps = []

    def overflowing(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="trained weights became non-finite at step 3") as e:
        train(parse_recipe(_recipe(tiny_model, shapes, out, max_steps=4)))
    assert f"the last good checkpoint {out / 'checkpoint-2'} is kept" in str(e.value)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()


def test_the_final_save_refuses_non_finite_weights(tmp_path):
    """The weights gathered for the final save (ZeRO-3 / FSDP) are checked once more: no NaN adapter, ever."""
    from lora_llava.errors import TrainingError
    from lora_llava.runs import RunPaths
    from lora_llava.training.run import save_outputs

    state = {"a": torch.ones(3), "b": torch.tensor([0.0, float("nan")])}
    with pytest.raises(TrainingError, match="non-finite at step 6.*no checkpoint had been saved yet"):
        save_outputs(None, None, None, RunPaths(tmp_path), state_dict=state, step=6)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_the_final_save_leaves_no_half_adapter(tmp_path, tiny_model, shapes):
    from lora_llava.errors import TrainingError
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.runs import RunPaths
    from lora_llava.training.run import save_outputs

    class FillsTheDisk(torch.nn.Linear):
        def save_pretrained(self, folder, state_dict=None):
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"\0" * 10)  # part written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    recipe = parse_recipe(_recipe(tiny_model, shapes, tmp_path))
    with pytest.raises(TrainingError) as e:
        save_outputs(FillsTheDisk(2, 2), None, recipe, RunPaths(tmp_path), step=6)
    assert str(e.value).startswith(f"no space left on device while saving the final adapter in {tmp_path}: ")
    assert "no checkpoint had been saved yet" in str(e.value)
    assert list(tmp_path.iterdir()) == []
