"""Peak GPU memory of a training recipe, predicted from the model's shape alone (no weights, no network).

The estimate counts what PyTorch's allocator holds at the worst moment of a
training step, part by part, then adds the allocator's slack and the CUDA
context. Each term follows what the code of this project and its libraries
keep alive (transformers 5, peft, bitsandbytes), per token and per layer:

* weights: NF4 is 4 bits per weight plus one 8-bit scale per 64 weights and
  one fp32 scale per 256 of those (double quantization); int8 is one byte plus
  one fp32 scale per row; frozen 16-bit parts stay 16-bit (no fp32 upcast);
* trained parameters (LoRA, the projector's trained copy) in fp32, their fp32
  gradients, and the optimizer states (bitsandbytes keeps 32-bit states for
  tensors under 4096 elements, 8-bit blockwise states above);
* activations saved for the backward pass: with checkpointing each decoder
  layer keeps only its input, and one layer is recomputed at a time;
* the loss: the standard path holds about 12 bytes per token and vocabulary
  entry, the chunked path one chunk of logits.

Gradients appear during the backward pass while saved activations are freed,
so the peak is the largest of a few moments of the step (end of the forward
pass, first and last decoder layer of the backward pass, optimizer step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..recipe.schema import Recipe
from .budget import chunk_rows
from .shapes import GiB, ModelShape

ALLOCATOR_SLACK = 0.08  # reserved beyond allocated: fragmentation of the caching allocator (assumed share)
CUDA_CONTEXT = 0.5 * GiB  # CUDA context, cuBLAS workspaces, kernels: outside torch's counters
BNB_MIN_8BIT = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit optimizer states


# ---- bytes of each kind of tensor -----------------------------------------------------------


def nf4_bytes(n: int) -> int:
    """One NF4 weight matrix of n elements with double quantization (blocks of 64, scales in blocks of 256)."""
    blocks = math.ceil(n / 64)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 * 16 + 4 * 256 + 4  # codes + offset


def adam_state_bytes(numels: list[int], optimizer: str) -> int:
    """Optimizer states of one AdamW for tensors of these sizes (exp_avg and exp_avg_sq)."""
    if optimizer == "adamw":
        return sum(8 * n + 4 for n in numels)  # two fp32 states and torch's fp32 step count per tensor
    if optimizer == "paged_adamw":
        return 8 * sum(numels)  # bitsandbytes counts steps in Python
    total = 2 * 256 * 4  # the two 8-bit quantization maps, shared by all tensors
    for n in numels:
        total += 8 * n if n < BNB_MIN_8BIT else 2 * n + 8 * math.ceil(n / 256)
    return total


@dataclass(frozen=True)
class Part:
    key: str  # short id: llm, embeddings, vision, projector_frozen, lora, projector, optimizer, ...
    name: str
    bytes: float
    group: str  # weights | trained | activations | overhead


@dataclass(frozen=True)
class Estimate:
    """Peak memory of one training step, part by part."""

    parts: tuple[Part, ...]
    moment: str  # the moment of the step at which the peak happens
    tokens: int

    @property
    def allocated(self) -> float:
        return sum(p.bytes for p in self.parts if p.group != "overhead")

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)


def _trained_numels(shape: ModelShape, recipe: Recipe) -> tuple[list[int], list[int]]:
    """Sizes of the trained LoRA tensors (all layers) and of the trained projector tensors."""
    lora = []
    if recipe.stage == "instruct":
        for name in recipe.lora.target_modules:
            d_in, d_out = shape.linears()[name]
            lora += [recipe.lora.r * d_in, recipe.lora.r * d_out] * shape.layers
    trains_proj = recipe.stage == "align" or recipe.projector.trainable
    h, v = shape.hidden, shape.vision_hidden
    proj = [v * h, h, h * h, h] if trains_proj else []
    return lora, proj


def weight_parts(shape: ModelShape, recipe: Recipe) -> list[Part]:
    """Frozen weights, trained parameters and optimizer states: present for the whole step."""
    s = 4 if recipe.model.dtype == "float32" else 2
    q = recipe.model.quantization
    per_layer = [a * b for a, b in shape.linears().values()]
    if q == "nf4":
        llm, kind = shape.layers * sum(nf4_bytes(n) for n in per_layer), "NF4 + double quant"
    elif q == "int8":
        llm, kind = shape.layers * sum(n + 4 * out for n, (_, out) in zip(per_layer, shape.linears().values())), "int8"
    else:
        llm, kind = shape.layers * s * sum(per_layer), _dtype_name(recipe)
    emb = shape.vocab * shape.hidden * s * (1 if shape.tied else 2)
    lora, proj = _trained_numels(shape, recipe)
    frozen_proj = shape.projector_params() * s if recipe.stage == "instruct" else 0  # peft keeps the original beside its copy
    parts = [
        Part("llm", f"language model linear layers ({kind})", llm, "weights"),
        Part(
            "embeddings",
            f"embeddings + lm_head + norms ({_dtype_name(recipe)})",
            emb + (2 * shape.layers + 1) * shape.hidden * s,
            "weights",
        ),
        Part("vision", f"vision tower, CLIP ({_dtype_name(recipe)})", shape.vision_params() * s, "weights"),
        Part("projector_frozen", f"projector, frozen original ({_dtype_name(recipe)})", frozen_proj, "weights"),
    ]
    if lora:
        parts.append(Part("lora", f"LoRA r={recipe.lora.r}, fp32 ({sum(lora) / 1e6:.1f}M parameters)", 4 * sum(lora), "trained"))
    if proj:
        parts.append(Part("projector", f"projector, trained fp32 ({sum(proj) / 1e6:.1f}M parameters)", 4 * sum(proj), "trained"))
    paged = " (paged: may move to CPU RAM)" if recipe.train.optimizer.startswith("paged") else ""
    parts.append(
        Part(
            "optimizer",
            f"optimizer states, {recipe.train.optimizer}{paged}",
            adam_state_bytes(lora + proj, recipe.train.optimizer),
            "trained",
        )
    )
    return [p for p in parts if p.bytes]


def _dtype_name(recipe: Recipe) -> str:
    return "bfloat16" if recipe.model.dtype == "auto" else recipe.model.dtype


def layer_bytes_per_token(shape: ModelShape, recipe: Recipe, device: str = "cuda") -> float:
    """Bytes one decoder layer saves for the backward pass, per token (without checkpointing).

    LoRA's dropout keeps its mask (1 byte on CUDA; on the CPU lora-llava's draw keeps
    it in the input's dtype, which multiplies far faster than a bool) and the dropped
    input once per input it draws for: q/k/v share one and gate/up another with
    lora.shared_dropout.
    RMSNorm upcasts its input to fp32. SDPA keeps q, k, v, its output and an
    fp32 log-sum-exp per head.
    """
    s = 4 if recipe.model.dtype == "float32" else 2
    h, i, r = shape.hidden, shape.intermediate, recipe.lora.r
    q_dim, kv_dim = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    total = 2 * (4 * h + 4)  # two RMSNorms: fp32 input and the inverse norm
    total += s * (2 * q_dim + 2 * kv_dim) + 4 * shape.heads  # attention: q, k, v, output, log-sum-exp
    if recipe.model.attn_implementation == "eager":
        total += (4 + s) * shape.heads * recipe.data.max_length  # fp32 softmax and its 16-bit copy
    total += 3 * s * i  # MLP: SiLU input, SiLU output and up_proj output (for the product)
    if recipe.stage == "instruct":
        targets = {name: shape.linears()[name][0] for name in recipe.lora.target_modules}
        if recipe.lora.dropout > 0:
            inputs = _dropped_inputs(targets, recipe.lora.shared_dropout)
            mask = 1 if device == "cuda" else s
            total += sum((mask + s) * d for d in inputs.values()) + s * r * len(targets)  # mask, dropped input; A's outputs
        else:
            # without dropout LoRA saves the layer's own inputs: q/k/v share one, gate/up another, and
            # o_proj's input is the attention output SDPA already keeps
            inputs = {_SHARED_INPUT.get(n, n): d for n, d in targets.items() if n != "o_proj"}
            total += s * sum(inputs.values()) + s * r * len(targets)
    if recipe.model.quantization == "int8":
        # bitsandbytes' 8-bit matmul keeps its input on ctx, outside autograd's saved tensors: checkpointing cannot free it
        total += s * (2 * h + q_dim + i)
    return total


_SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in", "up_proj": "mlp_in"}


def _dropped_inputs(targets: dict[str, int], shared: bool) -> dict[str, int]:
    """The inputs LoRA's dropout draws a mask for: shared by a whole group of adapted projections (training/dropout.py)."""
    groups = {g: [n for n, k in _SHARED_INPUT.items() if k == g] for g in set(_SHARED_INPUT.values())}
    whole = {g for g, names in groups.items() if shared and all(n in targets for n in names)}
    return {(_SHARED_INPUT[n] if _SHARED_INPUT.get(n) in whole else n): d for n, d in targets.items()}


