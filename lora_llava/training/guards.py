"""What keeps a long run safe: signals end it at a step boundary, bad steps never reach the weights.

* SIGINT / SIGTERM (Ctrl-C, a scheduler's preemption notice) set a flag; at the
  next step boundary the trainer saves a checkpoint and stops. A second signal
  falls through to the default handler, so a stuck run can still be killed.
* A step whose gradients are not finite is never applied: the run stops
  naming the step (the last good checkpoint stays), or, with
  `train.on_nonfinite: skip`, the step is dropped and counted.
* Weights that became non-finite anyway (finite gradients, an overflowing
  update) stop the run at that step, before any save: no checkpoint or adapter
  holds them. The final save checks the weights it writes once more.
* A full disk while saving removes the partial save and says what was kept.
"""

from __future__ import annotations

import errno
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..errors import TrainingError
from ..runs import RunPaths

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Interrupted(TrainingError):
    """The run stopped on a signal after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopOnSignal(TrainerCallback):
    """Turns SIGINT / SIGTERM into "save a checkpoint at the next step boundary, then stop"."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None  # the signal this process got
        self.stopped: int | None = None  # the signal the run stopped on (its own or a peer's)
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once

    def on_train_begin(self, args, state, control, **kwargs):
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook's worker): leave signals alone
                pass

    def on_step_end(self, args, state, control, **kwargs):
        # Ranks receive the signal at slightly different times; they must stop at the same
        # step, or one saves while the others wait in the next all-reduce.
        from ..distributed import sum_over_ranks, world_size

        stop = self.received is not None
        if world_size() > 1:
            stop = sum_over_ranks(int(stop), args.device) > 0
        if stop:
            # A rank told by its peers stops as if it had been sent SIGTERM itself.
            self.stopped = self.received if self.received is not None else signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def all_finite(tensors) -> bool:
    """True when every element of every tensor is finite (one reduction, no host sync per tensor)."""
    flags = [torch.isfinite(t).all() for t in tensors if t is not None and t.numel()]
    return not flags or bool(torch.stack([f.to(flags[0].device) for f in flags]).all())


def grads_finite(params: list[torch.Tensor]) -> bool:
    """True when every gradient is finite."""
    return all_finite(p.grad for p in params)


def kept(run_dir: Path) -> str:
    """What a stopped run leaves to resume from, for its message."""
    found = RunPaths(run_dir).checkpoints()
    return f"the last good checkpoint {found[-1]} is kept" if found else "no checkpoint had been saved yet"


def nonfinite_weights(step: int, run_dir: Path) -> TrainingError:
    return TrainingError(
        f"trained weights became non-finite at step {step} (their gradients were finite): training stopped and "
        f"nothing was saved; {kept(run_dir)} (lower train.learning_rate, or check the data)"
    )


def no_space(what: str, folder: Path, run_dir: Path) -> TrainingError:
    """The one line for a full disk while saving `what` into `folder`; the partial save is already removed."""
    return TrainingError(
        f"no space left on device while saving {what} in {folder}: the partial save was removed and {kept(run_dir)}; "
        "free some space and run the same command again to resume"
    )


class StopOnNonFiniteWeights(TrainerCallback):
    """After each optimizer step: trained weights that are not finite stop the run before anything saves them."""

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        from ..distributed import sum_over_ranks, world_size

        params = [p for g in optimizer.param_groups for p in g["params"]] if optimizer is not None else []
        bad = not all_finite(params)
        if world_size() > 1:  # sharded optimizers hold different slices: every rank must stop together
            bad = sum_over_ranks(int(bad), args.device) > 0
        if bad:
            raise nonfinite_weights(state.global_step, Path(args.output_dir))


class StepGuard:
    """Wraps `optimizer.step` so that a non-finite step is refused (stop) or dropped (skip)."""

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str, step_of):
        self.optimizer = optimizer
        self.mode = mode
        self.step_of = step_of  # callable giving the step being taken, for messages
        self.skipped = 0
        self._step = optimizer.step
        optimizer.step = self.step  # type: ignore[method-assign]

    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self, *args, **kwargs):
        if grads_finite(self.params()):
            return self._step(*args, **kwargs)
        if self.mode == "skip":
            self.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            return None
        raise TrainingError(
            f"non-finite gradients at step {self.step_of()}: the step was not applied and training stopped; "
            "the last good checkpoint is kept (lower train.learning_rate, check the data, or set train.on_nonfinite: skip)"
        )
