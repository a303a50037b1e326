"""One real lora-llava training step of a recipe on a fake CUDA device, its peak memory tracked beside `estimate`'s.

    python benchmarks/simulate_step.py                          # every case below
    python benchmarks/simulate_step.py --case 13b-adamw --json out.json
    python benchmarks/simulate_step.py --case 13b-adamw8bit --layers 2   # a smoke test: 2 decoder layers, seconds

No GPU and no weights: the model of the recipe's built-in shape is built on
fake CUDA tensors (benchmarks/fake_llava.py, fake_cuda.py, fake_kernels.py), its language model
quantized to NF4 as `from_pretrained` quantizes it, then everything after loading is
lora-llava's own code: `freeze_for_training`, `enable_checkpointing`, `setup_instruct`,
`param_groups`, `build_optimizer`, `StepGuard`, the chunked loss `causal_lm_loss` under
bf16 autocast as accelerate wraps the forward pass, gradient clipping as the Trainer
clips. A first optimizer step creates the optimizer states; the step after it is
tracked by torch's MemTracker, which follows every tensor from allocation to
release: two micro-batches when the recipe accumulates gradients (the gradients of
the first stay through the second, as from then on until the optimizer step), one
otherwise, then clipping, the optimizer step and zero_grad.

Each batch is the recipe's worst case: batch_size samples of data.max_length tokens,
the largest image of the AnyRes grid (LLaVA-NeXT / 1.5-HD), every text token supervised.
Not simulated: the caching allocator's slack, the CUDA context, cuBLAS workspaces and
whatever bitsandbytes or kernels allocate outside PyTorch's allocator.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import resource
import sys
import time
from pathlib import Path
from types import MethodType

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from fake_cuda import cuda_python_side, install_fake_cuda, movable_fake_modules  # noqa: E402
from fake_kernels import CudaAttention, CudaKernels, PeakTracker, Shadows  # noqa: E402
from fake_llava import load_fake, quant_state_tensors, skeleton, storage_bytes, worst_case_batch  # noqa: E402

from lora_llava.memory.estimate import estimate  # noqa: E402
from lora_llava.memory.shapes import GiB, ModelShape, model_shape  # noqa: E402
from lora_llava.recipe.parse import load_recipe  # noqa: E402
from lora_llava.recipe.schema import Recipe  # noqa: E402

CASES = {
    "13b-adamw": ("medical", ["train.optimizer=adamw"], "LLaVA-1.5-13B QLoRA r=128, 2048 tokens, batch 1, fp32 AdamW"),
    "13b-adamw8bit": ("medical", [], "LLaVA-1.5-13B QLoRA r=128, 2048 tokens, batch 1, 8-bit AdamW (medical.yaml)"),
    "hd-13b": ("hd_from_llava15", [], "LLaVA-1.5-HD-13B QLoRA r=128, 4096 tokens, 2928 image tokens, 8-bit AdamW"),
    "next-7b": ("next_7b_lora", [], "LLaVA-NeXT-7B bf16 LoRA r=128, batch 4 x 4096 tokens, 2928 image tokens each"),
}
PARTS = ("llm", "embeddings", "vision", "projector_frozen", "lora", "projector", "optimizer")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--layers", type=int, help="shrink the language model and the tower to this many layers (smoke test)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="recipe overrides for every case")
    p.add_argument("--json", type=Path, help="write the figures to this file")
    return p.parse_args(argv)


def case_recipe(case: str, layers: int | None, extra: list[str] = ()) -> tuple[Recipe, ModelShape]:
    name, overrides, _ = CASES[case]
    recipe = load_recipe(name, [*overrides, *extra])
    shape = model_shape(recipe.model)
    if layers:
        shape = dataclasses.replace(shape, layers=layers, vision_layers=min(layers, shape.vision_layers))
    return recipe, shape


def part_of(name: str, p: torch.Tensor) -> str:
    """The `estimate` part a parameter belongs to, from its name (as tests/test_memory.py sorts them)."""
    if ".lora_" in name:
        return "lora"
    if "multi_modal_projector" in name:
        return "projector" if "modules_to_save" in name else "projector_frozen"
    if p.requires_grad:
        return "projector"  # AnyRes' image_newline trains with the projector
    if p.dtype == torch.uint8 or re.search(r"language_model\.layers\.\d+\.(self_attn|mlp)\.", name):
        return "llm"
    return "vision" if "vision_tower" in name else "embeddings"


def static_parts(model, optimizer) -> dict[str, int]:
    """Bytes of what lives through the whole step: weights by part, buffers, trained parameters, optimizer states."""
    groups: dict[str, list[torch.Tensor]] = {k: [] for k in PARTS}
    for name, p in model.named_parameters():
        groups[part_of(name, p)].append(p)
    groups["llm"] += quant_state_tensors(model)
    groups["optimizer"] = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    parts = {k: storage_bytes(v) for k, v in groups.items()}
    parts["buffers"] = storage_bytes(model.buffers())
    return parts


def wrap_autocast(model, dtype: torch.dtype) -> None:
    """bf16 / fp16 mixed precision as accelerate's prepare_model applies it: autocast around forward, outputs to fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    if dtype == torch.float32:
        return
    forward = torch.autocast(device_type="cuda", dtype=dtype)(model.forward.__func__)
    model.forward = MethodType(convert_outputs_to_fp32(forward), model)


