"""Load a LLaVA-1.5 model and its processor: dtype, quantization, attention kernel.

QLoRA quantizes the language model only. transformers 5 matches
`llm_int8_skip_modules` from the start of a module path or as a whole suffix,
so the skip list must name `model.vision_tower` and `model.multi_modal_projector`
in full (`vision_tower` alone quantizes CLIP), and must list `lm_head` itself
because any user list replaces the automatic lm_head skip.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from ..distributed import fsdp_enabled
from ..errors import ModelError, first_line
from ..recipe.schema import ModelConfig

QUANT_SKIP_MODULES = ["model.vision_tower", "model.multi_modal_projector", "lm_head"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bf16 on a GPU that supports it, fp16 on older GPUs, fp32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_source(name_or_path: str, key: str = "model.name_or_path") -> str:
    """A local folder that exists, or something shaped like a hub id; otherwise a clear error."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"{key}: {name_or_path} has no config.json (not a transformers model folder)")
        return str(p)
    looks_local = name_or_path.startswith(("/", ".", "~")) or name_or_path.count("/") != 1 or p.exists()
    if looks_local:
        raise ModelError(f"{key}: model folder {name_or_path} not found")
    from .hub import require_hub

    require_hub(name_or_path, key)
    return name_or_path


def refused_pickle(files: Iterable[Path]) -> Path | None:
    """The first torch file that `torch.load(weights_only=True)` refuses; memory-mapped, so only its structure is read."""
    for p in files:
        if p.suffix not in (".bin", ".pt", ".pth") or not p.is_file():
            continue
        try:
            torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError:
            return p
        except Exception:  # noqa: BLE001 - another failure is not the refused pickle being looked for
            continue
    return None


@contextlib.contextmanager
def pickles_named(folder: str | Path, key: str) -> Iterator[None]:
    """transformers reads pytorch_model.bin with `weights_only=True`; a pickle it refuses becomes one line naming the file."""
    try:
        yield
    except pickle.UnpicklingError:
        p = Path(folder)
        culprit = refused_pickle(sorted(p.rglob("*"), key=lambda f: f.name)) if p.is_dir() else None
        raise ModelError(
            f"{key}: {culprit or folder} holds pickled Python objects, not only tensors, and was refused (nothing in it "
            "ran); use safetensors weights"
        ) from None


def quantization_config(cfg: ModelConfig, compute_dtype: torch.dtype):
    """BitsAndBytesConfig for the language model only (NF4 + double quant, or int8)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            # FSDP shards flat tensors of one dtype: packing the 4-bit weights into the model's own
            # dtype (bf16) instead of uint8 lets them shard beside the 16-bit weights (FSDP-QLoRA).
            bnb_4bit_quant_storage=compute_dtype if fsdp_enabled() else torch.uint8,
            llm_int8_skip_modules=QUANT_SKIP_MODULES,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=QUANT_SKIP_MODULES)


def device_map() -> dict | None:
    """Each process places the whole model on its own GPU (data parallel); None on CPU."""
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


def load_processor(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoProcessor

    from .family import adopt_reference_grid

    src = check_source(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(src, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise ModelError(f"model.name_or_path: cannot load the processor of {name_or_path} ({first_line(e)})") from None
    adopt_reference_grid(None, getattr(processor, "image_processor", None))  # a NeXT grid, chosen as the reference does
    return processor


def loading_kwargs(cfg: ModelConfig, on_cpu: bool = False) -> dict:
    """`from_pretrained` arguments for the recipe's dtype, attention kernel, quantization and device placement."""
    dtype = resolve_dtype(cfg.dtype)
    kwargs = dict(dtype=dtype, attn_implementation=cfg.attn_implementation)
    quant = quantization_config(cfg, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    dm = None if on_cpu else device_map()
    if dm is not None or quant is not None:
        kwargs["device_map"] = dm or {"": "cpu"}  # bitsandbytes places weights as it quantizes them
    return kwargs


def freeze_for_training(model):
    """No KV cache (training never reuses it) and nothing trainable: the training code decides what trains."""
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading report: reading CLIP's vision half lists every text-tower weight."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def model_config(cfg: ModelConfig, src: str):
    """The config the model is built with: the checkpoint's, NeXT grids in the reference order, LLaVA-1.5-HD if asked."""
    from transformers import AutoConfig

    from .family import LLAVA, adopt_reference_grid, family_of, next_config

    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.name_or_path: cannot read the config of {src} ({first_line(e)})") from None
    if cfg.anyres and family_of(config) == LLAVA:
        return next_config(config, cfg.image_grid_pinpoints)
    adopt_reference_grid(config)
    return config


def load_model(cfg: ModelConfig, name_or_path: str | None = None, seed: int = 0):
    """The LLaVA model the recipe describes, of its family (frozen; training code decides what trains).

    With `model.anyres` a LLaVA-1.5 checkpoint loads into LLaVA-NeXT's class: every weight carries over, and the one
    the 1.5 checkpoint lacks, `image_newline`, is drawn as LLaVA-NeXT initialises it, from `seed`.
    """
    from .family import family_of, init_image_newline, model_class

    src = check_source(name_or_path or cfg.name_or_path)
    config = model_config(cfg, src)
    kwargs = dict(loading_kwargs(cfg), trust_remote_code=cfg.trust_remote_code, revision=cfg.revision, config=config)
    try:
        # Quiet: converting a LLaVA-1.5 to HD reports image_newline as missing, and it is drawn below.
        with pickles_named(src, "model.name_or_path"), quiet_transformers():
            model, info = model_class(family_of(config)).from_pretrained(src, output_loading_info=True, **kwargs)
    except OSError as e:
        raise ModelError(f"model.name_or_path: cannot load {src} ({first_line(e)})") from None
    except ValueError as e:
        if "attn_implementation" in str(e) or "attention" in str(e).lower():
            raise ModelError(f"model.attn_implementation: {first_line(e)}") from None
        raise
    odd = sorted(set(info["missing_keys"]) - {"model.image_newline"}) + sorted(info["unexpected_keys"])
    if odd:  # the loading report is silenced above; what it would have said beyond image_newline is said here
        logging.getLogger("lora_llava").warning("%s: weights missing or unused when loading: %s", src, ", ".join(odd[:8]))
    if "model.image_newline" in info["missing_keys"]:  # LLaVA-1.5-HD from a LLaVA-1.5: a new, seeded image_newline
        newline = model.model.image_newline
        newline.data = init_image_newline(newline.numel(), seed, newline.dtype).to(newline.device)
    return freeze_for_training(model)


def quantized_module_names(model) -> set[str]:
    """Names of the 4-bit / 8-bit linear layers in `model`."""
    import bitsandbytes as bnb

    return {n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
