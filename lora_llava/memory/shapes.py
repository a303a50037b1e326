"""The sizes of a LLaVA-1.5 model that memory depends on: built-in hub shapes, or read from a local config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..recipe.schema import ModelConfig

GiB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a LLaVA-1.5 model that memory depends on."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    image_size: int
    patch_size: int
    source: str = ""
    grid: tuple[tuple[int, int], ...] = ()  # AnyRes pinpoints in pixels (LLaVA-NeXT, LLaVA-1.5-HD); () for LLaVA-1.5

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # CLS dropped (vision_feature_select_strategy=default)

    @property
    def image_tokens(self) -> int:
        """Image tokens of one image, at worst: an image of a pinpoint's own shape fills every tile of its grid."""
        if not self.grid:
            return self.patches
        side = self.image_size // self.patch_size
        worst = 0
        for a, b in self.grid:
            for w, h in ((a, b), (b, a)):  # either reading of a pair: the worst case holds for both
                rows, cols = side * (h // self.image_size), side * (w // self.image_size)
                worst = max(worst, rows * cols + rows)  # unpadded tile features, a newline per row
        return worst + self.patches  # and the global view

    @property
    def vision_tokens(self) -> int:
        """Patches the vision tower encodes for one image: the global view and every tile of the largest grid."""
        tiles = max(((a // self.image_size) * (b // self.image_size) for a, b in self.grid), default=0)
        return (tiles + 1 if self.grid else 1) * self.patches

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def vision_params(self) -> int:
        d, f, n = self.vision_hidden, self.vision_intermediate, self.vision_layers
        embeddings = 3 * self.patch_size**2 * d + d + (self.patches + 1) * d
        layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
        return embeddings + 2 * d + n * layer + 2 * d  # pre- and post-layernorm

    def projector_params(self) -> int:
        return self.vision_hidden * self.hidden + self.hidden + self.hidden * self.hidden + self.hidden


_CLIP_L_336 = dict(vision_hidden=1024, vision_intermediate=4096, vision_layers=24, image_size=336, patch_size=14)


_NEXT_GRID = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
_VICUNA_7B = dict(vocab=32064, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, head_dim=128, tied=False)
_VICUNA_13B = dict(vocab=32064, hidden=5120, intermediate=13824, layers=40, heads=40, kv_heads=40, head_dim=128, tied=False)
_MISTRAL_7B = dict(vocab=32064, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, head_dim=128, tied=False)

BUILTIN_SHAPES = {
    "llava-hf/llava-1.5-7b-hf": ModelShape(**_VICUNA_7B, **_CLIP_L_336),
    "llava-hf/llava-1.5-13b-hf": ModelShape(**_VICUNA_13B, **_CLIP_L_336),
    "llava-hf/llava-v1.6-vicuna-7b-hf": ModelShape(**_VICUNA_7B, **_CLIP_L_336, grid=_NEXT_GRID),
    "llava-hf/llava-v1.6-vicuna-13b-hf": ModelShape(**_VICUNA_13B, **_CLIP_L_336, grid=_NEXT_GRID),
    "llava-hf/llava-v1.6-mistral-7b-hf": ModelShape(**_MISTRAL_7B, **_CLIP_L_336, grid=_NEXT_GRID),
}


def shape_from_config(config: dict, source: str = "") -> ModelShape:
    """A ModelShape from a llava-hf config.json (missing sub-keys take transformers' defaults)."""
    from transformers import LlavaConfig, LlavaNextConfig

    cfg = (LlavaNextConfig if config.get("model_type") == "llava_next" else LlavaConfig)(**config)
    t, v = cfg.text_config, cfg.vision_config
    return ModelShape(
        vocab=t.vocab_size,
        hidden=t.hidden_size,
        intermediate=t.intermediate_size,
        layers=t.num_hidden_layers,
        heads=t.num_attention_heads,
        kv_heads=getattr(t, "num_key_value_heads", None) or t.num_attention_heads,
        head_dim=getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads,
        tied=bool(getattr(t, "tie_word_embeddings", False)),
        vision_hidden=v.hidden_size,
        vision_intermediate=v.intermediate_size,
        vision_layers=v.num_hidden_layers,
        image_size=v.image_size,
        patch_size=v.patch_size,
        source=source,
        grid=tuple(tuple(p) for p in getattr(cfg, "image_grid_pinpoints", None) or ()) if cfg.model_type == "llava_next" else (),
    )


def _read_config(folder: str, key: str) -> tuple[dict, Path]:
    path = Path(folder).expanduser() / "config.json"
    if not path.is_file():
        known = ", ".join(BUILTIN_SHAPES)
        raise ModelError(f"{key}: {folder} has no local config.json; estimate also knows the shapes of {known}")
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read the model config ({e})") from None


def model_shape(cfg: ModelConfig) -> ModelShape:
    """The shape of the recipe's model (a built-in shape, a local config.json, or the parts to compose); AnyRes's grid
    with `model.anyres`."""
    shape = _base_shape(cfg)
    if cfg.anyres and not shape.grid:
        from ..model.family import default_grid

        grid = cfg.image_grid_pinpoints or default_grid(shape.image_size)
        shape = dataclasses.replace(shape, grid=tuple(tuple(p) for p in grid))
    return shape


def _base_shape(cfg: ModelConfig) -> ModelShape:
    if cfg.name_or_path in BUILTIN_SHAPES:
        return dataclasses.replace(BUILTIN_SHAPES[cfg.name_or_path], source=f"{cfg.name_or_path} (built-in shape)")
    if cfg.name_or_path:
        config, path = _read_config(cfg.name_or_path, "model.name_or_path")
        if config.get("model_type") not in ("llava", "llava_next"):
            raise ModelError(f"{path}: model_type {config.get('model_type')!r} is not llava (LLaVA-1.5) or llava_next (LLaVA-NeXT)")
        return shape_from_config(config, source=str(path))
    vision, vpath = _read_config(cfg.vision_tower, "model.vision_tower")
    text, tpath = _read_config(cfg.language_model, "model.language_model")
    vision = vision.get("vision_config", vision)  # a full CLIP checkpoint nests its vision tower
    # composing adds <image> and <pad> and grows the embeddings to a multiple of 64, as llava-hf checkpoints
    text = {**text, "vocab_size": math.ceil((text.get("vocab_size", 32000) + 2) / 64) * 64}
    return shape_from_config({"vision_config": vision, "text_config": text}, source=f"{vpath} + {tpath}")