def prepare(recipe: Recipe, shape: ModelShape, fake, shadows: Shadows):
    """The model as lora-llava's train() has it before the Trainer starts, its optimizer (with StepGuard) and a batch."""
    from lora_llava.memory.estimate import checkpointed_count
    from lora_llava.model.load import freeze_for_training, resolve_dtype
    from lora_llava.training.guards import StepGuard
    from lora_llava.training.lora import check_rank, enable_checkpointing, param_groups, setup_instruct
    from lora_llava.training.trainer import build_optimizer

    dtype = resolve_dtype(recipe.model.dtype)
    model, quantizer = skeleton(shape, recipe)
    with fake, movable_fake_modules(fake):
        load_fake(model, quantizer, dtype)
        model = freeze_for_training(model)
        check_rank(model, recipe)
        torch.manual_seed(recipe.train.seed)
        checkpointed = checkpointed_count(recipe, shape)  # a fixed choice; auto counts as every layer, as estimate does
        if checkpointed:
            enable_checkpointing(model, checkpointed)
        model = setup_instruct(model, recipe)
        model.train()
    batch = worst_case_batch(shape, recipe, shadows, fake)
    wrap_autocast(model, dtype)
    optimizer = build_optimizer(param_groups(model, recipe), recipe.train.optimizer)  # its 8-bit maps are real, then moved
    StepGuard(optimizer, recipe.train.on_nonfinite, lambda: 2)
    return model, optimizer, batch


