"""LoRA's forward pass for peft's plain Linear layers, with its scaling on the rank and its sum fused into the matmul.

peft computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: the scaling
multiplies, and the sum adds, the full `tokens x out_features` output, twice
per step under checkpointing and once more in the backward pass. Here the
scaling (with dropout's 1/(1-p), see training/dropout.py) multiplies the
`tokens x r` output of lora_A instead, and `torch.addmm` adds lora_B's product
to the base output inside the matmul. The result is the same function; it
differs from peft's only in the rounding of the reordered products.

Anything else (merged or disabled adapters, several adapters, DoRA and other
variants, LoRA biases, mixed-batch `adapter_names`, dtypes autocast does not
reconcile) takes peft's own forward. bitsandbytes' quantized layers keep peft's
forward too.
"""

from __future__ import annotations

import types

import torch

from .dropout import LoraDropout


def _fusable(layer, args: tuple, kwargs: dict) -> str | None:
    """The one adapter this call can compute on the fused path, or None for peft's forward."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    if layer.lora_A[name].bias is not None or layer.lora_B[name].bias is not None:
        return None
    return name


def fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    name = _fusable(self, args, kwargs)
    if name is None:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    x = self._cast_input_dtype(x, lora_a.weight.dtype)
    dropout = self.lora_dropout[name]
    dropped, owed = dropout.drop(x) if isinstance(dropout, LoraDropout) else (dropout(x), 1.0)
    low = lora_a(dropped) * (self.scaling[name] * owed)  # tokens x r: the cheap place to scale
    if low.dtype != result.dtype and not torch.is_autocast_enabled(x.device.type):
        return result + lora_b(low).to(result.dtype)  # as peft: LoRA's output cast to the layer's dtype
    out = torch.addmm(result.reshape(-1, result.shape[-1]), low.reshape(-1, low.shape[-1]), lora_b.weight.t())
    return out.view(result.shape)


def fuse_lora_forward(model) -> int:
    """Give every plain peft LoRA Linear of `model` the fused forward; returns how many."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear]
    for layer in layers:
        layer.forward = types.MethodType(fused_forward, layer)
    # A shared dropout leaves its scale to its readers only when all of them are fused.
    fused = {id(m) for m in layers}
    readers: dict[int, tuple[LoraDropout, list[bool]]] = {}
    for m in model.modules():
        dropouts = m.lora_dropout.values() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict) else ()
        for d in dropouts:
            if isinstance(d, LoraDropout):
                readers.setdefault(id(d), (d, []))[1].append(id(m) in fused)
    for d, flags in readers.values():
        d.fold_scale = all(flags)
    return len(layers)
