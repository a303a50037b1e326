"""What CUDA kernels decide and allocate beyond their fake kernels, values read from data, and a peak tracker.

* `CudaAttention`: SDPA's backend chosen as sm80+ chooses it (the CPU wheel has
  no CUDA kernel to ask, and falls back to the math path);
* `CudaKernels`: bitsandbytes' CUDA gemm_4bit dequantizes the whole weight above
  1536 rows (a transient buffer its fake kernel never allocates); FlashAttention's
  backward allocates an fp32 dq accumulator beside its gradients; and whatever
  reads values (the image-token count, the supervised positions of the loss,
  `.item()`) reads the real CPU copy `Shadows` keeps for small tensors computed
  from the batch;
* `PeakTracker`: torch's MemTracker for a model with frozen parameters, with the
  moment of its peak.
"""

from __future__ import annotations

import math

import bitsandbytes  # noqa: F401 - registers the torch.ops.bitsandbytes operators handled below
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker, _MemRefType
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.weak import WeakTensorKeyDictionary

aten = torch.ops.aten
SHADOW_LIMIT = 1 << 26  # elements: a real copy is kept for smaller results only (masks, ids, counts)
GEMM_4BIT_MAX_M = 1536  # bitsandbytes' CUDA gemm_4bit: above this many rows it dequantizes, then F.linear


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class Shadows:
    """Real CPU copies of small tensors computed from the batch, keyed by their fake twins."""

    def __init__(self) -> None:
        self.real = WeakTensorKeyDictionary()
        self.assumed = 0  # finiteness checks of gradients answered "finite": no copy can know

    def add(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        self.real[fake] = real
        return fake

    def has(self, t) -> bool:
        return not isinstance(t, FakeTensor) or t in self.real  # a real tensor is its own copy

    def to_real(self, tree):
        def real(x):
            if isinstance(x, FakeTensor):
                return self.real[x]
            return torch.device("cpu") if isinstance(x, torch.device) else x

        return tree_map(real, tree)


class CudaAttention:
    """SDPA as CUDA runs it on sm80+: flash attention without a mask, memory-efficient attention with one.

    The CPU wheel has no CUDA kernel to choose SDPA's backend, so the composite
    falls back to the math path (fp32 scores: 40 x 2048 x 2048 x 4 bytes per layer
    at 13B). Here the choice is made in torch's priority order and the chosen
    kernel called as the composite calls it; autograd then saves what that kernel
    saves (output, fp32 log-sum-exp) and runs its backward. The function itself is
    replaced, not intercepted by a mode: checkpointing recomputes layers on
    autograd's device thread, which Python modes do not reach.
    """

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self._original = torch.nn.functional.scaled_dot_product_attention

    def __enter__(self) -> CudaAttention:
        torch.nn.functional.scaled_dot_product_attention = self.sdpa
        return self

    def __exit__(self, *exc) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._original

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        q, k, v, mask = query, key, value, attn_mask
        if enable_gqa and k.shape[-3] != q.shape[-3]:  # grouped KV heads, repeated as the composite repeats them
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        flash = mask is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
        kind = "flash" if flash else "efficient"
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if flash:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)[0]
        if mask is not None and mask.dtype == torch.bool:  # the composite's convert_boolean_attn_mask
            mask = torch.zeros_like(mask, dtype=q.dtype).masked_fill_(mask.logical_not(), float("-inf"))
        need_lse = q.requires_grad or k.requires_grad or v.requires_grad
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, need_lse, dropout_p, is_causal, scale=scale)
        return out[0]


