"""train.report_to: a tracker gets the run's logs under the run's name; a missing one is one line before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_llava.recipe.parse import parse_recipe
from tests.helpers import recipe_dict, write_recipe


def test_the_run_name_is_the_output_folder_unless_the_recipe_names_it(tmp_path):
    from lora_llava.training.run import training_arguments

    plain = parse_recipe(recipe_dict(Path("m"), Path("d"), tmp_path / "medical_r64"))
    named = parse_recipe(recipe_dict(Path("m"), Path("d"), tmp_path / "x", train={"run_name": "r64", "report_to": "none"}))
    assert training_arguments(plain, tmp_path / "medical_r64", has_eval=False).run_name == "medical_r64"
    assert training_arguments(named, tmp_path / "x", has_eval=False).run_name == "r64"
    assert training_arguments(plain, tmp_path / "medical_r64", has_eval=False).report_to == []


def test_an_unknown_tracker_is_a_recipe_error(tmp_path):
    from lora_llava.errors import RecipeError

    with pytest.raises(RecipeError, match="train.report_to: 'neptune' is not one of 'none', 'tensorboard', 'wandb', 'mlflow'"):
        parse_recipe(recipe_dict(Path("m"), Path("d"), tmp_path / "x", train={"report_to": "neptune"}))


@pytest.mark.parametrize("tracker", ["wandb", "mlflow", "tensorboard"])
def test_a_tracker_not_installed_is_one_line_naming_the_extra(tracker, tiny_model, shapes, tmp_path, monkeypatch, capsys):
    from lora_llava.cli import main
    from lora_llava.training import tracking

    monkeypatch.setattr(tracking, "_installed", lambda: dict.fromkeys(("tensorboard", "wandb", "mlflow"), lambda: False))
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_model, shapes, out, train={"report_to": tracker}))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f'lora-llava train: error: train.report_to: {tracker} is not installed: pip install "lora-llava[{tracker}]" '
        "(or set train.report_to: none)"
    ]
    assert not out.exists()  # refused before the run folder was made


def test_tensorboard_gets_event_files_and_the_log_gets_one_line_per_step(tiny_model, shapes, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from lora_llava.training.run import train

    out = tmp_path / "run"
    train(parse_recipe(recipe_dict(tiny_model, shapes, out, train={"report_to": "tensorboard"})))
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert "train/loss" in scalars and "train/learning_rate" in scalars
    # The tests' stderr is no terminal: no tqdm bar, one line per logged step (train.logging_steps: 1).
    err = capsys.readouterr().err
    steps = [line for line in err.splitlines() if line.startswith("step ") and " loss " in line]
    assert [s.split()[1] for s in steps] == ["1/3", "2/3", "3/3"], err[-2000:]
    assert all(" lr " in s and " elapsed " in s for s in steps)
    assert "/3 [" not in err  # no redraw of tqdm's training bar ("2/3 [00:01<00:00, ...]")
