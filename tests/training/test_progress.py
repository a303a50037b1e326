"""Progress in a log file: one line per logged step, no tqdm bar; the bar stays on a terminal."""

from __future__ import annotations

import io
import re

from transformers import TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from lora_llava.training.progress import ProgressLines, progress_line, show_bar, use_progress_lines


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_the_bar_is_shown_on_a_terminal_only(monkeypatch):
    monkeypatch.delenv("LORA_LLAVA_PROGRESS", raising=False)
    assert show_bar(_Stream(tty=True)) is True
    assert show_bar(_Stream(tty=False)) is False
    monkeypatch.setenv("LORA_LLAVA_PROGRESS", "0")  # a terminal, but lines asked for
    assert show_bar(_Stream(tty=True)) is False


def test_a_training_log_is_one_line_with_step_loss_lr_and_elapsed():
    logs = {"loss": 1.23456, "grad_norm": 0.5, "learning_rate": 2e-4, "epoch": 0.26}
    assert progress_line(20, 300, logs, 3723.9) == "step 20/300  loss 1.2346  lr 2.00e-04  elapsed 1:02:03"


def test_an_eval_log_lists_what_it_holds():
    line = progress_line(300, 300, {"eval_loss": 3.75161, "eval_runtime": 1.3565, "epoch": 7.9}, 61.0)
    assert line == "step 300/300  eval_loss 3.752  eval_runtime 1.357  elapsed 0:01:01"


def test_the_callback_prints_one_line_per_log_on_the_main_process():
    stream, now = _Stream(tty=False), iter([100.0, 112.5, 130.0])
    callback = ProgressLines(stream=stream, clock=lambda: next(now))
    state, control = TrainerState(max_steps=30, global_step=0), TrainerControl()
    callback.on_train_begin(None, state, control)
    for step, loss in ((10, 2.5), (20, 2.25)):
        state.global_step = step
        callback.on_log(None, state, control, logs={"loss": loss, "learning_rate": 1e-3, "epoch": step / 30})
    assert stream.getvalue().splitlines() == [
        "step 10/30  loss 2.5000  lr 1.00e-03  elapsed 0:00:12",
        "step 20/30  loss 2.2500  lr 1.00e-03  elapsed 0:00:30",
    ]
    assert "\r" not in stream.getvalue()
    state.is_world_process_zero = False  # other ranks stay quiet
    callback.on_log(None, state, control, logs={"loss": 1.0})
    assert len(stream.getvalue().splitlines()) == 2


def test_progress_lines_replace_the_printer_of_raw_dicts(tmp_path):
    class FakeTrainer:
        def __init__(self, disable_tqdm: bool):
            self.args = TrainingArguments(output_dir=str(tmp_path), disable_tqdm=disable_tqdm, report_to="none")
            self.callbacks = [PrinterCallback]

        def remove_callback(self, cls):
            self.callbacks.remove(cls)

        def add_callback(self, callback):
            self.callbacks.append(callback)

    off, on = FakeTrainer(disable_tqdm=True), FakeTrainer(disable_tqdm=False)
    use_progress_lines(off)
    use_progress_lines(on)
    assert [type(c) for c in off.callbacks] == [ProgressLines]
    assert on.callbacks == [PrinterCallback]  # tqdm's bar: left to the Trainer


def test_lines_are_plain_text():
    line = progress_line(1, 3, {"loss": float("nan"), "learning_rate": 0.001}, 0.4)
    assert re.fullmatch(r"step 1/3  loss nan  lr 1\.00e-03  elapsed 0:00:00", line)
