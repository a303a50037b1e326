"""Error types users can cause, and the exit codes the CLI maps them to.

Anything a user can get wrong (a recipe key, a path, a sample) raises one of
these; the CLI prints the message as one line and exits with `exit_code`.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class LoraLlavaError(Exception):
    """Base class: a problem the user can fix. Exit code 2 (usage / input)."""

    exit_code = 2


class RecipeError(LoraLlavaError):
    """One or more problems in a recipe file, all reported at once."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


class DataError(LoraLlavaError):
    """A dataset file or sample that cannot be used."""


class ModelError(LoraLlavaError):
    """A model folder or hub id that cannot be loaded as LLaVA-1.5."""


class OutputError(LoraLlavaError):
    """An output folder that would be overwritten or is not usable."""


class RunError(LoraLlavaError):
    """Inputs were fine, but the work failed while it ran. Exit code 1."""

    exit_code = 1


class TrainingError(RunError):
    """A training run that failed at run time (non-finite gradients or weights, a signal)."""


class ParityError(RunError):
    """A merged model that does not reproduce the adapter model: nothing is written."""


def first_line(e: BaseException) -> str:
    """One line that says what went wrong: the message's first non-empty line, else the type and where it was raised.

    An exception with an empty message (`raise IndexError`, an `OSError()` from a library)
    would otherwise print as a bare type name with nothing to act on.
    """
    for line in str(e).splitlines():
        if line.strip():
            return line.strip()
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno} in {tb.tb_frame.f_code.co_name}" if tb else ""
    return f"{type(e).__name__} (no message){where}"


def describe(e: BaseException) -> str:
    """`Type: first line` for an unexpected exception (its type is part of what went wrong)."""
    line = first_line(e)
    return line if line.startswith(type(e).__name__) else f"{type(e).__name__}: {line}"