def layer_activation_bytes(shape: ModelShape, recipe: Recipe, tokens: int, device: str = "cuda") -> float:
    """Bytes one decoder layer saves for `tokens` tokens, with autocast's 16-bit copies of its fp32 LoRA weights."""
    lora, _ = _trained_numels(shape, recipe)
    copies = 2 * sum(lora) // shape.layers if recipe.model.dtype != "float32" else 0
    return tokens * layer_bytes_per_token(shape, recipe, device) + copies


NAMES = {
    "kept": "checkpointed layer inputs",
    "saved": "activations saved by the layers not checkpointed",
    "other": "other activations (embeddings, projector, final norm)",
    "layer": "one recomputed layer",
    "working": "gradients in flight + dequantized weight",
    "grads": "gradients, fp32",
    "loss": "loss",
    "copies": "autocast's 16-bit copies of checkpointed layers' LoRA weights",
    "optimizer_tmp": "optimizer temporaries (foreach AdamW)",
}


def activation_terms(shape: ModelShape, recipe: Recipe, device: str = "cuda") -> dict[str, float]:
    """The dynamic memory terms of one step, in bytes: per layer, per model, for the loss."""
    t = recipe.train
    s = 4 if recipe.model.dtype == "float32" else 2
    autocast = s == 2  # 16-bit models train under autocast, which keeps 16-bit copies of fp32 weights
    bt = t.batch_size * recipe.data.max_length
    sup = t.batch_size * max(recipe.data.max_length - shape.image_tokens, 1)  # supervised tokens, at most
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    lora, proj = _trained_numels(shape, recipe)
    lora_layer = sum(lora) // shape.layers
    int8_kept = bt * s * (2 * h + shape.heads * shape.head_dim + i) if recipe.model.quantization == "int8" else 0
    # The tower and the projector see every crop (AnyRes: the global view and each tile), before unpadding.
    other = bt * (4 * h + 4 + 2 * shape.head_dim * s) + t.batch_size * s * shape.vision_tokens * (shape.vision_hidden + 2 * h)
    dequant = max(a * b for a, b in shape.linears().values()) * s if recipe.model.quantization != "none" else 0
    if t.loss == "chunked":
        rows = min(sup, chunk_rows(v))
        loss = (
            rows * v * (s + 4 if autocast else 4) + 2 * sup * h * s
        )  # one chunk (16-bit, fp32) + hidden rows and their gradient
    else:
        loss = 12 * bt * v  # fp32 logits, log-softmax, its gradient (16-bit logits freed by then)
    # The Trainer zeroes gradients only after the optimizer step: from the second micro-batch of an accumulating
    # step on, every gradient of the earlier ones stays allocated through the whole backward pass.
    accumulated = 4 * (sum(lora) + sum(proj)) if t.grad_accum > 1 else 0
    return {
        "layer": layer_activation_bytes(shape, recipe, bt, device),
        "kept": bt * h * s + int8_kept,  # per checkpointed layer
        "other": other + (2 * sum(proj) if autocast else 0),
        "working": bt * s * (h + i) + dequant,  # a layer's first gradients appear before its saved tensors go
        "loss": loss,
        "layer_grads": accumulated or 4 * lora_layer,
        "lora_grads": accumulated or 4 * sum(lora),  # a first micro-batch's projector gradients come after the LLM's
        "grads": 4 * (sum(lora) + sum(proj)),
        # autocast caches the 16-bit copy of every fp32 LoRA weight it casts until the forward pass ends, so the
        # forward pass peaks at its last decoder layer holding every checkpointed layer's copies
        # (benchmarks/simulate_step.py: the 13B QLoRA step's peak); the accumulated gradients are there too.
        "copies": 2 * lora_layer if autocast else 0,  # per checkpointed layer, until the forward pass ends
        "accumulated": accumulated,
        "optimizer_tmp": 4 * (sum(lora) + sum(proj)) if device != "cuda" and t.optimizer == "adamw" else 0,
    }


