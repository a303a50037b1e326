"""Model families: LLaVA-1.5 (one 336-px view) and LLaVA-NeXT / LLaVA-1.5-HD (AnyRes tiles), told apart by the config.

A family decides the transformers classes, how many image tokens an image
becomes, and what trains beside the projector (NeXT's `image_newline`).

The grid of a NeXT model is chosen as the reference LLaVA code chooses it.
Its `select_best_resolution` reads each `image_grid_pinpoints` pair as
(width, height); transformers reads (height, width). The lists are
symmetric, so the two agree except on ties, and ties are every image no
larger than one tile on both sides (a 300x100 image: 776 features officially,
1360 in transformers as shipped). Handing transformers the pairs swapped, in
the same order, makes it iterate exactly the reference's candidates: the
config and the image processor then carry the swapped list and the marker
`grid_pinpoints_order: height_width`, so that a folder written by lora-llava
(a merged release) is read by plain transformers as trained, and not swapped
twice when lora-llava reads it again.
"""

from __future__ import annotations

import math

LLAVA, NEXT = "llava", "llava_next"
GRID_ORDER = "grid_pinpoints_order"  # marker on config and image processor: the list is in transformers' (h, w) order
HEIGHT_WIDTH = "height_width"
# LLaVA-NeXT's grid, in tiles of the tower's resolution: 336 px gives [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]].
NEXT_GRID_TILES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def family_of(config) -> str:
    """`llava` or `llava_next`, from a model config (or its `model_type`)."""
    model_type = config if isinstance(config, str) else getattr(config, "model_type", LLAVA)
    return NEXT if model_type == NEXT else LLAVA


def model_class(family: str):
    from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    return LlavaNextForConditionalGeneration if family == NEXT else LlavaForConditionalGeneration


def default_grid(tile: int) -> list[list[int]]:
    """LLaVA-NeXT's pinpoints at a tower resolution of `tile` px, as the reference code lists them (w, h)."""
    return [[a * tile, b * tile] for a, b in NEXT_GRID_TILES]


def swapped(pinpoints) -> list[list[int]]:
    return [[int(b), int(a)] for a, b in pinpoints]


def adopt_reference_grid(config=None, image_processor=None) -> None:
    """Put the config's and the image processor's pinpoints in transformers' order, once (see the module doc)."""
    for obj in (config, image_processor):
        if obj is None or getattr(obj, "image_grid_pinpoints", None) is None:
            continue
        if getattr(obj, GRID_ORDER, None) != HEIGHT_WIDTH:
            obj.image_grid_pinpoints = swapped(obj.image_grid_pinpoints)
            setattr(obj, GRID_ORDER, HEIGHT_WIDTH)


def init_image_newline(hidden_size: int, seed: int, dtype=None):
    """LLaVA-NeXT's initialisation of `image_newline`: normal with std 1/sqrt(hidden size), here seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hidden_size, generator=g) / math.sqrt(hidden_size)).to(dtype or torch.float32)


def next_config(llava_config, pinpoints_wh=None):
    """The LlavaNextConfig of LLaVA-1.5-HD: a LLaVA-1.5 config's tower, projector and LLM, AnyRes tiles of that tower.

    `pinpoints_wh`: (width, height) pairs as the reference code lists them; None: LLaVA-NeXT's grid at the tower's size.
    """
    from transformers import LlavaNextConfig

    vision = llava_config.vision_config
    if pinpoints_wh:
        check_grid(pinpoints_wh, vision.image_size)
    grid = [list(p) for p in pinpoints_wh] if pinpoints_wh else default_grid(vision.image_size)
    config = LlavaNextConfig(
        vision_config=vision.to_dict(),
        text_config=llava_config.text_config.to_dict(),
        image_token_index=llava_config.image_token_index,
        projector_hidden_act=llava_config.projector_hidden_act,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        vision_feature_layer=llava_config.vision_feature_layer,
        image_grid_pinpoints=swapped(grid),
        multimodal_projector_bias=getattr(llava_config, "multimodal_projector_bias", True),
        tie_word_embeddings=getattr(llava_config, "tie_word_embeddings", False),
    )
    setattr(config, GRID_ORDER, HEIGHT_WIDTH)
    return config


def check_grid(pinpoints_wh, tile: int) -> None:
    """Each pinpoint a (width, height) pair of whole tiles of the tower's resolution."""
    from ..errors import RecipeError

    bad = [p for p in pinpoints_wh if len(p) != 2 or any(v <= 0 or v % tile for v in p)]
    if bad:
        raise RecipeError(
            "model.image_grid_pinpoints",
            [f"{list(bad[0])}: each pinpoint is [width, height] in whole tiles of the tower's {tile} px (e.g. [{tile}, {2 * tile}])"],
        )
