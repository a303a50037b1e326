"""How much memory a run may use: a size the user gives (`--gpu-memory`, `train.gpu_memory`), the GPU's own, or the RAM."""

from __future__ import annotations

import os
import re

from ..errors import RecipeError
from ..recipe.schema import MEMORY_SIZE
from .shapes import GiB

DEFAULT_GPU = "24GiB"  # what `estimate` assumes without a GPU or a size: the card QLoRA-13B is meant for
CHUNK_ELEMENTS = 2**23  # logits per chunk of the chunked loss: 8M entries = 32 MiB in fp32, whatever the vocabulary


def chunk_rows(vocab_size: int) -> int:
    """Rows of hidden states the chunked loss scores at once, so that one chunk holds about CHUNK_ELEMENTS logits."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


def parse_size(text: str, key: str) -> float:
    """'24GiB', '24GB', '24G', '24' (GiB), '16000MiB' -> bytes. GB counts as GiB, as GPU makers label memory.

    `key` names the flag or recipe key the size came from, for the error.
    """
    m = re.fullmatch(MEMORY_SIZE, str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise RecipeError(key, [f"{text!r} is not a memory size (e.g. 24GiB, 80GB, 16000MiB)"])
    return float(m.group(1)) * {"m": 2**20, "g": GiB, "t": 2**40}[(m.group(2) or "g")[0]]


def gpu_memory(text: str | None, key: str = "--gpu-memory") -> tuple[float, str] | None:
    """Bytes of the card and its name: the size given, else this process's GPU; None without either."""
    if text:
        size = parse_size(text, key)
        return size, f"{size / GiB:.1f} GiB card"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return float(props.total_memory), f"{props.name} ({props.total_memory / GiB:.1f} GiB)"
    return None


def card_memory(text: str | None) -> tuple[float, str]:
    """The card `estimate` checks against: the size given, this machine's GPU, or a 24 GiB card."""
    found = gpu_memory(text)
    if found is not None:
        return found
    size = parse_size(DEFAULT_GPU, "--gpu-memory")
    return size, f"{size / GiB:.1f} GiB card"


def training_memory(text: str | None) -> tuple[float, str]:
    """What a training run may fill, and its name: `train.gpu_memory`, else the GPU, else (on the CPU) the RAM."""
    found = gpu_memory(text, "train.gpu_memory")
    if found is not None:
        return found
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return float(ram), f"this machine's RAM ({ram / GiB:.1f} GiB)"
