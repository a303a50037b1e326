"""A recipe's datasets, built and validated the way training needs them (bad samples per the recipe's policy)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import DataError
from ..recipe.schema import Recipe
from .dataset import LlavaDataset
from .formats import MALFORMED
from .validate import validate

log = logging.getLogger("lora_llava")


def build_dataset(recipe: Recipe, processor, specs=None) -> LlavaDataset:
    """The recipe's training mixture (or `specs`), its index validated; bad samples per `data.on_bad_sample`."""
    d = recipe.data
    ds = LlavaDataset.for_recipe(recipe, processor, specs)
    if d.validate == "full":
        validate(ds, d.num_workers)  # unreadable images and samples that cannot fit, found before any step
    report = ds.scan()  # bad samples are already left out of ds; decide whether that is acceptable
    if report.bad:
        share = len(report.bad) / max(report.total, 1)
        path, first = report.bad[0]
        if share > 0.5 and first.kind == MALFORMED:
            # Most records unreadable as conversations: a layout or mapping problem, which skipping would only hide.
            raise DataError(f"{path}: {first} ({len(report.bad)} of {report.total} samples)")
        if d.on_bad_sample == "error":
            how = "data.on_bad_sample: skip with data.max_bad_fraction skips them"
        elif share > d.max_bad_fraction:
            how = f"more than data.max_bad_fraction {d.max_bad_fraction:g}"
        else:
            how = None
        if how:
            raise DataError(
                f"{path}: {first} ({len(report.bad)} bad sample(s) of {report.total}; `lora-llava check` lists them; {how})"
            )
        log.warning("skipping %d bad sample(s) of %d (first: %s)", len(report.bad), report.total, first)
    if len(ds) == 0:
        first_path = (specs if specs is not None else d.train)[0].path if (specs or d.train) else "data.train"
        raise DataError(f"{first_path}: no usable samples")
    return ds


def check_local_inputs(recipe: Recipe) -> None:
    """Data files and image folders exist: checked before any model is read or fetched, so a typo costs seconds."""
    problems = []
    for section, specs in (("data.train", recipe.data.train), ("data.eval", recipe.data.eval)):
        for k, spec in enumerate(specs):
            if not Path(spec.path).exists():
                problems.append(f"{section}.{k}.path: {spec.path}: data file not found")
            folder = spec.image_folder
            if folder and not Path(folder).is_dir():
                what = "is not a folder" if Path(folder).exists() else "not found"
                if os.path.lexists(folder) and not Path(folder).exists():
                    what = "is a symlink that leads nowhere (or in a loop)"
                problems.append(f"{section}.{k}.image_folder: {folder}: image folder {what}")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
