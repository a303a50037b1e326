"""Shared fixtures: a tiny LLaVA-1.5 built offline, generated data, finished runs.

Everything is built once per test session under a temporary folder; tests
that change files copy what they need first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORA_LLAVA_PROGRESS", "0")

ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px: 16 image tokens per image


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_model(session_dir) -> Path:
    """A llava-hf folder of a tiny random LLaVA-1.5 (56 px images, 16 image tokens)."""
    from lora_llava.tiny import make_tiny

    return make_tiny(session_dir / "tiny-llava", image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="session")
def shapes(session_dir) -> Path:
    """Generated shapes VQA data: train.json, test.json and images/ in one folder."""
    from lora_llava.synthetic import make_shapes_dataset

    root = session_dir / "shapes"
    make_shapes_dataset(root, n_images=12, seed=0, split="train")
    make_shapes_dataset(root, n_images=4, seed=1, split="test")
    return root


@pytest.fixture(scope="session")
def tiny_parts(session_dir) -> tuple[Path, Path]:
    """A tiny CLIP (full CLIPModel) and a tiny LLaMA with a plain tokenizer: the inputs of a composed LLaVA-1.5."""
    from lora_llava.tiny import make_tiny_parts

    return make_tiny_parts(session_dir / "parts", image_size=TINY_IMAGE_SIZE)


@pytest.fixture(scope="session")
def captions(session_dir) -> Path:
    """Generated stage-1 caption data (LLaVA pretraining JSON): captions.json and images/."""
    from lora_llava.synthetic import make_caption_dataset

    root = session_dir / "captions"
    make_caption_dataset(root, n_images=32, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_processor(tiny_model):
    """The tiny model's LlavaProcessor (tokenizer + image processor), for data tests that need no weights."""
    from lora_llava.model import load_processor

    return load_processor(str(tiny_model))


def recipe_dict(model_dir: Path, data: Path, output_dir: Path, /, **sections) -> dict:
    """A small stage-2 recipe for the tiny model (plain LoRA, fp32, 3 steps)."""
    recipe = {
        "stage": "instruct",
        "model": {"name_or_path": str(model_dir), "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "projector": {"learning_rate": 1e-3},
        "data": {
            "train": [{"path": str(data / "train.json"), "image_folder": str(data / "images")}],
            "template": "vicuna_v1",
            "max_length": 256,
        },
        "train": {
            "output_dir": str(output_dir),
            "max_steps": 3,
            "learning_rate": 1e-3,
            "batch_size": 4,
            "save_steps": 100,
            "warmup_ratio": 0.0,
            "seed": 0,
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section].update(values)
        else:
            recipe[section] = values
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def lora_run(session_dir, tiny_model, shapes) -> Path:
    """A finished 3-step LoRA run folder of the tiny model (fp32)."""
    from lora_llava.recipe import parse_recipe
    from lora_llava.train import train

    out = session_dir / "runs" / "lora"
    return train(parse_recipe(recipe_dict(tiny_model, shapes, out)))


@pytest.fixture(scope="session")
def qlora_run(session_dir, tiny_model, shapes) -> Path:
    """A finished 3-step QLoRA (NF4, bf16) run folder of the tiny model."""
    from lora_llava.recipe import parse_recipe
    from lora_llava.train import train

    out = session_dir / "runs" / "qlora"
    recipe = recipe_dict(tiny_model, shapes, out, model={"quantization": "nf4", "dtype": "bfloat16"})
    return train(parse_recipe(recipe))


@pytest.fixture(scope="session")
def lora_predictor(lora_run):
    """The LoRA run loaded as `predict` loads it; shared, so tests must not change it."""
    from lora_llava.inference import load_predictor

    return load_predictor(lora_run)


@contextlib.contextmanager
def serving(app, timeout: float = 30) -> Iterator[str]:
    """Run an ASGI app under a real uvicorn server on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound here and handed over: no race for the port
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600, input: str | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lora_llava ARGS` in a subprocess, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lora_llava", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
    )


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
