"""Original-format LLaVA-1.5 and LLaVA-NeXT checkpoints -> llava-hf folders (`lora-llava convert SRC DST`).

The original layout (liuhaotian/llava-v1.5-7b, LLaVA-Med checkpoints of the same
code): `LlavaLlamaForCausalLM` (or `LlavaMistralForCausalLM`), the LLM's weights
under `model.*` and `lm_head`, the projector as `model.mm_projector.0/2` (an
nn.Sequential: Linear, GELU, Linear), and the vision tower only named by
`mm_vision_tower`: its weights come from that CLIP checkpoint. The tokenizer
is the plain LLM's; LLaVA marked images with the id -200, which llava-hf
replaces by an `<image>` token, so conversion adds `<image>` and `<pad>` and
grows the embeddings exactly as composing a new model does.

LLaVA-NeXT checkpoints of that code (liuhaotian/llava-v1.6-vicuna-7b) add
`image_aspect_ratio: anyres`, `mm_patch_merge_type: spatial_unpad`, the grid
`image_grid_pinpoints` ([width, height] pairs) and `model.image_newline`; they
become LlavaNextForConditionalGeneration folders whose grid picks as the
reference code does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import ModelError, describe
from ..io import atomic_dir, refuse_nonempty
from ..recipe.schema import ModelConfig
from .compose import add_llava_tokens, assemble, llava_config, load_tokenizer, load_vision_tower, resize_vocab
from .family import next_config
from .load import DTYPES, check_source
from .processor import llava_processor, next_processor

ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
FEATURE_STRATEGIES = {"patch": "default", "cls_patch": "full"}  # mm_vision_select_feature -> llava-hf
# Config keys of LLaVA's own code, not of the language model.
_LLAVA_KEY_PREFIXES = ("mm_", "tune_mm", "freeze_mm", "unfreeze_mm", "use_mm", "image_", "tokenizer_")
# The CLIP tower inside a checkpoint (LLaVA's CLIPVisionTower wraps a CLIPVisionModel): transformers 4
# saved CLIPVisionModel's weights under `vision_model.`, transformers 5 without that level. Longest first.
_VISION_PREFIXES = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_tower.")
_META_KEYS = ("architectures", "model_type", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache")


def convert_checkpoint(
    src: str | Path, dst: str | Path, vision_tower: str | None = None, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write the llava-hf folder of the original-format checkpoint `src` to `dst`; returns `dst`.

    `vision_tower` replaces the config's `mm_vision_tower` (a local CLIP folder when the hub
    is out of reach). `dtype` defaults to the checkpoint's own. The folder appears complete or
    not at all; a non-empty `dst` is replaced only with `overwrite`.
    """
    src, dst = local_source(str(src)), Path(dst)
    original = read_original_config(src)
    refuse_nonempty(dst, "DST", overwrite)
    dtype = dtype or source_dtype(original)
    if dtype not in DTYPES:
        raise ModelError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    model, processor = build_converted(src, original, vision_tower or original["mm_vision_tower"], dtype)
    with atomic_dir(dst, "DST", overwrite) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return dst


def local_source(src: str) -> Path:
    """A local checkpoint folder, or a hub id downloaded (config, tokenizer, weights) to the hub cache."""
    if Path(src).expanduser().is_dir():
        return Path(src).expanduser()
    repo = check_source(src, "SRC")  # a missing local path fails here with a clear message
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown repo, gated repo: one line
        raise ModelError(
            f"SRC: {src} is no local folder, and downloading it failed ({describe(e)})"
        ) from None


def read_original_config(src: Path) -> dict:
    """The checkpoint's config.json, checked to be the LLaVA-1.5 layout this module converts."""
    path = src / "config.json"
    if not path.is_file():
        raise ModelError(f"{src}: no config.json (not a model folder)")
    config = json.loads(path.read_text(encoding="utf-8"))
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        hint = " (already llava-hf: use it as model.name_or_path)" if arch == "LlavaForConditionalGeneration" else ""
        raise ModelError(f"{path}: architecture {arch} is not an original LLaVA checkpoint ({', '.join(ARCHITECTURES)}){hint}")
    problems = []
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(f"mm_projector_type {config.get('mm_projector_type', 'linear')!r} (LLaVA-1.5 uses mlp2x_gelu)")
    if config.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end: true (llava-hf has no image start/end tokens)")
    if config.get("image_aspect_ratio") not in (None, "pad", "square", "anyres"):
        problems.append(f"image_aspect_ratio {config.get('image_aspect_ratio')!r} (LLaVA-1.5 uses pad, LLaVA-NeXT anyres)")
    if config.get("image_aspect_ratio") == "anyres":
        if config.get("mm_patch_merge_type") != "spatial_unpad":
            problems.append(f"mm_patch_merge_type {config.get('mm_patch_merge_type')!r} (llava-hf LLaVA-NeXT is spatial_unpad)")
        grid = config.get("image_grid_pinpoints")
        if not (isinstance(grid, list) and grid and all(isinstance(p, list) and len(p) == 2 for p in grid)):
            problems.append(f"image_grid_pinpoints {grid!r} (a list of [width, height] pairs)")
    if config.get("mm_vision_select_feature", "patch") not in FEATURE_STRATEGIES:
        problems.append(f"mm_vision_select_feature {config.get('mm_vision_select_feature')!r}")
    if not config.get("mm_vision_tower"):
        problems.append("no mm_vision_tower")
    if problems:
        raise ModelError(f"{path}: cannot convert: {'; '.join(problems)}")
    return config