def activation_parts(shape: ModelShape, recipe: Recipe, device: str = "cuda", checkpointed: int | None = None) -> tuple[str, list[Part]]:
    """The dynamic memory at the worst moment of a step: end of forward, either end of the backward pass, optimizer step.

    `checkpointed` decoder layers (the first ones; default: the recipe's
    choice, all of them for auto) keep only their input; the others keep every
    activation. Backward frees a layer's activations as it creates its LoRA
    gradients, so memory is largest at one of the two ends of the backward
    pass, never in between. Checkpointing the first layers rather than the last
    keeps the recompute away from the backward pass's start, where the most is held.
    """
    x, n = activation_terms(shape, recipe, device), shape.layers
    k = checkpointed_count(recipe, shape) if checkpointed is None else min(checkpointed, n)
    held = [("kept", k * x["kept"]), ("saved", (n - k) * x["layer"])]
    last = held + ([("layer", x["layer"])] if k == n else [])  # the last layer is recomputed only if checkpointed
    first = [("kept", x["kept"]), ("layer", x["layer"])] if k else [("saved", x["layer"])]
    backward = [("other", x["other"]), ("working", x["working"])]
    # Until the forward pass ends autocast keeps each checkpointed layer's 16-bit LoRA copies; with accumulation the
    # earlier micro-batches' gradients are there too. The forward pass peaks in its last layer or at its end.
    forward = [("copies", k * x["copies"]), ("grads", x["accumulated"]), ("other", x["other"])]
    moments = {
        "forward pass, last decoder layer": held + forward + ([("layer", x["layer"])] if k == n else []),
        "end of the forward pass": held + forward + [("loss", x["loss"])],
        "backward pass, last decoder layer": last + backward + [("grads", x["layer_grads"])],
        "backward pass, first decoder layer": first + backward + [("grads", x["lora_grads"])],
        "optimizer step": [("grads", x["grads"]), ("optimizer_tmp", x["optimizer_tmp"])],
    }
    moment = max(moments, key=lambda m: sum(b for _, b in moments[m]))
    return moment, [Part(key, NAMES[key] + _loss_detail(key, recipe, shape), b, "activations") for key, b in moments[moment] if b]


