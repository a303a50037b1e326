"""lora-llava: LoRA / QLoRA domain adaptation of LLaVA-1.5, faithful to the paper.

The public API is imported lazily, so `import lora_llava` stays cheap:

    import lora_llava
    recipe = lora_llava.load_recipe("recipes/medical.yaml", ["train.max_steps=10"])
    lora_llava.train(recipe)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "parse_recipe": "recipe",
    "train": "train",
    "make_tiny": "tiny",
    "LoraLlavaError": "errors",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'lora_llava' has no attribute {name!r}")