def train_step(model, optimizer, batch: dict, recipe: Recipe, micro_batches: int, tracker=None) -> None:
    """What LlavaTrainer does for one optimizer step: micro-batches of forward + backward, clip, step, zero_grad."""
    from lora_llava.training.loss import causal_lm_loss

    supervised = int((batch["labels"].ne(-100)).sum()) * recipe.train.grad_accum  # num_items_in_batch, as the Trainer counts
    for i in range(micro_batches):
        if tracker is not None:
            tracker.reset_mod_stats()  # its module statistics hold one forward pass each
            tracker.micro = i + 1
        loss = causal_lm_loss(model, batch, supervised)[0]  # the Trainer keeps the loss only
        loss.backward()
        del loss
    trained = [p for p in model.parameters() if p.requires_grad]
    if recipe.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(trained, recipe.train.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def simulate(case: str, layers: int | None = None, extra: list[str] = ()) -> dict:
    """Build, take a first step untracked (optimizer states), track the next one; the table rows and the estimate."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    recipe, shape = case_recipe(case, layers, extra)
    started = time.perf_counter()
    shim = install_fake_cuda()
    fake, shadows = FakeTensorMode(allow_non_fake_inputs=True), Shadows()
    with cuda_python_side():
        model, optimizer, batch = prepare(recipe, shape, fake, shadows)
        attention = CudaAttention()
        with fake, CudaKernels(shadows), attention:
            train_step(model, optimizer, batch, recipe, 1)
        tracker = PeakTracker()
        tracker.track_external(model, optimizer, *quant_state_tensors(model), *batch.values())
        micro = min(2, recipe.train.grad_accum)
        with fake, tracker, CudaKernels(shadows), attention:
            train_step(model, optimizer, batch, recipe, micro, tracker)
    static = static_parts(model, optimizer)
    est = estimate(recipe, shape, device="cuda")
    return {
        "case": case, "description": CASES[case][2], "layers": shape.layers, "tokens": recipe.train.batch_size * recipe.data.max_length,
        "image_tokens": shape.image_tokens, "optimizer": recipe.train.optimizer, "micro_batches_tracked": micro,
        "tracked": {"peak": tracker.peak_bytes(), "by_kind": tracker.peak_by_kind(), "moment": tracker.peak_moment, "static": static,
                    "phases": tracker.phase_peaks},
        "estimate": {"parts": [dataclasses.asdict(p) for p in est.parts], "allocated": est.allocated, "moment": est.moment},
        "attention_kernels": attention.calls, "assumed_finite_checks": shadows.assumed, "wall_s": time.perf_counter() - started, "shim": shim,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
    }  # fmt: skip


def table(result: dict) -> list[str]:
    """Markdown rows: each part, estimate beside tracked, then the peak allocated and the difference."""
    est = {p["key"]: p["bytes"] for p in result["estimate"]["parts"]}
    t = result["tracked"]
    static = t["static"]
    dynamic_est = sum(p["bytes"] for p in result["estimate"]["parts"] if p["group"] == "activations")
    dynamic = t["peak"] - sum(static.values())
    names = {p["key"]: p["name"] for p in result["estimate"]["parts"]}
    rows = ["| part | estimate GiB | tracked GiB |", "|---|---|---|"]
    for key in PARTS:
        if est.get(key, 0) or static.get(key, 0):
            rows.append(f"| {names.get(key, key)} | {est.get(key, 0) / GiB:.3f} | {static.get(key, 0) / GiB:.3f} |")
    rows.append(f"| buffers (rotary tables, position ids) | 0 | {static['buffers'] / GiB:.3f} |")
    kinds = ", ".join(f"{k} {v / GiB:.2f}" for k, v in t["by_kind"].items() if v and k in ("Activation", "Temp", "Gradient"))
    rows.append(f"| at the peak: activations, gradients, temporaries ({kinds}) | {dynamic_est / GiB:.3f} | {dynamic / GiB:.3f} |")
    for p in result["estimate"]["parts"]:
        if p["group"] == "activations":
            rows.append(f"| &nbsp;&nbsp;estimate: {p['name']} | {p['bytes'] / GiB:.3f} | |")
    diff = (result["estimate"]["allocated"] - t["peak"]) / t["peak"]
    rows.append(f"| **peak allocated** | **{result['estimate']['allocated'] / GiB:.2f}** | **{t['peak'] / GiB:.2f}** |")
    rows.append(f"| difference (estimate - tracked) / tracked | {diff:+.1%} | |")
    rows.append(f"| moment of the peak | {result['estimate']['moment']} | {t['moment']} |")
    rows += [f"| &nbsp;&nbsp;tracked peak of {phase} | | {b / GiB:.2f} |" for phase, b in t["phases"].items()]
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    results = {"command": "python benchmarks/simulate_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.platform()}, {torch.get_num_threads()} threads",
               "torch": torch.__version__, "cases": {}}  # fmt: skip
    for case in args.case:
        result = simulate(case, args.layers, args.set)
        results["cases"][case] = result
        print(f"\n{case}: {result['description']} ({result['layers']} layers; {result['wall_s']:.0f} s, "
              f"peak RSS {result['peak_rss_gib']:.2f} GiB)")  # fmt: skip
        print("\n".join(table(result)), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