class CudaKernels(TorchDispatchMode):
    """Above MemTracker: what CUDA kernels decide or allocate that their fake kernels do not, and values from Shadows."""

    def __init__(self, shadows: Shadows) -> None:
        super().__init__()
        self.shadows = shadows
        self.special = {
            aten._local_scalar_dense.default: self._item,
            torch.ops.bitsandbytes.gemm_4bit.default: self._gemm_4bit,
            aten._scaled_dot_product_flash_attention_backward.default: self._flash_backward,
        }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.special:
            return self.special[func](func, args, kwargs)
        inputs = _tensors((args, kwargs))
        shadowed = all(self.shadows.has(t) for t in inputs)
        dynamic = torch.Tag.dynamic_output_shape in func.tags or torch.Tag.data_dependent_output in func.tags
        if dynamic and shadowed and inputs:
            return self._from_real(func, args, kwargs)
        if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            args = self._bool_indices_to_long(args)
        out = func(*args, **kwargs)
        copied = shadowed and (inputs or _small_integer(out)) and self._shadow(func, args, kwargs, out)
        if func._schema.is_mutable and not copied:
            for t in inputs:  # written with values no copy follows: the copies are stale
                self.shadows.real.pop(t, None)
        return out

    def _real(self, func, args, kwargs):
        with _disable_current_modes():
            return func(*self.shadows.to_real(args), **self.shadows.to_real(kwargs))

    def _shadow(self, func, args, kwargs, out) -> bool:
        outs = _tensors(out)
        too_big = sum(t.numel() for t in outs) > SHADOW_LIMIT or any(t.is_floating_point() and t.numel() > 1 << 20 for t in outs)
        if not outs or too_big:
            return False
        real = _tensors(self._real(func, args, kwargs))
        for fake, r in zip(outs, real):
            self.shadows.add(fake, r)
        return True

    def _item(self, func, args, kwargs):
        """A value read on the host: from the real copy; a gradient finiteness check (StepGuard) is answered True."""
        (t,) = args
        if self.shadows.has(t):
            return self._real(func, args, kwargs)
        if t.dtype == torch.bool:
            self.shadows.assumed += 1
            return True
        raise RuntimeError(f"a {t.dtype} value computed from fake data is read on the host: the simulation cannot know it")

    def _from_real(self, func, args, kwargs):
        """A data-dependent op: computed on the real copies, its fake result allocated with the real one's shape."""
        real = self._real(func, args, kwargs)
        if not isinstance(real, torch.Tensor | tuple | list):
            return real  # .item(), equal(): a Python value
        device = _tensors((args, kwargs))[0].device

        def fake(r):
            if not isinstance(r, torch.Tensor):
                return r
            return self.shadows.add(torch.empty_strided(r.shape, r.stride(), dtype=r.dtype, device=device), r)

        return tree_map(fake, real)

    def _bool_indices_to_long(self, args):
        """x[mask] on CUDA runs nonzero(mask) first: the same long indices, allocated, from the mask's real copy."""
        x, indices, *rest = args
        if not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            return args
        longs = []
        for i in indices:
            if isinstance(i, torch.Tensor) and i.dtype == torch.bool:
                positions = self._from_real(aten.nonzero.default, (i,), {})
                longs += list(positions.unbind(1))
            else:
                longs.append(i)
        return (x, longs, *rest)

    def _gemm_4bit(self, func, args, kwargs):
        """bitsandbytes' CUDA dispatch: its fused kernel up to 1536 rows, else dequantize the weight, then F.linear."""
        a, b, shape_b, absmax, blocksize, quant_type, *rest = args
        names = ("bias", "absmax_8bit", "absmax_code", "absmax_offset")
        extra = dict(zip(names, rest)) | kwargs
        if a.numel() // a.shape[-1] <= GEMM_4BIT_MAX_M:
            return func(*args, **kwargs)
        # As bitsandbytes' _dequant_linear_fallback: both absmax buffers and the weight live until F.linear returns.
        if extra.get("absmax_8bit") is not None:
            code = extra["absmax_code"]
            absmax_dq = torch.ops.bitsandbytes.dequantize_blockwise.default(
                extra["absmax_8bit"], absmax, code, 256, torch.float32
            )
            absmax = absmax_dq + extra["absmax_offset"]
        weight = torch.ops.bitsandbytes.dequantize_4bit.default(b, absmax, blocksize, quant_type, list(shape_b), a.dtype)
        return torch.nn.functional.linear(a, weight, extra.get("bias"))

    def _flash_backward(self, func, args, kwargs):
        """FlashAttention-2's backward: an fp32 dq accumulator and softmax_d (seqlen rounded to 128) beside the grads."""
        q = args[1]  # (batch, heads, seq, head_dim)
        b, h, t, d = q.shape
        rounded, d_rounded = math.ceil(t / 128) * 128, math.ceil(d / 32) * 32
        workspace = (
            torch.empty(b, rounded, h, d_rounded, dtype=torch.float32, device=q.device),
            torch.empty(b, h, rounded, dtype=torch.float32, device=q.device),
        )
        out = func(*args, **kwargs)
        del workspace
        return out


def _small_integer(out) -> bool:
    """Factory results worth a real copy: ids, positions, masks (not float buffers such as gradients)."""
    outs = _tensors(out)
    return bool(outs) and all(not t.dtype.is_floating_point and t.numel() <= SHADOW_LIMIT for t in outs)


class PeakTracker(MemTracker):
    """MemTracker for a model with frozen parameters, that notes where its peak happens and keeps no per-module peaks.

    MemTracker hooks every parameter of a module for its gradient, which raises for
    frozen ones; here only trained parameters are hooked. Its per-module peak
    bookkeeping visits every module after every operator (hours for 13B): only the
    global peak and the moment it happened are kept.
    """

    def __init__(self) -> None:
        super().__init__()
        self.micro = 0
        self.peak_moment = ""
        self.phase_peaks: dict[str, int] = {}  # "micro-batch 2, backward": its largest total

    def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
        memory = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
        if install_grad_hooks:
            for p in module.parameters():
                if p.requires_grad and self._param_to_grad_hook_handles.get(p) is None:
                    self._param_to_grad_hook_handles[p] = (
                        p.register_hook(self._grad_arrived),
                        p.register_post_accumulate_grad_hook(lambda q: self._grad_arrived(q.grad)),
                    )
        return memory

    def _grad_arrived(self, grad: torch.Tensor) -> None:
        self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

    def _update_peak_stats(self, peak_state) -> None:
        total = sum(snap[_TOTAL_KEY] for snap in self._curr_mem_snap.values())
        phase = self._phase()
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), total)
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_TOTAL_KEY]:
                self._peak_mem[dev] = snap[_TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)
                self.peak_moment = self._moment()

    def _phase(self) -> str:
        if self._in_opt:
            return "optimizer step"
        if not self.micro:
            return "before the step"
        return f"micro-batch {self.micro}, {'backward' if self._mod_tracker.is_bw else 'forward'}"

    def _moment(self) -> str:
        inner = max(self._mod_tracker.parents, key=lambda n: n.count("."), default="")
        return self._phase() + (f", in {inner.removeprefix('PeftModel.base_model.model.')}" if inner and not self._in_opt else "")

    def peak_bytes(self) -> int:
        return max(self._peak_mem.values(), default=0)

    def peak_by_kind(self) -> dict[str, int]:
        snap = max(self._peak_mem_snap.values(), key=lambda s: s[_TOTAL_KEY], default={})
        return {getattr(k, "value", str(k)): v for k, v in snap.items() if k != _TOTAL_KEY}
