"""Run folders: what lives where, whether a run or a checkpoint is complete, and the metrics log.

Training writes a run folder; inference, eval, merge and multi-stage training
read it. They all ask this module where things are and whether the run is
finished, so the answer is the same everywhere.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING = ".staging"  # checkpoints are written here, then renamed into place
FINAL_STAGING = ".staging-final"  # the final adapter is written here, then moved into the run folder


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def projector(self) -> Path:
        return self.root / "projector.safetensors"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def adapter_config(self) -> Path:
        return self.root / "adapter_config.json"

    @property
    def adapter_weights(self) -> Path:
        return self.root / "adapter_model.safetensors"

    def has_adapter(self) -> bool:
        """A PEFT adapter is here: a finished stage-2 run, one of its checkpoints, or an adapter folder."""
        return self.adapter_config.is_file()

    def is_finished(self, stage: str | None = None) -> bool:
        """The run's final outputs are in place: the adapter (stage instruct) or the projector (stage align).

        The final save moves weights in before configs, so an adapter config means its weights are there.
        """
        adapter = self.adapter_weights.is_file() and self.adapter_config.is_file()
        if stage == "instruct":
            return adapter
        if stage == "align":
            return self.projector.is_file()
        return adapter or self.projector.is_file()

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (see `is_complete_checkpoint`)."""
        found = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = CHECKPOINT.match(p.name)
                if m and is_complete_checkpoint(p):
                    found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint folder whose save finished: it holds trainer_state.json, which the Trainer writes last."""
    return folder.is_dir() and (folder / "trainer_state.json").is_file()


def append_metrics(path: Path, row: dict) -> None:
    """One JSON line in the run's metrics log; non-finite numbers are written as null (JSON has no NaN)."""
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics log; a line a kill left half-written is passed over, never fatal."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
