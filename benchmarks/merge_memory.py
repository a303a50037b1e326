"""Peak memory of `lora-llava merge` on a LLaVA-1.5-shaped model far larger than the tiny test model.

    python benchmarks/merge_memory.py                   # 1.4B: TinyLlama-1.1B-shaped LLM + CLIP ViT-L/14-336
    python benchmarks/merge_memory.py --size 7b         # LLaVA-1.5-7B shape (needs ~30 GB of disk)

Nothing can be downloaded here, so the script writes a random base model in
llava-hf layout (bf16 shards, written tensor by tensor, never held whole) and a
QLoRA run beside it: a PEFT adapter with r=128 LoRA on every linear layer of the
language model and a trained projector, the recipe (NF4, bf16) and the processor.
It then runs the CLI as a user would, once without and once with the parity check,
and reports each process's peak resident memory (wait4's ru_maxrss).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {  # LLaMA text dims; the vision tower is CLIP ViT-L/14-336 in both
    "1b": {"hidden": 2048, "intermediate": 5632, "layers": 22, "heads": 32, "kv_heads": 4},
    "7b": {"hidden": 4096, "intermediate": 11008, "layers": 32, "heads": 32, "kv_heads": 32},
}
LORA_R, LORA_ALPHA = 128, 256


def llava_config(size: str, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    d = SIZES[size]
    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064,
        hidden_size=d["hidden"],
        intermediate_size=d["intermediate"],
        num_hidden_layers=d["layers"],
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=576,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )


def random_tensor(spec, generator) -> torch.Tensor:
    if spec.name.endswith("norm.weight") or "layer_norm" in spec.name or "layrnorm" in spec.name:
        return (
            torch.ones(spec.shape, dtype=spec.dtype)
            if spec.name.endswith("weight")
            else torch.zeros(spec.shape, dtype=spec.dtype)
        )
    return (torch.randn(spec.shape, generator=generator) * 0.02).to(spec.dtype)


def write_streamed(folder: Path, specs: list, max_bytes: int, generator) -> None:
    from lora_llava.merging.shards import ShardWriter, plan_shards, shard_names, write_index

    shards = plan_shards(specs, max_bytes)
    names = shard_names(len(shards))
    for shard, name in zip(shards, names):
        with ShardWriter(folder / name, shard) as writer:
            for spec in shard:
                writer.write(spec.name, random_tensor(spec, generator))
    write_index(folder, shards, names)


def build_base(folder: Path, size: str) -> int:
    """A random llava-hf checkpoint (bf16, 2 GB shards) + processor; returns its parameter count."""
    from transformers import GenerationConfig, LlavaForConditionalGeneration
    from transformers.core_model_loading import revert_weight_conversion

    from lora_llava.merging.shards import TensorSpec
    from lora_llava.model.processor import build_processor
    from lora_llava.model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = llava_config(size, tokenizer)
    config.dtype = "bfloat16"
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    state = revert_weight_conversion(model, model.state_dict())  # llava-hf's file names, as save_pretrained writes them
    specs = [TensorSpec(k, torch.bfloat16, tuple(v.shape)) for k, v in state.items()]
    folder.mkdir(parents=True, exist_ok=True)
    write_streamed(folder, specs, 2_000_000_000, torch.Generator().manual_seed(0))
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=tokenizer.pad_token_id).save_pretrained(folder)
    build_processor(tokenizer, 336, 14).save_pretrained(folder)
    return sum(v.numel() for v in state.values())


def build_run(run: Path, base: Path, size: str) -> None:
    """A QLoRA run folder: PEFT adapter (random LoRA r=128 + projector), recipe, processor, generated data."""
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoProcessor

    from lora_llava.data.synthetic import make_shapes_dataset
    from lora_llava.merging.shards import ShardWriter, TensorSpec
    from lora_llava.model.projector import PROJECTOR_MODULE as PROJECTOR
    from lora_llava.recipe.parse import dump_recipe, parse_recipe
    from lora_llava.recipe.schema import LLM_LINEAR_LAYERS
    from lora_llava.training.lora import lora_target_regex

    d = SIZES[size]
    head = d["hidden"] // d["heads"]
    dims = {  # (in, out) of each linear layer
        "q_proj": (d["hidden"], d["hidden"]),
        "k_proj": (d["hidden"], d["kv_heads"] * head),
        "v_proj": (d["hidden"], d["kv_heads"] * head),
        "o_proj": (d["hidden"], d["hidden"]),
        "gate_proj": (d["hidden"], d["intermediate"]),
        "up_proj": (d["hidden"], d["intermediate"]),
        "down_proj": (d["intermediate"], d["hidden"]),
    }
    prefix = "base_model.model.model"
    specs = []
    for layer in range(d["layers"]):
        for name, (n_in, n_out) in dims.items():
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"{prefix}.language_model.layers.{layer}.{block}.{name}"
            specs += [
                TensorSpec(f"{key}.lora_A.weight", torch.float32, (LORA_R, n_in)),
                TensorSpec(f"{key}.lora_B.weight", torch.float32, (n_out, LORA_R)),
            ]
    specs += [
        TensorSpec(f"{prefix}.{PROJECTOR}.linear_1.weight", torch.float32, (d["hidden"], 1024)),
        TensorSpec(f"{prefix}.{PROJECTOR}.linear_1.bias", torch.float32, (d["hidden"],)),
        TensorSpec(f"{prefix}.{PROJECTOR}.linear_2.weight", torch.float32, (d["hidden"], d["hidden"])),
        TensorSpec(f"{prefix}.{PROJECTOR}.linear_2.bias", torch.float32, (d["hidden"],)),
    ]
    run.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    with ShardWriter(run / "adapter_model.safetensors", specs) as writer:
        for spec in specs:
            writer.write(spec.name, random_tensor(spec, generator))
    PeftLoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules=lora_target_regex(LLM_LINEAR_LAYERS),
        modules_to_save=[PROJECTOR],
        base_model_name_or_path=str(base),
    ).save_pretrained(run)
    AutoProcessor.from_pretrained(base).save_pretrained(run)
    data = make_shapes_dataset(run.parent / "shapes", n_images=4)
    recipe = {
        "model": {"name_or_path": str(base), "quantization": "nf4", "dtype": "bfloat16"},
        "data": {"train": [{"path": str(data), "image_folder": str(data.parent / "images")}], "max_length": 1024},
        "train": {"output_dir": str(run)},
    }
    dump_recipe(parse_recipe(recipe), run / "recipe.yaml")


def measure(args: list[str]) -> tuple[float, float, str]:
    """Run `python -m lora_llava ARGS`; (peak RSS in GiB, seconds, last output lines)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LORA_LLAVA_PROGRESS": "0"}
    start = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lora_llava", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"lora-llava {' '.join(args)} failed:\n{output[-3000:]}")
    return usage.ru_maxrss / 2**20, time.time() - start, "\n".join(output.strip().splitlines()[-4:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-merge")
    parser.add_argument("--samples", type=int, default=1, help="parity samples (each is ~600 tokens through both models)")
    args = parser.parse_args()
    base, run, out = args.work / f"base-{args.size}", args.work / f"run-{args.size}", args.work / f"merged-{args.size}"
    if not (base / "config.json").is_file():
        print(f"writing a random {args.size} base model to {base} ...", flush=True)
        n = build_base(base, args.size)
        print(f"{n / 1e9:.2f}B parameters", flush=True)
    if not (run / "recipe.yaml").is_file():
        build_run(run, base, args.size)
    size = sum(p.stat().st_size for p in base.glob("*.safetensors")) / 2**30
    adapter = (run / "adapter_model.safetensors").stat().st_size / 2**30
    print(f"base: {size:.2f} GiB of bf16 shards; adapter: {adapter:.2f} GiB (r={LORA_R}, fp32)", flush=True)
    for label, extra in (("merge only (--no-check)", ["--no-check"]), ("merge + parity check", ["--samples", str(args.samples)])):
        rss, seconds, tail = measure(["merge", str(run), "-o", str(out), "--overwrite", *extra])
        print(f"{label}: peak RSS {rss:.2f} GiB, {seconds:.0f} s\n{tail}\n", flush=True)


if __name__ == "__main__":
    main()
