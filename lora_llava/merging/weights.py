"""What each merged tensor is: base weight (as trained or original) + LoRA delta, or the trained projector.

The model an adapter was trained against is not the 16-bit checkpoint when
the run used QLoRA: bitsandbytes cast each linear weight of the language model
to the compute dtype and quantized it to NF4 (blocks of 64, double-quantized
scales) at load time, and the adapter learned to correct *that* model. The
faithful merge therefore rebuilds those weights with the same bitsandbytes
calls, dequantizes them, and adds `scale * B @ A` in fp32. It never
re-quantizes the result: `merge_and_unload` on a 4-bit model does, and on the
tiny test model its logits move 38 times as far (BENCHMARKS.md).

Key names follow the checkpoint, whichever naming it uses: llava-hf files say
`language_model.model.layers.N...` and `multi_modal_projector...`, the models
built from them say `model.language_model.layers.N...`; both end the same way.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError
from ..model.projector import NEWLINE, PROJECTOR_MODULE
from .shards import TensorFile, TensorSpec

# layer index, block (self_attn | mlp), linear name
ModuleId = tuple[int, str, str]

_LLM_LINEAR = re.compile(r"(?:^|\.)language_model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$")
_LORA = re.compile(r"(?:^|\.)language_model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")
_PROJECTOR = PROJECTOR_MODULE + "."
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers' loader uses


def llm_linear(key: str) -> ModuleId | None:
    """(layer, block, name) when `key` is a linear weight of the language model (the layers QLoRA quantizes)."""
    if "vision_tower" in key:
        return None
    m = _LLM_LINEAR.search(key)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def projector_suffix(key: str) -> str | None:
    """`linear_1.weight` for any key of the projector, whatever prefix the file uses; `image_newline` for AnyRes's,
    which trains and merges with the projector."""
    if key == NEWLINE or key.endswith("." + NEWLINE):
        return NEWLINE
    return key.split(_PROJECTOR, 1)[1] if _PROJECTOR in key else None


@dataclass
class Adapter:
    """A PEFT LoRA adapter folder: where each module's A and B live, the scale, the projector copy."""

    file: Path
    scale: float
    lora: dict[ModuleId, tuple[str, str]] = field(default_factory=dict)  # id -> (key of A, key of B)
    shapes: dict[ModuleId, tuple[int, int]] = field(default_factory=dict)  # id -> (out, in) of B @ A
    projector: dict[str, str] = field(default_factory=dict)  # suffix -> key

    def delta(self, module: ModuleId, handle) -> torch.Tensor:
        """scale * B @ A in fp32, read from the open adapter file `handle` (a TensorFile)."""
        key_a, key_b = self.lora[module]
        a = handle.get_tensor(key_a).float()
        b = handle.get_tensor(key_b).float()
        return (b @ a).mul_(self.scale)


_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "alpha_pattern": "per-module alpha (alpha_pattern)",
    "rank_pattern": "per-module rank (rank_pattern)",
    "fan_in_fan_out": "fan_in_fan_out weights",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
}


def read_adapter(folder: Path) -> Adapter:
    """Parse adapter_config.json and index adapter_model.safetensors (no weights loaded)."""
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise ModelError(f"{folder}: adapter_config.json but no adapter_model.safetensors")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{config_file}: peft_type {config.get('peft_type')!r}; only LoRA adapters can be merged")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise ModelError(f"{config_file}: {key} is set; merging {what} is not supported")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{config_file}: bias {config['bias']!r}; only bias: none adapters can be merged")
    r = int(config["r"])
    scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
    adapter = Adapter(weights, scale)
    halves: dict[ModuleId, dict[str, tuple[str, tuple[int, ...]]]] = {}
    with TensorFile(weights) as f:
        for spec in f.specs():
            key, shape = spec.name, spec.shape
            m = _LORA.search(key)
            if m and "vision_tower" not in key:
                halves.setdefault((int(m.group(1)), m.group(2), m.group(3)), {})[m.group(4)] = (key, shape)
            elif projector_suffix(key) and ".lora_" not in key:
                adapter.projector[projector_suffix(key)] = key
            else:
                raise ModelError(
                    f"{weights}: unexpected tensor {key} (lora-llava merges LoRA on the language model and the projector)"
                )
    for module, parts in sorted(halves.items()):
        if set(parts) != {"A", "B"} or parts["A"][1][0] != r or parts["B"][1][1] != r:
            raise ModelError(
                f"{weights}: LoRA A/B of layer {module[0]} {module[1]}.{module[2]} are incomplete or not of rank {r}"
            )
        adapter.lora[module] = (parts["A"][0], parts["B"][0])
        adapter.shapes[module] = (parts["B"][1][0], parts["A"][1][1])
    return adapter