def checkpointed_count(recipe: Recipe, shape: ModelShape) -> int:
    """Decoder layers the recipe checkpoints; auto counts as all of them, the least memory it can reach."""
    fixed = recipe.train.checkpointed_layers(shape.layers)
    return shape.layers if fixed is None else fixed


def _loss_detail(key: str, recipe: Recipe, shape: ModelShape) -> str:
    if key != "loss":
        return ""
    if recipe.train.loss == "chunked":
        return f": chunked, {chunk_rows(shape.vocab)} rows of logits at a time"
    return ": full logits in fp32, log-softmax and its gradient"


def estimate(recipe: Recipe, shape: ModelShape, device: str = "cuda", checkpointed: int | None = None) -> Estimate:
    """Peak GPU memory of training `recipe` on a model of `shape`, part by part (`checkpointed`: see activation_parts)."""
    parts = weight_parts(shape, recipe)
    moment, dynamic = activation_parts(shape, recipe, device, checkpointed)
    parts += dynamic
    allocated = sum(p.bytes for p in parts)
    parts.append(Part("slack", f"allocator slack (~{ALLOCATOR_SLACK:.0%} of allocated)", ALLOCATOR_SLACK * allocated, "overhead"))
    parts.append(Part("context", "CUDA context and libraries", CUDA_CONTEXT, "overhead"))
    return Estimate(tuple(parts), moment, recipe.train.batch_size * recipe.data.max_length)


