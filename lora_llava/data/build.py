"""A recipe's datasets, built and validated the way training needs them (bad samples per the recipe's policy)."""

from __future__ import annotations

import logging

from ..errors import DataError
from ..recipe.schema import Recipe
from .dataset import LlavaDataset
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
