"""Training throughput on the CPU: lora-llava against TRL's SFTTrainer and a plain transformers Trainer.

    python benchmarks/cpu_throughput.py                     # 10 steps each, batch 4, fp32
    python benchmarks/cpu_throughput.py --steps 20 --json cpu.json

A small LLaVA-1.5-shaped model (lora_llava.model.tiny: CLIP tower at 112 px, 64
image tokens, a 4-layer LLaMA of width 256) learns the generated shapes VQA
data. The three trainers get the same model, the same encoded samples, the
same collator and the same settings (LoRA r=16 on every linear layer of the
language model, projector trained fully, activation checkpointing, AdamW,
batch 4, fp32):

* lora-llava: its own setup and LlavaTrainer (two learning rates, chunked loss);
* TRL: SFTTrainer with the same LoRA config (its fused LM head);
* plain: transformers.Trainer on the same PEFT model, the model's own loss.

Each trainer runs in its own process, on one thread by default (on a busy
shared machine, multi-threaded timings measure OpenMP's waiting more than the
trainers); reported: tokens per second of process CPU time and of wall time
(real tokens, padding left out) over the steps after --warmup, and the
process's peak RSS.
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_qlora import StepTimer, lora_llava_trainer, trl_trainer  # noqa: E402

TRAINERS = ("lora-llava", "trl", "plain")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per trainer")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per run (1: steady figures on a shared machine)")
    p.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    p.add_argument("--workdir", type=Path, help="where the model and data are built (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write all figures to this file")
    p.add_argument("--only", choices=TRAINERS, help=argparse.SUPPRESS)
    p.add_argument("--result-json", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(workdir: Path) -> None:
    """The model folder and the generated data, built once and shared by the three runs."""
    from lora_llava.data.synthetic import make_shapes_dataset
    from lora_llava.model.tiny import make_tiny

    if not (workdir / "model" / "config.json").is_file():
        make_tiny(workdir / "model", image_size=112, text_hidden=256, vision_hidden=64, layers=4)
    if not (workdir / "data" / "train.json").is_file():
        make_shapes_dataset(workdir / "data", n_images=40, seed=0, split="train")


def bench_recipe(workdir: Path, args, out: Path):
    from lora_llava.recipe.parse import parse_recipe

    return parse_recipe(
        {
            "stage": "instruct",
            "model": {"name_or_path": str(workdir / "model"), "dtype": "float32"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "projector": {"learning_rate": 2e-5},
            "data": {"train": [{"path": str(workdir / "data/train.json"), "image_folder": str(workdir / "data/images")}], "max_length": 512},
            "train": {"output_dir": str(out), "max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": 2e-4,
                      "save_steps": 100000, "logging_steps": 1, "seed": 0},
        }
    )  # fmt: skip


def plain_trainer(model, ds, recipe, out: Path, collate_fn, callbacks):
    """transformers.Trainer on a PEFT model built as its documentation shows: one learning rate, the model's loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    from lora_llava.model.projector import PROJECTOR_MODULE as PROJECTOR
    from lora_llava.training.lora import lora_target_regex
    from lora_llava.training.run import training_arguments

    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=lora_target_regex(recipe.lora.target_modules), modules_to_save=[PROJECTOR],
    )  # fmt: skip
    args = training_arguments(recipe, out, has_eval=False)
    return Trainer(
        model=get_peft_model(model, config), args=args, train_dataset=ds, data_collator=collate_fn, callbacks=callbacks
    )


def encoded_dataset(recipe, processor):
    """lora-llava's encoding of the samples, as a `datasets.Dataset` (TRL accepts no other), in torch format."""
    import datasets

    from lora_llava.data.build import build_dataset

    ds = build_dataset(recipe, processor)
    rows = [ds[i] for i in range(len(ds))]
    return datasets.Dataset.from_dict(
        {
            "input_ids": [r["input_ids"].tolist() for r in rows],
            "labels": [r["labels"].tolist() for r in rows],
            "pixel_values": [r["pixel_values"].numpy() for r in rows],
        }
    ).with_format("torch")


