"""LLaVA-1.5-13B QLoRA on one GPU: lora-llava's training path against TRL's SFTTrainer, same model, same data.

    python benchmarks/gpu_qlora.py                                   # 13B, r=128, 2048 tokens, 10 steps, both trainers
    python benchmarks/gpu_qlora.py --optimizer adamw_8bit            # the lean optimizer
    python benchmarks/gpu_qlora.py --size 7b --r 64
    python benchmarks/gpu_qlora.py --size tiny --steps 3 --seq-len 64   # CPU smoke test, seconds
    python benchmarks/gpu_qlora.py --trainers lora-llava lora-llava-auto --gpu-memory 24GiB   # auto on a 24 GiB budget

The model has LLaVA-1.5's shape and random weights, built directly on the
device: every module except the language model's linear layers is created in
bf16, and each decoder layer is built on the meta device and gets NF4 linear
layers (double quantization, bf16 compute) quantized in place from random bf16
weights, one layer at a time. Nothing is downloaded. Each sample is BOS, 576
image tokens and random text up to --seq-len tokens; the text after a short
prompt is supervised. Settings follow recipes/medical.yaml (LoRA r=128 alpha
256 dropout 0.05 on every linear layer of the language model, projector trained
fully, batch 1, checkpointing, cosine schedule with warmup).

`lora-llava-auto` is lora-llava with `train.gradient_checkpointing: auto`: it
checkpoints only as many decoder layers as the card (or --gpu-memory) needs,
and its figures come with the number it chose and the estimate for that choice.
LLaMA-Factory and ms-swift are measured against lora-llava by
benchmarks/peers.py, in virtual environments of their own that it builds from
the package registry; where those exist on the GPU machine, run it there too
(`python benchmarks/peers.py --help`).

Each trainer runs in its own process so that peak memory is its own. Reported:
peak allocated and reserved GPU memory (peak RSS on the CPU), tokens/s over the
steps after --warmup, model FLOPs utilisation, the final loss, and
`lora-llava estimate`'s prediction for the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_llava.memory.estimate import estimate  # noqa: E402
from lora_llava.memory.shapes import BUILTIN_SHAPES, GiB, ModelShape  # noqa: E402

SIZES = {
    "13b": BUILTIN_SHAPES["llava-hf/llava-1.5-13b-hf"],
    "7b": BUILTIN_SHAPES["llava-hf/llava-1.5-7b-hf"],
    "tiny": ModelShape(
        vocab=1026, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4, head_dim=16, tied=False,
        vision_hidden=32, vision_intermediate=64, vision_layers=2, image_size=56, patch_size=14,
    ),
}  # fmt: skip
TRAINERS = ("lora-llava", "lora-llava-auto", "trl")
# Dense bf16 peak of each card, in TFLOP/s (vendor data sheets), for model FLOPs utilisation.
PEAK_TFLOPS = {
    "H100 80GB HBM3": 989.4,
    "H100 PCIe": 756.0,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
    "L40S": 362.1,
    "4090": 165.2,
}
TRL_OPTIM = {
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw": "paged_adamw_32bit",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="13b", help="LLaVA-1.5 shape (tiny: a CPU smoke test)")
    p.add_argument("--r", type=int, default=128, help="LoRA rank (alpha = 2r, as LLaVA-1.5)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sample, image tokens included")
    p.add_argument("--optimizer", choices=list(TRL_OPTIM), default="adamw", help="recipes/medical.yaml: adamw")
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak of the GPU for MFU (default: known cards)")
    p.add_argument("--gpu-memory", help="memory lora-llava-auto plans for, e.g. 24GiB (default: the GPU's own)")
    p.add_argument("--json", type=Path, help="write all figures to this file")
    p.add_argument("--only", choices=TRAINERS, help=argparse.SUPPRESS)  # internal: run one trainer in this process
    p.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seq_len <= SIZES[args.size].image_tokens + 8:
        p.error(f"--seq-len must exceed the {SIZES[args.size].image_tokens} image tokens")
    return args


def llava_config(shape: ModelShape, image_token: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=shape.vision_hidden, intermediate_size=shape.vision_intermediate, num_hidden_layers=shape.vision_layers,
        num_attention_heads=max(1, shape.vision_hidden // 64), image_size=shape.image_size, patch_size=shape.patch_size,
        hidden_act="quick_gelu",
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
    )  # fmt: skip
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token, image_seq_length=shape.image_tokens,
        projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip


def nf4_linear(d_in: int, d_out: int, device: torch.device):
    """A bitsandbytes NF4 linear layer (double quant, bf16 compute), quantized from random bf16 weights on `device`."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(d_in, d_out, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
    w = torch.empty(d_out, d_in, dtype=torch.bfloat16, device=device).normal_(std=0.02)
    layer.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4", module=layer).to(device)
    return layer


