"""A LLaVA model of a recipe on fake CUDA tensors, loaded as `from_pretrained` loads it, and a batch of its worst case.

The skeleton is built on the meta device from the built-in shape; the
bitsandbytes quantizer of transformers then replaces the linear layers that
lora-llava's `quantization_config` (its skip list included) quantizes, exactly as
`from_pretrained` does before reading weights; each weight is then "loaded":
16-bit parameters become fake CUDA tensors, and 4-bit ones go through
`bitsandbytes.functional.quantize_4bit` under FakeTensorMode, which gives the
uint8 codes and the quantization state (absmax, nested absmax, code tables) in
the shapes and dtypes a real load gives. A fake tensor cannot be wrapped in a
`Params4bit` subclass, so the 4-bit weight is a plain Parameter carrying the
same attributes; bitsandbytes and peft read only those.
"""

from __future__ import annotations

import torch

from lora_llava.memory.shapes import ModelShape
from lora_llava.recipe.schema import Recipe

IMAGE_TOKEN, PAD_TOKEN, BOS = 32000, 32001, 1  # llava-hf's <image> and <pad>; LLaMA's <s>
DEVICE = torch.device("cuda", 0)


def llava_config(shape: ModelShape, recipe: Recipe):
    """The transformers config of the shape: LLaVA-1.5, or LLaVA-NeXT / 1.5-HD when the shape has an AnyRes grid."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from lora_llava.model.family import next_config

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate, num_hidden_layers=shape.vision_layers,
        num_attention_heads=max(1, shape.vision_hidden // 64), image_size=shape.image_size, patch_size=shape.patch_size,
        projection_dim=768, hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        max_position_embeddings=max(4096, recipe.data.max_length), rms_norm_eps=1e-5, tie_word_embeddings=shape.tied,
        pad_token_id=PAD_TOKEN,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=shape.patches,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
        tie_word_embeddings=shape.tied,
    )  # fmt: skip
    if shape.grid:  # a NeXT checkpoint and a LLaVA-1.5 made HD load into the same class with the same grid
        config = next_config(config, [list(p) for p in shape.grid])
    return config


def skeleton(shape: ModelShape, recipe: Recipe):
    """The model on the meta device, its linear layers replaced by the quantizer as `from_pretrained` does; and the quantizer."""
    from transformers.quantizers import AutoHfQuantizer

    from lora_llava.model.family import family_of, model_class
    from lora_llava.model.load import quantization_config, resolve_dtype

    config = llava_config(shape, recipe)
    dtype = resolve_dtype(recipe.model.dtype)
    with torch.device("meta"):
        model = model_class(family_of(config))._from_config(
            config, dtype=dtype, attn_implementation=recipe.model.attn_implementation
        )
    quant = quantization_config(recipe.model, dtype)
    quantizer = None
    if quant is not None:
        quantizer = AutoHfQuantizer.from_config(quant, pre_quantized=False)
        quantizer.preprocess_model(model, device_map={"": 0}, dtype=dtype)
    return model, quantizer


def load_fake(model, quantizer, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer a fake CUDA tensor; 4-bit layers quantized as bitsandbytes' Params4bit.to does.

    Call under FakeTensorMode.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            _quantize_fake(module, dtype)
        for name, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(module, name, torch.nn.Parameter(torch.empty_like(p, device=DEVICE), requires_grad=False))
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=DEVICE)
    if quantizer is not None:
        quantizer.postprocess_model(model)
        model.hf_quantizer = quantizer


def _quantize_fake(layer, dtype: torch.dtype) -> None:
    from bitsandbytes.functional import quantize_4bit

    old = layer.weight
    w = torch.empty(layer.out_features, layer.in_features, dtype=dtype, device=DEVICE)  # the checkpoint's 16-bit weight
    codes, state = quantize_4bit(
        w, blocksize=old.blocksize, compress_statistics=old.compress_statistics, quant_type=old.quant_type,
        quant_storage=old.quant_storage,
    )  # fmt: skip
    weight = torch.nn.Parameter(codes, requires_grad=False)
    for key in ("blocksize", "compress_statistics", "quant_type", "quant_storage"):
        setattr(weight, key, getattr(old, key))
    weight.quant_state, weight.bnb_quantized, weight.module = state, True, layer
    layer.weight = weight
    layer.quant_state = state


def quant_state_tensors(model) -> list[torch.Tensor]:
    """The tensors of every 4-bit weight's quantization state: allocated, yet neither parameters nor buffers."""
    import bitsandbytes as bnb

    out = []
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            out += [qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    return out


def worst_case_batch(shape: ModelShape, recipe: Recipe, shadows, fake_mode) -> dict:
    """A batch as lora-llava's collate gives it, each sample of the recipe's full length with the worst-case image.

    BOS and the image tokens are masked; every text token is supervised (the most
    rows the loss can score). Ids, labels, mask and image sizes keep real copies in
    `shadows`: the model counts image tokens and the loss picks supervised rows by value.
    Call outside FakeTensorMode: the copies must be real.
    """
    b, n, images = recipe.train.batch_size, recipe.data.max_length, shape.image_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, IMAGE_TOKEN, (b, n), generator=g)
    ids[:, 0], ids[:, 1 : 1 + images] = BOS, IMAGE_TOKEN
    labels = ids.clone()
    labels[:, : 1 + images] = -100
    real = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    if shape.grid:  # an image of the largest grid's own shape fills every tile: (height, width) as the processor gives
        (h, w) = max(shape.grid, key=lambda p: p[0] * p[1])
        real["image_sizes"] = torch.tensor([[h, w]] * b)
    crops = shape.vision_tokens // shape.patches  # the global view and every tile
    size = (b, crops, 3, shape.image_size, shape.image_size) if shape.grid else (b, 3, shape.image_size, shape.image_size)
    with fake_mode:
        batch = {k: shadows.add(torch.empty_like(v, device=DEVICE), v) for k, v in real.items()}
        batch["pixel_values"] = torch.empty(size, dtype=torch.float32, device=DEVICE)  # the processor's fp32 output
    return batch


def storage_bytes(tensors) -> int:
    """Bytes the CUDA allocator gives these tensors: each storage once, in blocks of 512 bytes."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st._cdata] = -(-st.nbytes() // 512) * 512  # the StorageImpl: views share it
    return sum(seen.values())
