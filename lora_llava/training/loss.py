"""The training loss without the full logits: a chunked linear cross-entropy over the final hidden states.

The plain path builds `batch x length x vocab` logits, upcasts them to fp32
and keeps the log-softmax for the backward pass: about 12 bytes per token and
vocabulary entry, 0.8 GiB for one 2048-token LLaVA-1.5 sample. Here the model
stops at the last hidden state (`logits_to_keep` selects no position, so
`lm_head` projects nothing), only the positions with a label are scored, and
they go through `lm_head` a few hundred rows at a time. The gradient of each
chunk is computed in the forward pass (softmax minus one-hot), so neither
pass ever holds more than one chunk of logits. On CUDA, Liger-kernel's fused
linear cross-entropy does the same in Triton when it is installed.

Label shifting, the ignore index and the normalisation match transformers'
`ForCausalLMLoss`: token t predicts label t+1, -100 is ignored, and the sum is
divided by `num_items_in_batch` (the supervised tokens of the whole
accumulated batch) when the Trainer passes it, else by this batch's count.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from ..memory.budget import chunk_rows

IGNORE_INDEX = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T (+ bias)` against `target`, chunk by chunk.

    Logits are computed in the dtype of `weight` (as `lm_head` does under
    autocast) and reduced in fp32, like transformers' loss. The gradients for
    hidden, weight and bias are accumulated in the forward pass; backward only
    scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, rows):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        hidden = hidden.to(weight.dtype)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 reduction, as transformers' .float() upcast
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], target[start : start + rows]
            z = F.linear(h, weight, bias).to(acc)
            # log-sum-exp and softmax in place over the chunk's logits: one chunk-sized buffer, no temporaries
            picked = z.gather(1, t[:, None])
            top = z.amax(dim=-1, keepdim=True)
            sums = z.sub_(top).exp_().sum(dim=-1, keepdim=True)
            total += (sums.log() + top - picked).sum()
            if not (need_h or need_w or need_b):
                continue
            g = z.div_(sums)
            g[torch.arange(len(t), device=g.device), t] -= 1.0
            if need_h:
                grad_h[start : start + rows] = g.to(weight.dtype) @ weight  # cast like the plain path's backward
            if need_w:
                grad_w += g.t() @ h.to(acc)
            if need_b:
                grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        scale = grad_out
        gh = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * scale).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * scale).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None, rows: int | None = None
) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, target), never holding more than `rows` rows of logits.

    `target` must not contain the ignore index: select the supervised rows first.
    """
    if hidden.shape[0] == 0:
        return (hidden.sum() * 0.0).float() + (weight.sum() * 0.0).float()  # keeps the graph connected
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, target, rows or chunk_rows(weight.shape[0]))


def liger_available(device: torch.device) -> bool:
    """Liger-kernel's Triton loss runs on CUDA only, and only where the package is installed."""
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Summed cross-entropy of the supervised rows: Liger's fused kernel on CUDA if installed, else the chunked one."""
    if hidden.shape[0] and liger_available(hidden.device):
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
            weight, hidden.to(weight.dtype), target, bias
        )
        return (out[0] if isinstance(out, tuple) else out).float()
    return chunked_linear_cross_entropy(hidden, weight, target, bias)


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Position t is scored against label t+1; the last position gets the ignore index (as transformers pads)."""
    return F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def lm_head_sharded(accelerator) -> bool:
    """Under FSDP or DeepSpeed ZeRO-3, lm_head's weight exists only in shards outside its own forward pass."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    plugin = accelerator.state.deepspeed_plugin if kind == DistributedType.DEEPSPEED else None
    return kind == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3)


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """LlavaModel (up to the final norm) and lm_head, through DDP and PEFT wrappers."""
    m = model
    while isinstance(getattr(m, "module", None), torch.nn.Module):  # DistributedDataParallel / DataParallel
        m = m.module
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m.model, m.get_output_embeddings()


def causal_lm_loss(model, inputs: dict, num_items_in_batch: torch.Tensor | int | None = None):
    """(loss, outputs) of a LLaVA forward pass with the chunked loss; `outputs.logits` is empty.

    The model is called through all of its wrappers (DDP, PEFT, accelerate's
    autocast), so hooks and gradient synchronisation behave as in the plain path;
    a forward hook on the backbone hands over the final hidden states.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    backbone, head = backbone_and_head(model)
    captured: list[torch.Tensor] = []
    handle = backbone.register_forward_hook(lambda _m, _a, out: captured.append(out.last_hidden_state))
    try:
        outputs = model(**inputs, logits_to_keep=torch.empty(0, dtype=torch.long, device=labels.device))
    finally:
        handle.remove()
    hidden = captured[-1]
    target = shift_labels(labels.to(hidden.device))
    keep = target != IGNORE_INDEX
    total = linear_cross_entropy(hidden[keep], head.weight, target[keep], head.bias)
    denom = keep.sum() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    loss = total / denom
    outputs["loss"] = loss
    return loss, outputs
