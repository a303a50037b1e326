"""Training progress: tqdm's bar on a terminal, one plain line per logged step in a log file.

A bar redrawn with carriage returns is unreadable once captured (nohup, SLURM, CI):
every redraw lands in the file as a fragment. When stderr is not a terminal (nor a
notebook), or LORA_LLAVA_PROGRESS=0, the bar is off and each log (every
`train.logging_steps`) prints one line on stderr:
`step 20/300  loss 1.2345  lr 2.00e-04  elapsed 0:00:41`. Model loading keeps
transformers' own bars: they are one line each, and a download's is worth seeing.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

# Logged beside the loss but not worth a column of their own in a line.
_QUIET_KEYS = {"total_flos", "epoch", "step"}


def show_bar(stream: TextIO | None = None) -> bool:
    """tqdm's bar only where someone watches it redraw: a terminal or a notebook, unless LORA_LLAVA_PROGRESS=0."""
    from transformers.utils import is_in_notebook  # Jupyter's stderr is no TTY, yet tqdm draws a widget there

    stream = sys.stderr if stream is None else stream
    return os.environ.get("LORA_LLAVA_PROGRESS", "1") != "0" and (stream.isatty() or is_in_notebook())


def elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def progress_line(step: int, total: int, logs: dict, seconds: float) -> str:
    """One log as one line; a log without a training loss (eval, the final summary) lists what it holds."""
    parts = [f"step {step}/{total}"]
    if logs.get("loss") is not None:
        parts.append(f"loss {logs['loss']:.4f}")
    if logs.get("learning_rate") is not None:
        parts.append(f"lr {logs['learning_rate']:.2e}")
    for key, value in logs.items():
        if key in _QUIET_KEYS or key in ("loss", "learning_rate", "grad_norm"):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    parts.append(f"elapsed {elapsed(seconds)}")
    return "  ".join(parts)


class ProgressLines(TrainerCallback):
    """Prints `progress_line` for every log, on the main process; stands in for tqdm's bar in a non-interactive log."""

    def __init__(self, stream: TextIO | None = None, clock=time.monotonic):
        self.stream = stream
        self.clock = clock
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.clock()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        seconds = self.clock() - (self.start if self.start is not None else self.clock())
        stream = sys.stderr if self.stream is None else self.stream  # read late: pytest and tools swap sys.stderr
        print(progress_line(state.global_step, state.max_steps, logs, seconds), file=stream, flush=True)


def use_progress_lines(trainer) -> None:
    """Replace the Trainer's PrinterCallback (a raw dict per log, chosen when tqdm is off) with `ProgressLines`."""
    if trainer.args.disable_tqdm:
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(ProgressLines())