def run_one(name: str, args) -> dict:
    from transformers import LlavaForConditionalGeneration

    from lora_llava.data.dataset import collate
    from lora_llava.model.load import load_processor

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix=f"cpu-bench-{name}-"))
    recipe = bench_recipe(args.workdir, args, out)
    processor = load_processor(recipe.model.name_or_path)
    ds = encoded_dataset(recipe, processor)
    tokens: list[int] = []

    def collate_fn(batch):
        b = collate(batch, processor.tokenizer.pad_token_id)
        tokens.append(int(b["attention_mask"].sum()))
        return b

    model = LlavaForConditionalGeneration.from_pretrained(recipe.model.name_or_path, dtype=torch.float32)
    model.config.use_cache = False
    model.requires_grad_(False)
    timer = StepTimer()
    if name == "lora-llava":
        trainer = lora_llava_trainer(model, ds, recipe, out, collate_fn, [timer.callback])
    elif name == "trl":
        trainer = trl_trainer(model, ds, recipe, out, collate_fn, [timer.callback], processor)
    else:
        trainer = plain_trainer(model, ds, recipe, out, collate_fn, [timer.callback])
    trainer.train()
    timed = slice(args.warmup, None) if len(timer.times) > args.warmup else slice(None)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "trainer": name,
        "steps": len(timer.times),
        "tokens_per_s": sum(tokens[: len(timer.times)][timed]) / sum(timer.times[timed]),
        "step_s": sum(timer.times[timed]) / len(timer.times[timed]),
        "tokens_per_cpu_s": sum(tokens[: len(timer.times)][timed]) / sum(timer.cpu_times[timed]),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "final_loss": losses[-1] if losses else None,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.only:
        result = run_one(args.only, args)
        args.result_json.write_text(json.dumps(result, indent=1))
        return result
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        prepare(workdir)
        results = {"command": "python benchmarks/cpu_throughput.py " + " ".join(argv), "date": time.strftime("%Y-%m-%d"),
                   "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "torch": torch.__version__, "runs": {}}  # fmt: skip
        for name in args.trainers:
            path = workdir / f"result-{name}.json"
            cmd = [
                sys.executable,
                str(Path(__file__).resolve()),
                *argv,
                "--workdir",
                str(workdir),
                "--only",
                name,
                "--result-json",
                str(path),
            ]
            env = {
                **os.environ,
                "LORA_LLAVA_PROGRESS": "0",
                "OMP_NUM_THREADS": str(args.threads),
                "MKL_NUM_THREADS": str(args.threads),
            }
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                results["runs"][name] = {
                    "trainer": name,
                    "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed",
                }
                continue
            results["runs"][name] = json.loads(path.read_text())
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def report(results: dict) -> list[str]:
    lines = [f"{results['command']}  ({results['date']}, {results['machine']}, torch {results['torch']})"]
    runs = {k: r for k, r in results["runs"].items() if "error" not in r}
    base = runs.get("lora-llava")
    for r in results["runs"].values():
        if "error" in r:
            lines.append(f"{r['trainer']:<11} failed: {r['error']}")
            continue
        ratio = f"; lora-llava / this: {base['tokens_per_cpu_s'] / r['tokens_per_cpu_s']:.2f}x" if base and r is not base else ""
        lines.append(
            f"{r['trainer']:<11} {r['tokens_per_cpu_s']:8.1f} tokens per CPU-second{ratio}; {r['tokens_per_s']:.1f} tokens/s wall "
            f"({r['step_s']:.2f} s/step); peak RSS {r['peak_rss_gib']:.2f} GiB; final loss {r['final_loss']:.4f}; "
            f"{r['trainable_params']:,} trainable"
        )
    return lines


if __name__ == "__main__":
    main()
