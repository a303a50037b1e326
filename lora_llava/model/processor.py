"""LLaVA-1.5's processor: CLIP normalisation, pad-to-square, `<image>` expanded to the tower's patch count.

Every processor lora-llava builds (a composed model, a converted checkpoint, the
tiny model, a processor for `check` without weights) comes from `build_processor`.
"""

from __future__ import annotations

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)


CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# The chat template llava-hf ships with llava-1.5-*-hf (no system prompt, no
# `</s>` after answers). `chat_template` mode in lora_llava.data handles both.
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def build_image_processor(image_size: int, do_pad: bool = True):
    """LLaVA-1.5 image settings: CLIP normalisation, pad to square with the mean colour, then resize."""
    from transformers import LlavaImageProcessorPil

    return LlavaImageProcessorPil(
        do_pad=do_pad,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def build_processor(
    tokenizer, image_size: int, patch_size: int, chat_template: str | None = LLAVA_HF_CHAT_TEMPLATE, do_pad: bool = True
):
    """A LlavaProcessor that expands `<image>` to (image_size/patch_size)^2 tokens.

    `num_additional_image_tokens=1` accounts for CLIP's CLS token, which the
    `default` feature strategy drops; without it the processor inserts one
    token too few and the model raises a feature/token mismatch.
    """
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(image_size, do_pad),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
        image_token="<image>",
    )


def llava_processor(tokenizer, config, do_pad: bool = True):
    """LlavaProcessor with LLaVA-1.5's image settings at the tower's resolution (336 px -> 576 tokens)."""
    vision = config.vision_config
    return build_processor(tokenizer, vision.image_size, vision.patch_size, do_pad=do_pad)


def build_next_image_processor(image_size: int, pinpoints_hw):
    """LLaVA-NeXT image settings: a squashed global view and best-fit-grid tiles, each resized and padded (no torchvision).

    `pinpoints_hw`: the grid in transformers' (height, width) order (`family.adopt_reference_grid`).
    """
    from transformers import LlavaNextImageProcessorPil

    from .family import GRID_ORDER, HEIGHT_WIDTH

    ip = LlavaNextImageProcessorPil(
        do_pad=True,
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in pinpoints_hw],
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    setattr(ip, GRID_ORDER, HEIGHT_WIDTH)
    return ip


def next_processor(tokenizer, config, chat_template: str | None = LLAVA_HF_CHAT_TEMPLATE):
    """LlavaNextProcessor for a NeXT config (its grid already in transformers' order), at the tower's resolution."""
    from transformers import LlavaNextProcessor

    vision = config.vision_config
    return LlavaNextProcessor(
        image_processor=build_next_image_processor(vision.image_size, config.image_grid_pinpoints),
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=chat_template,
        image_token="<image>",
    )
