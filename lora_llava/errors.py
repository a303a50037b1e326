"""Error types users can cause, and the exit codes the CLI maps them to.

Anything a user can get wrong (a recipe key, a path, a sample) raises one of
these; the CLI prints the message as one line and exits with `exit_code`.
Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


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


class TrainingError(LoraLlavaError):
    """A run that failed at run time (non-finite loss, parity failure...). Exit code 1."""

    exit_code = 1
