"""Recipes: YAML -> typed frozen dataclasses (`schema`), strict parsing with every problem at once and
overrides (`parse`), the key listing of `lora-llava recipe` (`describe`). Imports only errors.
"""

from .parse import apply_overrides, dump_recipe, load_recipe, parse_recipe, read_yaml, recipe_to_dict
from .schema import DataConfig, DatasetSpec, LoraConfig, ModelConfig, ProjectorConfig, Recipe, TrainConfig

__all__ = [
    "DataConfig",
    "DatasetSpec",
    "LoraConfig",
    "ModelConfig",
    "ProjectorConfig",
    "Recipe",
    "TrainConfig",
    "apply_overrides",
    "dump_recipe",
    "load_recipe",
    "parse_recipe",
    "read_yaml",
    "recipe_to_dict",
]
