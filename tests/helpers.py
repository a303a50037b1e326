"""Helpers shared by the tests (plain functions; the session fixtures that use them are in conftest.py)."""

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

ROOT = Path(__file__).resolve().parents[1]


TINY_IMAGE_SIZE = 56  # 4 x 4 patches of 14 px: 16 image tokens per image


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


def run_main(*args: str) -> subprocess.CompletedProcess:
    """`lora-llava ARGS` in this process (the console script's code path without a new interpreter), as run_cli reports it.

    For commands that end before any training: a fresh process per refusal costs seconds of imports.
    """
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from lora_llava.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(["lora-llava", *args], code, out.getvalue(), err.getvalue())


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


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
