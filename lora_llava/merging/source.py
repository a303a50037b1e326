"""What a merge starts from: a run folder, one of its checkpoints, or a bare PEFT adapter folder.

A stage-2 run holds a LoRA adapter (projector inside), a stage-1 run a
projector file; both hold their resolved recipe, which says how the base was
loaded (dtype, quantization), the template, the data, and the processor used.
A `checkpoint-N` folder takes the recipe and processor of its run. A bare
adapter folder has no recipe: its adapter_config names the base, and the
merge assumes an unquantized base unless `--recipe` says otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, describe
from ..model.load import check_source
from ..model.projector import find_projector_file
from ..recipe.parse import load_recipe, parse_recipe
from ..recipe.schema import Recipe
from ..runs import RunPaths

log = logging.getLogger("lora_llava")


@dataclass(frozen=True)
class MergeSource:
    folder: Path  # what the user named
    run_root: Path | None  # the run folder that holds recipe.yaml and metrics, if any
    recipe: Recipe
    recipe_file: Path | None
    adapter_dir: Path | None  # PEFT adapter (stage 2)
    projector_file: Path | None  # stage-1 projector, or the recipe's model.projector for an adapter without one
    base: str  # local folder or hub id of the base model
    processor_source: str  # where the processor the run trained with lives

    @property
    def metrics(self) -> list[dict]:
        from ..runs import read_metrics

        return read_metrics(RunPaths(self.run_root).metrics) if self.run_root else []


def _run_root(folder: Path) -> Path | None:
    """The run folder: `folder` itself, or the run a `checkpoint-N` folder belongs to."""
    for root in (folder, folder.parent):
        if RunPaths(root).recipe.is_file():
            return root
    return None


def _adapter_base(folder: Path) -> str | None:
    import json

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    return config.get("base_model_name_or_path")


def _bare_adapter_recipe(folder: Path, base: str) -> Recipe:
    """A stand-in recipe for an adapter folder without one: unquantized base, vicuna_v1, generated parity samples."""
    log.warning(
        "%s has no recipe.yaml: assuming an unquantized base and the vicuna_v1 template (--recipe to give the run's)", folder
    )
    raw = {
        "model": {"name_or_path": base},
        "data": {"train": [{"path": str(folder / "no-training-data.json")}], "template": "vicuna_v1"},
        "train": {"output_dir": str(folder)},
    }
    return parse_recipe(raw, f"{folder} (no recipe)")


def read_source(folder: Path, recipe_file: str | Path | None = None, base: str | None = None) -> MergeSource:
    """Identify the run, its recipe, what it trained, and the base model to merge into."""
    if not folder.is_dir():
        raise ModelError(f"{folder}: run folder not found")
    adapter_dir = folder if RunPaths(folder).has_adapter() else None
    stage1 = RunPaths(folder).projector if RunPaths(folder).projector.is_file() else None
    if adapter_dir is None and stage1 is None:
        raise ModelError(
            f"{folder}: not a lora-llava run or PEFT adapter folder (no adapter_config.json or projector.safetensors)"
        )
    run_root = _run_root(folder)
    recipe_path = Path(recipe_file) if recipe_file is not None else (RunPaths(run_root).recipe if run_root else None)
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        base = base or recipe.model.name_or_path or (str(RunPaths(folder).model_dir) if stage1 else None)
    else:
        base = base or _adapter_base(folder)
        if not base:
            raise ModelError(f"{folder}: adapter_config.json names no base model; pass --base")
        recipe = _bare_adapter_recipe(folder, base)
    if not base:
        raise ModelError(f"{recipe_path}: model.name_or_path is not set (a composed model); pass --base")
    base = check_source(base, "--base / model.name_or_path")
    projector = stage1
    if projector is None and recipe.model.projector:
        projector = find_projector_file(recipe.model.projector)
    return MergeSource(
        folder=folder,
        run_root=run_root,
        recipe=recipe,
        recipe_file=recipe_path,
        adapter_dir=adapter_dir,
        projector_file=projector,
        base=base,
        processor_source=_processor_source(folder, run_root, base),
    )


def _processor_source(folder: Path, run_root: Path | None, base: str) -> str:
    """The run's saved processor (what it trained with); the base model's when none was saved."""
    for root in (folder, run_root):
        if root is not None and ((root / "processor_config.json").is_file() or (root / "tokenizer_config.json").is_file()):
            return str(root)
    return base


def local_base(base: str, revision: str | None = None) -> Path:
    """The base model as a local folder; a hub id is fetched into (or read from) the hub cache."""
    p = Path(base).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            base, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
        )
    except Exception as e:  # offline, unknown repo, no access: one line for the user
        raise ModelError(
            f"--base / model.name_or_path: cannot fetch {base} ({describe(e)})"
        ) from None
    return Path(path)
