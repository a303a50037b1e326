"""lora-llava: LoRA / QLoRA domain adaptation of LLaVA-1.5, faithful to the paper.

The public API is imported lazily, so `import lora_llava` stays cheap:

    import lora_llava
    recipe = lora_llava.load_recipe("medical", ["train.max_steps=10"])   # a shipped recipe, or a path
    lora_llava.train(recipe)
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "parse_recipe": "recipe",
    "train": "training.run",
    "load_predictor": "evaluate.generate",
    "predict": "evaluate.generate",
    "ChatSession": "evaluate.generate",
    "Sampling": "evaluate.sampling",
    "evaluate_model": "evaluate.run",
    "evaluate_recipe": "evaluate.run",
    "run_demo": "demo",
    "make_tiny": "model.tiny",
    "make_tiny_parts": "model.tiny",
    "make_tiny_original": "model.tiny",
    "make_shapes_dataset": "data.synthetic",
    "load_or_compose": "model.compose",
    "compose_model": "model.compose",
    "convert_checkpoint": "model.convert",
    "train_stages": "training.stages",
    "LoraLlavaError": "errors",
    "check": "check",
    "LlavaDataset": "data.dataset",
    "merge": "merging.run",
    "estimate": "memory",
    "model_shape": "memory",
}

__all__ = sorted(_API)


class _Package(types.ModuleType):
    """Resolves API names first: importing the submodule `lora_llava.train` binds the module to
    the package attribute `train`, which would otherwise hide the function of the same name."""

    def __getattribute__(self, name: str):
        if name in _API:
            return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        return super().__getattribute__(name)


sys.modules[__name__].__class__ = _Package