def build_model(shape: ModelShape, image_token: int, device: torch.device):
    """LLaVA-1.5 of `shape` with random weights, its language model's linear layers NF4, built on `device`."""
    from transformers import LlavaForConditionalGeneration
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.utils.quantization_config import QuantizationMethod

    config = llava_config(shape, image_token)
    config.text_config.num_hidden_layers = 0  # everything but the decoder layers, in bf16
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    text_config = model.config.text_config  # the model's own: it carries the attention kernel (sdpa)
    text_config.num_hidden_layers = shape.layers
    layers = model.model.language_model.layers
    for i in range(shape.layers):
        with torch.device("meta"):
            layer = LlamaDecoderLayer(text_config, layer_idx=i)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.to_empty(device=device).to(torch.bfloat16).weight.data.fill_(1.0)
        for block in (layer.self_attn, layer.mlp):
            for name, lin in list(block.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    setattr(block, name, nf4_linear(lin.in_features, lin.out_features, device))
        layers.append(layer)
    # What from_pretrained marks on a bitsandbytes model: peft wraps Linear4bit, Trainer does not move it.
    model.is_loaded_in_4bit = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


def synthetic_dataset(n: int, seq_len: int, shape: ModelShape, image_token: int, text_vocab: int, seed: int = 0):
    """Samples as lora-llava's dataset yields them: BOS, image tokens, random text; the text after a prompt is supervised.

    A `datasets.Dataset` in torch format, which both trainers accept.
    """
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "labels": [], "pixel_values": []}
    for _ in range(n):
        ids = torch.randint(3, text_vocab, (seq_len,), generator=g)
        ids[0], ids[1 : 1 + shape.image_tokens] = 1, image_token
        labels = ids.clone()
        labels[: 1 + shape.image_tokens + 16] = -100
        rows["input_ids"].append(ids.tolist())
        rows["labels"].append(labels.tolist())
        rows["pixel_values"].append(torch.randn(1, 3, shape.image_size, shape.image_size, generator=g).numpy())
    return datasets.Dataset.from_dict(rows).with_format("torch")


def bench_recipe(args, out: Path, checkpointing: str = "true"):
    from lora_llava.recipe.parse import load_recipe

    memory = [f"train.gpu_memory={args.gpu_memory}"] if args.gpu_memory else []
    return load_recipe(
        ROOT / "recipes/medical.yaml",
        [
            f"lora.r={args.r}", f"lora.alpha={2 * args.r}", f"data.max_length={args.seq_len}", "data.eval=[]",
            "train.batch_size=1", "train.grad_accum=1", f"train.max_steps={args.steps}", f"train.optimizer={args.optimizer}",
            f"train.output_dir={out}", "train.save_steps=100000", "train.logging_steps=1",
            f"train.gradient_checkpointing={checkpointing}", *memory,
        ],
    )  # fmt: skip


class StepTimer:
    """Wall time and process CPU time of each optimizer step (device synchronised), as a Trainer callback.

    CPU time is the steadier figure on a shared CPU: other processes lengthen the wall time, not it.
    """

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                _sync()
                timer.start = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kw):
                _sync()
                timer.times.append(time.perf_counter() - timer.start[0])
                timer.cpu_times.append(time.process_time() - timer.start[1])

        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.callback = _Callback()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def lora_llava_trainer(model, ds, recipe, out: Path, collate_fn, callbacks):
    """lora-llava's path: checkpointing as train() plans it, LoRA + projector setup, its TrainingArguments and
    LlavaTrainer (chunked loss). The plan is kept on the trainer as `checkpoint_plan`."""
    from lora_llava.memory.checkpointing import plan_for_training
    from lora_llava.training.lora import enable_checkpointing, setup_instruct
    from lora_llava.training.run import training_arguments
    from lora_llava.training.trainer import LlavaTrainer

    plan = plan_for_training(recipe, model.config)
    if plan.layers:
        enable_checkpointing(model, plan.layers)
    model = setup_instruct(model, recipe)
    args = training_arguments(recipe, out, has_eval=False)
    trainer = LlavaTrainer(model=model, args=args, train_dataset=ds, data_collator=collate_fn, callbacks=callbacks, recipe=recipe)
    trainer.checkpoint_plan = plan
    return trainer


