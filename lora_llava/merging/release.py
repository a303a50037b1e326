"""The non-weight files of a merged checkpoint: config, generation config, processor, chat template.

A plain transformers user prompts through the chat template, so it must
render the exact text the model was trained on. llava-hf's own template has
no system prompt and no `</s>` after answers; a model trained with LLaVA-1.5's
`vicuna_v1` template gets a Jinja template that renders
`{system} USER: <image>\\n{q} ASSISTANT: {a}</s>...` (generation prompt ending
`ASSISTANT:`), and a generation config that stops at `</s>`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.encode import tokenize
from ..data.formats import IMAGE_TAG
from ..data.images import is_anyres
from ..data.templates import CHATML_SYSTEM, VICUNA_SYSTEM, stop_token
from ..errors import ModelError, first_line
from ..recipe.schema import ModelConfig

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def vicuna_chat_template(system: str | None, eos_token: str, after_image: str = "\n") -> str:
    """A Jinja chat template that renders lora_llava's `vicuna_v1` template (BOS comes from the tokenizer).

    `after_image` follows each `<image>` (see `text_after_image`): `"\n"`, or `" \n"` where the
    tokenizer needs the space to give the "▁" that training's per-chunk tokenisation gives.
    """
    default_system = json.dumps(system or VICUNA_SYSTEM)
    eos = json.dumps(eos_token)
    image = json.dumps(IMAGE_TAG + after_image)
    return (
        "{%- set ns = namespace(system=" + default_system + ") -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
        "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
        "{%- endif -%}{%- set messages = messages[1:] -%}{%- endif -%}"
        "{{- ns.system + ' ' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- 'USER: ' -}}"
        "{%- if message['content'] is string -%}{{- message['content'] | replace('<image>\\n', " + image + ") -}}"
        "{%- else -%}"
        "{%- for c in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- " + image + " -}}{%- endfor -%}"
        "{%- for c in message['content'] | selectattr('type', 'equalto', 'text') -%}{{- c['text'] -}}{%- endfor -%}"
        "{%- endif -%}{{- ' ' -}}"
        "{%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}"
        "{%- if message['content'] is string -%}{%- set answer = message['content'] -%}"
        "{%- else -%}{%- set answer = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
        "{%- endif -%}"
        "{% generation %}{{- answer + " + eos + " -}}{% endgeneration %}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
    )


# Jinja pieces shared by the templates below: the system message taken off the front, a message's text and images.
_SYSTEM = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set ns.system = messages[0]['content'] -%}"
    "{%- else -%}{%- set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endif -%}{%- set messages = messages[1:] -%}{%- endif -%}"
)


def _user(image: str) -> str:
    return (
        "{%- if message['content'] is string -%}{{- message['content'] | replace('<image>\\n', " + image + ") -}}"
        "{%- else -%}"
        "{%- for c in message['content'] | selectattr('type', 'equalto', 'image') -%}{{- " + image + " -}}{%- endfor -%}"
        "{%- for c in message['content'] | selectattr('type', 'equalto', 'text') -%}{{- c['text'] -}}{%- endfor -%}"
        "{%- endif -%}"
    )


_ANSWER = (
    "{%- if message['content'] is string -%}{%- set answer = message['content'] -%}"
    "{%- else -%}{%- set answer = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
)


def mistral_chat_template(system: str | None, eos_token: str, after_image: str = "\n") -> str:
    """The `mistral_instruct` render: `[INST] {q} [/INST] {a} </s>`, a system prompt in `<<SYS>>` before the first question."""
    image = json.dumps(IMAGE_TAG + after_image)
    return (
        "{%- set ns = namespace(system=" + json.dumps(system or "") + ") -%}" + _SYSTEM + "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- '[INST] ' -}}"
        "{%- if loop.first and ns.system -%}{{- '<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
        + _user(image)
        + "{{- ' [/INST]' -}}{%- elif message['role'] == 'assistant' -%}"
        + _ANSWER
        + "{% generation %}{{- ' ' + answer + ' ' + " + json.dumps(eos_token) + " -}}{% endgeneration %}"
        "{%- endif -%}{%- endfor -%}"
    )


def chatml_chat_template(system: str | None, after_image: str = "\n") -> str:
    """The `chatml_direct` render: ChatML turns with no newline between them, `<|im_end|>` after each."""
    image = json.dumps(IMAGE_TAG + after_image)
    return (
        "{%- set ns = namespace(system=" + json.dumps(system or CHATML_SYSTEM) + ") -%}" + _SYSTEM
        + "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>' -}}{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{- '<|im_start|>user\\n' -}}"
        + _user(image)
        + "{{- '<|im_end|>' -}}{%- elif message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
        + _ANSWER
        + "{% generation %}{{- answer + '<|im_end|>' -}}{% endgeneration %}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def text_after_image(tokenizer) -> str:
    """What the release's template writes after `<image>` so that one-call tokenisation gives training's ids.

    Training tokenises vicuna_v1 text in pieces split at `<image>` (LLaVA's own sequence,
    `<image> ▁ <0x0A> What` with a SentencePiece tokenizer); a processor tokenises the whole
    prompt at once. A legacy tokenizer adds the "▁" after a special token itself; a non-legacy
    one (Vicuna v1.5, llava-hf) needs a space written there. Measured, not read from `legacy`:
    tokenizers built elsewhere need not say which kind they are.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    probe = f"USER: {IMAGE_TAG}\nWhat is it? ASSISTANT: 5{tokenizer.eos_token}USER: {IMAGE_TAG}\n2? ASSISTANT:"
    wanted = tokenize(probe, tokenizer, image_id, image_chunks=True)[0]
    for after in ("\n", " \n"):
        text = probe.replace(IMAGE_TAG + "\n", IMAGE_TAG + after)
        if tokenizer(text, add_special_tokens=False)["input_ids"] == wanted:
            return after
    raise ModelError(
        f"this tokenizer ({type(tokenizer).__name__}) cannot be made to give the training token ids of an image prompt "
        "in one call; the release's chat template would not reproduce training"
    )


