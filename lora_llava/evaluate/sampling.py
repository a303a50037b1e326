"""How answers are decoded, and how many prompts go together: the defaults every verb and the server share.

Kept free of torch so the command line can read its defaults without loading a model stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LoraLlavaError

GENERATION_BATCH = 8  # prompts generated together (left-padded) unless the caller says otherwise


@dataclass(frozen=True)
class Sampling:
    """How answers are decoded."""

    max_new_tokens: int = 128  # LLaVA-1.5's VQA evaluation budget
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0
    seed: int | None = None  # for reproducible sampling when temperature > 0

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise LoraLlavaError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise LoraLlavaError(f"temperature must be >= 0 and top_p in (0, 1], got {self.temperature} and {self.top_p}")