def trl_trainer(model, ds, recipe, out: Path, collate_fn, callbacks, processor):
    """TRL's SFTTrainer with the same LoRA, projector, schedule and checkpointing (one learning rate: TRL has no second)."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lora_llava.model.projector import PROJECTOR_MODULE as PROJECTOR
    from lora_llava.training.lora import lora_target_regex

    t = recipe.train
    optim = TRL_OPTIM[t.optimizer] + ("_fused" if t.optimizer == "adamw" and torch.cuda.is_available() else "")
    config = SFTConfig(
        output_dir=str(out), max_steps=t.max_steps, per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=optim, bf16=recipe.model.dtype == "bfloat16", gradient_checkpointing=t.gradient_checkpointing,
        max_length=recipe.data.max_length, logging_steps=1, save_strategy="no", report_to="none", seed=t.seed,
        remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=not torch.cuda.is_available(),
    )  # fmt: skip
    lora = LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=lora_target_regex(recipe.lora.target_modules), modules_to_save=[PROJECTOR],
    )  # fmt: skip
    return SFTTrainer(
        model=model, args=config, train_dataset=ds, data_collator=collate_fn, processing_class=processor, peft_config=lora,
        callbacks=callbacks,
    )  # fmt: skip


def model_flops_per_step(shape: ModelShape, recipe, supervised: int) -> float:
    """Training FLOPs of one sample, checkpoint recomputation not counted (the MFU convention).

    Frozen linear layers: forward and input gradient (4 per weight and token);
    LoRA and projector: forward, input and weight gradients (6); attention
    scores and values, causal: 6 T d per token and layer; lm_head on the supervised
    tokens: 4 per weight; the frozen vision tower: forward only.
    """
    t = recipe.data.max_length
    linear = shape.layers * sum(a * b for a, b in shape.linears().values())
    lora = shape.layers * recipe.lora.r * sum(a + b for a, b in shape.linears().values())
    attention = 6 * t * shape.heads * shape.head_dim * shape.layers
    vision = 2 * shape.vision_params() * (shape.image_tokens + 1)
    return (
        t * (4 * linear + 6 * lora + attention)
        + 6 * shape.projector_params() * shape.image_tokens
        + 4 * shape.vocab * shape.hidden * supervised
        + vision
    )


def run_one(name: str, args) -> dict:
    """Build the model, train `args.steps` steps with one trainer, measure."""
    from lora_llava.data.dataset import collate
    from lora_llava.model.processor import build_processor
    from lora_llava.model.tiny import build_tokenizer

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SIZES[args.size]
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer, shape.image_size, shape.patch_size)
    image_token = tokenizer.convert_tokens_to_ids("<image>") if args.size == "tiny" else 32000
    model = build_model(shape, image_token, device)
    ds = synthetic_dataset(
        args.steps, args.seq_len, shape, image_token, text_vocab=min(shape.vocab, image_token)
    )  # no <image> or <pad> in the text
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    recipe = bench_recipe(args, out, "auto" if name == "lora-llava-auto" else "true")
    timer = StepTimer()
    collate_fn = lambda b: collate(b, tokenizer.pad_token_id)  # noqa: E731
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if name.startswith("lora-llava"):
        trainer = lora_llava_trainer(model, ds, recipe, out, collate_fn, [timer.callback])
    else:
        trainer = trl_trainer(model, ds, recipe, out, collate_fn, [timer.callback], processor)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    timed = timer.times[args.warmup :] or timer.times
    tokens_per_s = args.seq_len * len(timed) / sum(timed)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    supervised = args.seq_len - (1 + shape.image_tokens + 16)
    flops = model_flops_per_step(shape, recipe, supervised) * len(timed) / sum(timed)
    cpu_timed = timer.cpu_times[len(timer.times) - len(timed) :]
    result = {"trainer": name, "steps": len(timer.times), "tokens_per_s": tokens_per_s, "step_s": sum(timed) / len(timed),
              "tokens_per_cpu_s": args.seq_len * len(cpu_timed) / sum(cpu_timed),
              "model_tflops_per_s": flops / 1e12, "final_loss": losses[-1] if losses else None, "trainable_params": trainable}  # fmt: skip
    plan = getattr(trainer, "checkpoint_plan", None)
    if plan is not None:  # what lora-llava checkpointed, and the estimate for exactly that
        result.update(checkpointed_layers=plan.layers, of_layers=plan.of, estimate_allocated_gib=plan.estimate.allocated / GiB,
                      estimate_total_gib=plan.estimate.total / GiB)  # fmt: skip
    if torch.cuda.is_available():
        name_ = torch.cuda.get_device_name(0)
        peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name_), None)
        result.update(
            device=name_, peak_allocated_gib=torch.cuda.max_memory_allocated() / GiB, peak_reserved_gib=torch.cuda.max_memory_reserved() / GiB,
            mfu=flops / (peak * 1e12) if peak else None,
        )  # fmt: skip
    else:
        result.update(
            device=f"CPU ({os.cpu_count()} cores)", peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB
        )
    return result


def run_all(args, argv: list[str]) -> dict:
    """Each trainer in its own process; then the comparison and the estimate for the same settings."""
    results = {"command": "python benchmarks/gpu_qlora.py " + " ".join(argv), "date": time.strftime("%Y-%m-%d"),
               "machine": platform.platform(), "torch": torch.__version__, "runs": {}}  # fmt: skip
    for name in args.trainers:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "result.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--only", name, "--result-json", str(path)]
            proc = subprocess.run(cmd, env={**os.environ, "LORA_LLAVA_PROGRESS": "0"}, capture_output=True, text=True)
            if proc.returncode != 0 or not path.is_file():
                results["runs"][name] = {
                    "trainer": name,
                    "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                }
                print(proc.stderr[-4000:], file=sys.stderr)
                continue
            results["runs"][name] = json.loads(path.read_text())
    est = estimate(bench_recipe(args, Path(tempfile.gettempdir())), SIZES[args.size])
    results["estimate"] = {"allocated_gib": est.allocated / GiB, "total_gib": est.total / GiB, "moment": est.moment}
    return results


def report(results: dict) -> list[str]:
    lines = [f"{results['command']}  ({results['date']}, {results['machine']}, torch {results['torch']})"]
    for r in results["runs"].values():
        if "error" in r:
            lines.append(f"{r['trainer']:<11} failed: {r['error']}")
            continue
        mem = (
            f"peak allocated {r['peak_allocated_gib']:.2f} GiB, reserved {r['peak_reserved_gib']:.2f} GiB"
            if "peak_allocated_gib" in r
            else f"peak RSS {r['peak_rss_gib']:.2f} GiB"
        )
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""
        if "checkpointed_layers" in r:
            ratio = (
                f", measured / estimated allocated {r['peak_allocated_gib'] / r['estimate_allocated_gib']:.2f}"
                if "peak_allocated_gib" in r
                else ""
            )
            mem += f"; {r['checkpointed_layers']} of {r['of_layers']} layers checkpointed{ratio}"
        lines.append(
            f"{r['trainer']:<11} {r['device']}: {r['tokens_per_s']:.1f} tokens/s ({r['step_s']:.3f} s/step), "
            f"{r['model_tflops_per_s']:.2f} model TFLOP/s{mfu}; {mem}; final loss {r['final_loss']:.4f}; "
            f"{r['trainable_params']:,} trainable"
        )
    runs = results["runs"]
    trl = runs.get("trl", {"error": "not run"})
    for ours in (k for k in ("lora-llava", "lora-llava-auto") if k in runs and "error" not in runs[k] and "error" not in trl):
        key = "tokens_per_s" if "peak_allocated_gib" in trl else "tokens_per_cpu_s"  # wall time on a GPU, CPU time on a CPU
        lines.append(f"{ours} / TRL {key}: {runs[ours][key] / trl[key]:.2f}x")
    e, ours = results["estimate"], runs.get("lora-llava", {})
    line = f"lora-llava estimate: peak allocated {e['allocated_gib']:.2f} GiB, total {e['total_gib']:.2f} GiB ({e['moment']})"
    if "peak_allocated_gib" in ours:
        line += f"; measured / estimated allocated: {ours['peak_allocated_gib'] / e['allocated_gib']:.2f}"
    lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.only:
        result = run_one(args.only, args)
        args.result_json.write_text(json.dumps(result, indent=1))
        return result
    results = run_all(args, argv)
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