def added_tensors(specs: list[TensorSpec], projector: dict[str, torch.Tensor] | None, anyres: bool) -> dict[str, torch.Tensor]:
    """Trained tensors the base lacks: a LLaVA-1.5 base made LLaVA-1.5-HD gets its image_newline, named as its file names
    the projector (`image_newline` beside `multi_modal_projector.*`, `model.image_newline` beside `model.multi_...`)."""
    if not (anyres and projector and NEWLINE in projector) or any(projector_suffix(s.name) == NEWLINE for s in specs):
        return {}
    prefix = next(s.name.split(_PROJECTOR, 1)[0] for s in specs if _PROJECTOR in s.name)
    return {prefix + NEWLINE: projector[NEWLINE]}


def check_fit(
    specs: list[TensorSpec], adapter: Adapter | None, projector: dict[str, torch.Tensor] | None, where: str, added=()
) -> None:
    """Every LoRA module and projector tensor must exist in the base with the same shape (or be `added` to it)."""
    linears = {llm_linear(s.name): s for s in specs if llm_linear(s.name)}
    proj = {projector_suffix(s.name): s for s in specs if projector_suffix(s.name)}
    if not linears or not proj:
        raise ModelError(f"{where}: not a LLaVA checkpoint (no language-model layers or no multi_modal_projector)")
    problems = []
    for module, shape in (adapter.shapes if adapter else {}).items():
        spec = linears.get(module)
        if spec is None or spec.shape != shape:
            found = spec.shape if spec else "missing"
            problems.append(f"layer {module[0]} {module[1]}.{module[2]}: adapter {shape}, base {found}")
    for suffix, tensor in (projector or {}).items():
        if suffix == NEWLINE and any(projector_suffix(k) == NEWLINE for k in added):
            continue
        spec = proj.get(suffix)
        if spec is None or spec.shape != tuple(tensor.shape):
            problems.append(f"projector {suffix}: trained {tuple(tensor.shape)}, base {spec.shape if spec else 'missing'}")
    if problems:
        raise ModelError(
            f"{where}: the adapter does not fit this base model ({'; '.join(problems[:3])}); is --base the model it was trained on?"
        )


def trained_base_weight(weight: torch.Tensor, quantization: str, train_dtype: torch.dtype, quant_config=None) -> torch.Tensor:
    """The weight a linear layer of the language model held during training, in fp32.

    Quantization happens exactly as at load time: cast to the compute dtype,
    then NF4 (or int8 row-wise) on the device training used. Pinned bit-exact
    against a loaded `Linear4bit` by the tests.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = weight.to(device=device, dtype=train_dtype)
    if quantization == "nf4":
        import bitsandbytes.functional as bnbf

        q, state = bnbf.quantize_4bit(
            w,
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=quant_config.bnb_4bit_use_double_quant,
            quant_type=quant_config.bnb_4bit_quant_type,
        )
        w = bnbf.dequantize_4bit(q, state)
    elif quantization == "int8":
        import bitsandbytes.functional as bnbf

        codes, scales, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16))
        w = bnbf.int8_vectorwise_dequant(codes, scales)
    return w.to("cpu", torch.float32)


@dataclass
class MergeRule:
    """How every base tensor becomes an output tensor."""

    mode: str  # trained | original
    quantization: str  # none | nf4 | int8 (as the run trained)
    train_dtype: torch.dtype
    out_dtype: torch.dtype
    adapter: Adapter | None = None
    projector: dict[str, torch.Tensor] | None = None  # suffix -> trained projector tensor
    quant_config: object | None = None  # transformers' BitsAndBytesConfig of the run
    anyres: bool = False  # the run made a LLaVA-1.5 base LLaVA-1.5-HD (model.anyres)

    def output_spec(self, spec: TensorSpec) -> TensorSpec:
        return TensorSpec(spec.name, self.out_dtype if spec.dtype.is_floating_point else spec.dtype, spec.shape)

    def apply(self, name: str, tensor: torch.Tensor, adapter_handle=None) -> torch.Tensor:
        """The merged value of base tensor `name`."""
        if not tensor.is_floating_point():
            return tensor
        suffix = projector_suffix(name)
        if self.projector and suffix in self.projector:
            return self.projector[suffix].to(self.out_dtype)
        module = llm_linear(name)
        if module is None:
            # trained: as the run held it (cast to its dtype); original: the checkpoint's precision
            return (tensor.to(self.train_dtype) if self.mode == "trained" else tensor).to(self.out_dtype)
        if self.mode == "trained":
            w = trained_base_weight(tensor, self.quantization, self.train_dtype, self.quant_config)
        else:
            w = tensor.float()
        if self.adapter is not None and module in self.adapter.lora:
            w += self.adapter.delta(module, adapter_handle)
        return w.to(self.out_dtype)
