"""Recipe paths made absolute, so that a run folder's recipe works from any working directory.

A recipe names local things relative to where the command runs. The resolved
recipe a run folder keeps is read again by `predict`, `eval`, `merge` and
resume, possibly from elsewhere: it stores every local path absolute. A model
name that is not a local path is a hub id and stays as it is.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .schema import DatasetSpec, Recipe


def _local(value: str | None) -> str | None:
    """An existing local path, absolute; anything else (a hub id, None) unchanged."""
    if value and Path(value).expanduser().exists():
        return os.path.abspath(Path(value).expanduser())
    return value


def _spec(spec: DatasetSpec) -> DatasetSpec:
    folder = os.path.abspath(Path(spec.image_folder).expanduser()) if spec.image_folder else None
    return dataclasses.replace(spec, path=os.path.abspath(Path(spec.path).expanduser()), image_folder=folder)


def absolute_paths(recipe: Recipe) -> Recipe:
    """The recipe with data files, image folders, output folder and local model paths absolute."""
    m = recipe.model
    model = dataclasses.replace(
        m,
        name_or_path=_local(m.name_or_path),
        vision_tower=_local(m.vision_tower),
        language_model=_local(m.language_model),
        projector=_local(m.projector),
    )
    d = recipe.data
    data = dataclasses.replace(d, train=tuple(_spec(s) for s in d.train), eval=tuple(_spec(s) for s in d.eval))
    train = dataclasses.replace(recipe.train, output_dir=os.path.abspath(Path(recipe.train.output_dir).expanduser()))
    return dataclasses.replace(recipe, model=model, data=data, train=train)
