"""The peers' virtual environments: how to (re)create them, and a check that they are there.

Both are made with `python -m venv` outside the repository, and torch 2.13.0
goes in first: the CPU wheel on this machine's disk. Pinned again beside every
later install, it keeps pip from replacing it with a CUDA build that a
dependency's resolution would otherwise pull.

* LLaMA-Factory 0.9.5 goes in without its dependencies (its pins want
  torchvision and torchaudio, and gradio and friends the benchmark does not
  use), beside the versions it supports and the small pure-Python packages it
  imports. The registry's torchvision does not import beside the CPU torch, so
  none is installed; `llamafactory.data.mm_plugin` imports torchaudio at module
  level, so a stub module stands in (no audio is used).
* ms-swift 4.6.0 goes in with its dependencies (transformers <5.20, trl <1.0,
  peft <0.21 by its own pins).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
LLAMAFACTORY = "llamafactory==0.9.5"
SWIFT = "ms-swift==4.6.0"
LLAMAFACTORY_DEPS = (
    "transformers==5.6.0", "peft==0.18.1", "accelerate==1.11.0", "datasets==4.0.0", "trl==0.24.0",
    "einops", "fire", "omegaconf", "packaging", "pandas", "protobuf", "pydantic", "pyyaml", "safetensors",
    "scipy", "sentencepiece", "tiktoken", "tyro<0.9.0", "numpy", "pillow",
)  # fmt: skip
TORCHAUDIO_STUB = '"""Stand-in: llamafactory.data.mm_plugin imports torchaudio at import time; no audio is used here."""\n'
# What each environment must be able to import for the benchmark to run it.
CHECKS = {
    "llamafactory": "import torch, llamafactory.train.tuner",
    "swift": "import torch, swift.pipelines",
}
# No network but the package registries: the hubs' clients must not try (a retry loop costs minutes of wall time).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MODELSCOPE_OFFLINE": "1",
    "USE_MODELSCOPE_HUB": "0",
    "USE_HF": "1",
    "DISABLE_VERSION_CHECK": "1",  # LLaMA-Factory refuses versions beyond its pins without it
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


class MissingVenv(RuntimeError):
    pass


def python(venv: Path) -> Path:
    return venv / "bin" / "python"


def check(name: str, venv: Path) -> None:
    """One line that says what to do when an environment is missing or broken."""
    if not python(venv).is_file():
        raise MissingVenv(f"{name}: no virtual environment at {venv}; run with --setup first")
    probe = subprocess.run([str(python(venv)), "-c", CHECKS[name]], capture_output=True, text=True, cwd="/")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["import failed"])[-1]
        raise MissingVenv(f"{name}: the environment at {venv} does not import ({last}); run with --setup to rebuild it")


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(python(venv)), "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _fresh(venv: Path) -> None:
    if venv.exists():
        shutil.rmtree(venv)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, "-q", TORCH)


def _site_packages(venv: Path) -> Path:
    out = subprocess.run(
        [str(python(venv)), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return Path(out.stdout.strip())


def setup_llamafactory(venv: Path) -> None:
    _fresh(venv)
    _pip(venv, "--no-deps", LLAMAFACTORY)
    _pip(venv, TORCH, *LLAMAFACTORY_DEPS)
    subprocess.run([str(python(venv)), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)
    (_site_packages(venv) / "torchaudio.py").write_text(TORCHAUDIO_STUB, encoding="utf-8")
    check("llamafactory", venv)


def setup_swift(venv: Path) -> None:
    _fresh(venv)
    _pip(venv, TORCH, SWIFT)
    subprocess.run([str(python(venv)), "-m", "pip", "uninstall", "-y", "-q", "torchvision"], check=False)
    check("swift", venv)


SETUP = {"llamafactory": setup_llamafactory, "swift": setup_swift}