def write_config(base_dir: Path, out: Path, dtype: torch.dtype, model: ModelConfig | None = None) -> None:
    """The config the run trained (the base's; NeXT's grid in the reference order; LLaVA-1.5-HD's), with the merged dtype."""
    from transformers import AutoConfig

    from ..model.load import model_config

    config = model_config(model, str(base_dir)) if model is not None else AutoConfig.from_pretrained(base_dir)
    if getattr(config, "quantization_config", None):
        raise ModelError(f"{base_dir}: a quantized checkpoint; merging needs the 16-bit base model the run was loaded from")
    config.dtype = _DTYPE_NAMES[dtype]
    config.save_pretrained(out)


def write_generation_config(base_dir: Path, out: Path, tokenizer, template: str) -> None:
    """The base generation config; with vicuna_v1, generation stops at the tokenizer's `</s>`."""
    from transformers import AutoConfig, GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(base_dir))
    if template in ("vicuna_v1", "mistral_instruct", "chatml_direct"):
        gen.eos_token_id = tokenizer.convert_tokens_to_ids(stop_token(template, tokenizer))
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = tokenizer.pad_token_id
    gen.save_pretrained(out)


_IMAGE_SETTINGS = (
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
)


def release_image_processor(image_processor, aspect: str):
    """An image processor that prepares images as training did.

    Training pads to a square with the CLIP mean colour itself (`image_aspect: pad`), whatever the
    checkpoint's processor does; llava-hf ships a CLIPImageProcessor, which centre-crops and ignores
    `do_pad`. The release gets a LlavaImageProcessor with `do_pad=True` and the same settings.
    """
    if is_anyres(image_processor):
        return image_processor  # AnyRes resizes and pads its tiles itself, in training and here alike
    pads = bool(getattr(image_processor, "do_pad", False))
    if aspect == "crop" and pads:
        image_processor.do_pad = False
    if aspect != "pad" or pads:
        return image_processor
    from transformers import LlavaImageProcessorPil

    settings = {k: v for k, v in image_processor.to_dict().items() if k in _IMAGE_SETTINGS and v is not None}
    return LlavaImageProcessorPil(do_pad=True, **settings)


def write_processor(processor_source: str | Path, out: Path, template: str, system_prompt: str | None, aspect: str = "pad"):
    """The run's processor (the one it trained with), with a chat template that renders its prompt; returns it."""
    from transformers import AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(processor_source)
    except OSError as e:
        raise ModelError(f"{processor_source}: cannot load the processor ({first_line(e)})") from None
    tok = processor.tokenizer
    chat = {
        "vicuna_v1": lambda: vicuna_chat_template(system_prompt, tok.eos_token, text_after_image(tok)),
        "mistral_instruct": lambda: mistral_chat_template(system_prompt, tok.eos_token, text_after_image(tok)),
        "chatml_direct": lambda: chatml_chat_template(system_prompt, text_after_image(tok)),
    }.get(template)
    if chat is not None:
        processor.chat_template = processor.tokenizer.chat_template = chat()
    processor.image_processor = release_image_processor(processor.image_processor, aspect)
    processor.save_pretrained(out)
    return processor
