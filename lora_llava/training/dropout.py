"""LoRA's dropout: one mask per input, shared by the projections that read it, and cheap to draw on a CPU.

peft gives every adapted projection its own dropout: q, k and v each draw a
mask over the same hidden states, gate and up over the same MLP input, so a
decoder layer draws seven masks where four inputs exist. Drawing a mask is a
random number per element, the dearest elementwise operation there is on a
CPU (a training step of the tiny benchmark model spent about a fifth of its
time in it). Sharing keeps what each projection sees, its input with a share
`p` of the elements zeroed and the rest scaled by 1/(1-p), and draws one mask
per input.

Where the LoRA weights are fp32 and the layer 16-bit, peft first casts the
input for each projection; the cast is shared too (and skipped under
autocast), so the projections see one tensor and the mask is shared whatever
the dtypes. Checkpointed
layers recompute the same masks: the recompute replays the same draws from
the same random state.
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import nn

# Projections of one decoder layer that read the same tensor (LLaMA / Mistral naming).
SHARED_INPUTS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))


class _Memo:
    """The last result computed from one input, handed to the next `readers - 1` callers that pass the same input.

    The input is held weakly and checked with its version counter, so a freed or
    modified tensor is never mistaken for the one seen; the result is let go as
    soon as every reader has had it, so nothing outlives the layer's forward pass.
    """

    def __init__(self, readers: int):
        self.readers = readers
        self._source: weakref.ref | None = None
        self._version = -1
        self._result: torch.Tensor | None = None
        self._served = 0

    def get(self, x: torch.Tensor, compute):
        if self._result is not None and self._source is not None and self._source() is x and x._version == self._version:
            result = self._result
        else:
            result = compute(x)
            self._source, self._version, self._result, self._served = weakref.ref(x), x._version, result, 0
        self._served += 1
        if self._served >= self.readers:
            self._source = self._result = None
        return result


class _CpuDropout(torch.autograd.Function):
    """Dropout for CPU tensors, the 1/(1-p) scale optional: the mask from uniform floats, in the input's dtype.

    torch's CPU dropout draws its mask with bernoulli_; comparing uniform floats
    with p draws the same Bernoulli(1 - p) mask faster. The mask stays in the
    input's dtype: a float times a bool tensor takes torch's unvectorised casting
    loop, 30 times slower than a float times a float. The scale can be left to the
    caller, which folds it into LoRA's own (training/lora_forward.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, scale: float = 1.0) -> torch.Tensor:
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device).ge_(p)  # 0. or 1., drawn in fp32 whatever x is
        keep = keep.to(x.dtype)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        out = x * keep
        return out if scale == 1.0 else out.mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        g = grad * keep
        return (g if ctx.scale == 1.0 else g.mul_(ctx.scale)), None, None


class LoraDropout(nn.Dropout):
    """nn.Dropout whose mask is drawn once per input for the `readers` projections that share it."""

    def __init__(self, p: float, readers: int = 1):
        super().__init__(p)
        self._memo = _Memo(readers)
        # True when every reader folds the scale into its own (the fused LoRA forward): the mask is all that is drawn.
        self.fold_scale = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped, scale = self.drop(x)
        return dropped if scale == 1.0 else dropped * scale

    def drop(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with dropped elements zeroed, the scale still owed to the kept ones): dropout is x * mask * scale."""
        if not self.training or self.p == 0:
            return x, 1.0
        return self._memo.get(x, self._draw)

    def _draw(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        if x.device.type != "cpu":
            return super().forward(x), 1.0  # CUDA's fused dropout, scaled, with a 1-byte mask already
        if self.fold_scale:
            return _CpuDropout.apply(x, self.p), 1.0 / (1.0 - self.p)
        return _CpuDropout.apply(x, self.p, 1.0 / (1.0 - self.p)), 1.0  # one scaled tensor every reader shares


def _shared_cast(memo: _Memo):
    """peft's input cast to the LoRA weights' dtype, made once per input for a group, and not at all under autocast.

    Under autocast LoRA's matmuls run in autocast's dtype whatever their input's; an
    fp32 copy of a 16-bit input would only be cast back by each matmul, keeping one
    16-bit copy per projection for the backward pass instead of one shared input.
    """

    def cast(self, x, dtype: torch.dtype):
        if x is None or not getattr(self, "cast_input_dtype_enabled", True) or x.dtype == dtype:
            return x
        if torch.is_autocast_enabled(x.device.type):
            return x
        return memo.get(x, lambda t: t.to(dtype=dtype))

    return cast


def share_lora_dropout(model, shared: bool = True, adapter: str = "default") -> int:
    """Replace peft's LoRA dropouts by LoraDropout: one per projection, or (`shared`) one per group of projections
    reading one input, with a shared input cast. Returns how many dropouts the model then draws per forward pass."""
    groups: list[list[nn.Module]] = []
    grouped: set[int] = set()
    for module in model.modules():
        for block_name, names in SHARED_INPUTS if shared else ():
            block = getattr(module, block_name, None)
            projections = [getattr(block, n, None) for n in names] if block is not None else []
            if projections and all(_dropout_p(m, adapter) for m in projections):
                groups.append(projections)
                grouped |= {id(m) for m in projections}
    groups += [[m] for m in model.modules() if _dropout_p(m, adapter) and id(m) not in grouped]
    for projections in groups:
        dropout, cast_memo = LoraDropout(_dropout_p(projections[0], adapter), len(projections)), _Memo(len(projections))
        for proj in projections:
            proj.lora_dropout[adapter] = dropout
            proj._cast_input_dtype = types.MethodType(_shared_cast(cast_memo), proj)
    return len(groups)


def _dropout_p(module, adapter: str) -> float:
    """The LoRA dropout rate of a peft LoRA layer (0: none, or not a LoRA layer)."""
    dropouts = getattr(module, "lora_dropout", None)
    if not isinstance(dropouts, nn.ModuleDict) or adapter not in dropouts or not isinstance(dropouts[adapter], nn.Dropout):
        return 0.0
    return dropouts[adapter].p