def read_weights(src: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: safetensors files, or PyTorch .bin shards (read without unpickling code)."""
    files = sorted(src.glob("*.safetensors")) or sorted(src.glob("pytorch_model*.bin"))
    if not files:
        raise ModelError(f"{src}: no *.safetensors or pytorch_model*.bin weights")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            if f.suffix == ".safetensors":
                from safetensors.torch import load_file

                state.update(load_file(str(f)))
            else:
                state.update(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # truncated downloads are common with multi-GB shards
            raise ModelError(f"{f}: cannot read the weights ({describe(e)})") from None
    return state


def rename_weights(state: dict[str, torch.Tensor], src: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(llava-hf language model + projector weights, vision weights stored in the checkpoint, if any)."""
    out, vision = {}, {}
    for k, v in state.items():
        if k.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; recomputed from the config
            continue
        if k.startswith("model.mm_projector."):
            index, rest = k[len("model.mm_projector.") :].split(".", 1)
            if index not in ("0", "2"):
                raise ModelError(f"{src}: unexpected projector weight {k} (mlp2x_gelu has layers 0 and 2)")
            out[f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"] = v
        elif k == "model.image_newline":  # LLaVA-NeXT's row separator
            out[k] = v
        elif k.startswith(_VISION_PREFIXES):
            prefix = next(p for p in _VISION_PREFIXES if k.startswith(p))
            vision["model.vision_tower." + k[len(prefix) :]] = v
        elif k.startswith("model."):
            out["model.language_model." + k[len("model.") :]] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            raise ModelError(f"{src}: unexpected weight {k} for an original LLaVA checkpoint")
    if not any(k.startswith("model.multi_modal_projector.") for k in out):
        raise ModelError(f"{src}: no model.mm_projector weights (a checkpoint of the LLM alone?)")
    return out, vision


def source_dtype(original: dict) -> str:
    """The checkpoint's own dtype: transformers 5 writes `dtype` in config.json, older versions `torch_dtype`."""
    return original.get("dtype") or original.get("torch_dtype") or "float16"


def text_config_of(original: dict):
    """The language model's own config: the original config without LLaVA's keys."""
    from transformers import AutoConfig

    kept = {k: v for k, v in original.items() if not k.startswith(_LLAVA_KEY_PREFIXES) and k not in _META_KEYS}
    return AutoConfig.for_model(ARCHITECTURES[original["architectures"][0]], **kept)


def build_converted(src: Path, original: dict, vision_source: str, dtype: str):
    """The converted LlavaForConditionalGeneration (on the CPU) and its processor."""
    torch_dtype = DTYPES[dtype]
    tokenizer = load_tokenizer(str(src), "SRC")
    text_state, inline_vision = rename_weights(read_weights(src), src)
    vision_state, vision_config = load_vision_tower(vision_source, torch_dtype, key="--vision-tower")
    if original.get("mm_hidden_size", vision_config.hidden_size) != vision_config.hidden_size:
        raise ModelError(
            f"--vision-tower: {vision_source} has hidden size {vision_config.hidden_size}, "
            f"the checkpoint's projector expects mm_hidden_size {original['mm_hidden_size']}"
        )
    if inline_vision:  # checkpoints that trained or shipped the tower carry its weights: those win
        unknown = sorted(set(inline_vision) - set(vision_state))
        if unknown:
            raise ModelError(
                f"{src}: {len(unknown)} vision tower weight(s) that the CLIP tower {vision_source} does not have, "
                f"e.g. {unknown[0]} (llava-hf name)"
            )
        vision_state.update(inline_vision)
    n_original = add_llava_tokens(tokenizer)
    config = llava_config(
        vision_config,
        text_config_of(original),
        tokenizer,
        feature_layer=original.get("mm_vision_select_layer", -2),
        strategy=FEATURE_STRATEGIES[original.get("mm_vision_select_feature", "patch")],
    )
    state = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in {**vision_state, **text_state}.items()}
    config.text_config.vocab_size = resize_vocab(state, n_original, len(tokenizer))
    anyres = original.get("image_aspect_ratio") == "anyres"
    if anyres:  # LLaVA-NeXT: its grid as the reference code reads it (family.adopt_reference_grid)
        config = next_config(config, original["image_grid_pinpoints"])
    elif "model.image_newline" in state:
        raise ModelError(f"{src}: an image_newline weight, but image_aspect_ratio is not anyres")
    model = assemble(config, state, ModelConfig(dtype=dtype), on_cpu=True)
    if anyres:
        return model, next_processor(tokenizer, config)
    return model, llava_processor(tokenizer, config, do_pad=original.get("image_aspect_ratio") == "pad")
