"""Run folders: what lives where, whether a run or a checkpoint is complete, and the metrics log.

Training writes a run folder; inference, eval, merge and multi-stage training
read it. They all ask this module where things are and whether the run is
finished, so the answer is the same everywhere.
"""

from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .io import atomic_write_text

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
        return [p for p, problem in self.all_checkpoints() if problem is None]

    def all_checkpoints(self) -> list[tuple[Path, str | None]]:
        """Every `checkpoint-<step>` folder, oldest first, with what is wrong with it (None: complete)."""
        found = []
        if self.root.is_dir():
            for p in self.root.iterdir():
                m = CHECKPOINT.match(p.name)
                if m and p.is_dir():
                    found.append((int(m.group(1)), p))
        return [(p, checkpoint_problem(p)) for _, p in sorted(found)]


MANIFEST = "manifest.json"  # every file of a checkpoint and its size, written last by the trainer
_SMALL = 16 * 2**20  # torch files up to this size get their CRCs checked too (scheduler, RNG state)


def write_manifest(folder: Path) -> None:
    """Record every file of a finished checkpoint and its size, so later damage (a torn copy, a full disk) shows."""
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    files.pop(MANIFEST, None)
    atomic_write_text(folder / MANIFEST, json.dumps({"files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete, readable checkpoint ("FILE: what is wrong"), or None when it is.

    With a manifest every listed file must be there with its size; without one (a checkpoint of an
    older version) the files a resume reads must be there. Then each file's structure is checked
    cheaply: JSON parses, safetensors headers match the file size, torch files are whole zip archives.
    """
    if not folder.is_dir():
        return "not a folder"
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            expected = json.loads(manifest.read_text(encoding="utf-8"))["files"]
            expected = {str(k): int(v) for k, v in expected.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{MANIFEST}: unreadable"
        for name, size in expected.items():
            p = folder / name
            if not p.is_file():
                return f"{name}: missing"
            if p.stat().st_size != size:
                return f"{name}: {p.stat().st_size:,} bytes, {size:,} when saved (truncated or changed)"
    else:
        expected = {str(p.relative_to(folder)): 0 for p in folder.rglob("*") if p.is_file()}
        for name in ("trainer_state.json", "recipe.yaml"):
            if name not in expected:
                return f"{name}: missing"
    if "trainer_state.json" not in expected:
        return "trainer_state.json: missing"
    for name in expected:
        problem = _file_problem(folder / name)
        if problem:
            return f"{name}: {problem}"
    return None


def _file_problem(p: Path) -> str | None:
    try:
        if p.suffix == ".json":
            state = json.loads(p.read_bytes())
            if p.name == "trainer_state.json" and not isinstance(state.get("global_step"), int):
                return "no global_step"
        elif p.suffix == ".yaml":
            if not isinstance(yaml.safe_load(p.read_bytes()), dict):
                return "not a YAML mapping"
        elif p.suffix == ".safetensors":
            return _safetensors_problem(p)
        elif p.suffix in (".pt", ".pth", ".bin"):
            return _torch_file_problem(p)
    except (OSError, ValueError, AttributeError, yaml.YAMLError) as e:
        return f"unreadable ({type(e).__name__})"
    return None


def _safetensors_problem(p: Path) -> str | None:
    size = p.stat().st_size
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(size - 8, 100 * 2**20):
            return "safetensors header unreadable"
        header = json.loads(f.read(n))
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    if 8 + n + max(ends, default=0) != size:
        return f"{size:,} bytes, the safetensors header says {8 + n + max(ends, default=0):,}"
    return None


def _torch_file_problem(p: Path) -> str | None:
    """torch.save writes a zip archive: its start and its central directory are cheap to check."""
    with open(p, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return "not a torch zip archive"
    try:
        with zipfile.ZipFile(p) as z:
            if p.stat().st_size <= _SMALL and z.testzip() is not None:
                return "corrupt data"
    except zipfile.BadZipFile:
        return "truncated or corrupt torch archive"
    return None


def is_complete_checkpoint(folder: Path) -> bool:
    """A checkpoint whose every file is present and readable (see `checkpoint_problem`)."""
    return checkpoint_problem(folder) is None


def append_metrics(path: Path, row: dict) -> None:
    """One JSON line in the run's metrics log; non-finite numbers are written as null (JSON has no NaN)."""
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _metric_rows(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append((line, row))
    return rows


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics log; a line a kill left half-written is passed over, never fatal."""
    return [row for _, row in _metric_rows(path)] if path.is_file() else []


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the rows logged up to `step` (the checkpoint a run resumes from), dropping torn lines.

    A line a kill left half-written has no newline: left in place, the next row would be glued to it.
    """
    if not path.is_file():
        return
    keep = [line for line, row in _metric_rows(path) if isinstance(row.get("step", 0), int) and row.get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
