"""The choices and defaults of a merge, declared once for the library and the command line (no torch here)."""

from __future__ import annotations

from ..recipe.describe import choices
from ..recipe.schema import ModelConfig

MERGE_MODES = ("trained", "original")  # the weights LoRA is added to: as trained (NF4 rebuilt) or the 16-bit originals
OUTPUT_DTYPES = tuple(d for d in choices(ModelConfig, "dtype") if d != "auto")
PARITY_SAMPLES = 4  # samples the parity check runs
MAX_SHARD_SIZE = "5GB"  # largest safetensors shard, as transformers' save_pretrained
