"""Shared fixtures: a tiny LLaVA-1.5 built offline, generated data, finished runs.

Everything is built once per test session under a temporary folder; tests
that change files copy what they need first.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import Path

import pytest

from tests.helpers import TINY_IMAGE_SIZE, recipe_dict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORA_LLAVA_PROGRESS", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")  # the tests run on the CPU; DeepSpeed would otherwise guess, on stdout

pytest_plugins = ["tests.llama_like"]  # the `llama_like` tokenizer fixture (tests/llama_like.py)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_model(session_dir) -> Path:
    """A llava-hf folder of a tiny random LLaVA-1.5 (56 px images, 16 image tokens)."""
    from lora_llava.model.tiny import make_tiny

    return make_tiny(session_dir / "tiny-llava", image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="session")
def tiny_next(session_dir) -> Path:
    """A tiny random LLaVA-NeXT (AnyRes over 56-px tiles: grid [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]])."""
    from lora_llava.model.tiny import make_tiny

    return make_tiny(session_dir / "tiny-next", image_size=TINY_IMAGE_SIZE, next=True)


@pytest.fixture(scope="session")
def shapes(session_dir) -> Path:
    """Generated shapes VQA data: train.json, test.json and images/ in one folder."""
    from lora_llava.data.synthetic import make_shapes_dataset

    root = session_dir / "shapes"
    make_shapes_dataset(root, n_images=12, seed=0, split="train")
    make_shapes_dataset(root, n_images=4, seed=1, split="test")
    return root


@pytest.fixture(scope="session")
def tiny_parts(session_dir) -> tuple[Path, Path]:
    """A tiny CLIP (full CLIPModel) and a tiny LLaMA with a plain tokenizer: the inputs of a composed LLaVA-1.5."""
    from lora_llava.model.tiny import make_tiny_parts

    return make_tiny_parts(session_dir / "parts", image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="session")
def captions(session_dir) -> Path:
    """Generated stage-1 caption data (LLaVA pretraining JSON): captions.json and images/."""
    from lora_llava.data.synthetic import make_caption_dataset

    root = session_dir / "captions"
    make_caption_dataset(root, n_images=32, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_processor(tiny_model):
    """The tiny model's LlavaProcessor (tokenizer + image processor), for data tests that need no weights."""
    from lora_llava.model.load import load_processor

    return load_processor(str(tiny_model))


@pytest.fixture(scope="session")
def lora_run(session_dir, tiny_model, shapes) -> Path:
    """A finished 3-step LoRA run folder of the tiny model (fp32)."""
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    out = session_dir / "runs" / "lora"
    return train(parse_recipe(recipe_dict(tiny_model, shapes, out)))


@pytest.fixture(scope="session")
def qlora_run(session_dir, tiny_model, shapes) -> Path:
    """A finished 3-step QLoRA (NF4, bf16) run folder of the tiny model."""
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    out = session_dir / "runs" / "qlora"
    recipe = recipe_dict(tiny_model, shapes, out, model={"quantization": "nf4", "dtype": "bfloat16"})
    return train(parse_recipe(recipe))


@pytest.fixture(scope="session")
def lora_predictor(lora_run):
    """The LoRA run loaded as `predict` loads it; shared, so tests must not change it."""
    from lora_llava.evaluate.generate import load_predictor

    return load_predictor(lora_run)




# What makes a test end-to-end: it trains, merges, runs the demo or the CLI in a subprocess, itself or through
# a fixture it uses. Those carry the `e2e` marker; `pytest -m "not e2e"` runs the rest in seconds.
_E2E_CALLS = re.compile(r"\b(run_cli|torchrun|train|train_stages|merge|run_demo|subprocess\.run|subprocess\.Popen)\(")


@functools.cache
def _runs_end_to_end(func) -> bool:
    try:
        return bool(_E2E_CALLS.search(inspect.getsource(func)))
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        funcs = [getattr(item, "function", None)]
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        funcs += [d[-1].func for d in defs.values() if d]
        if any(f is not None and _runs_end_to_end(f) for f in funcs):
            item.add_marker(pytest.mark.e2e)
