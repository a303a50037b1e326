"""What checkpointing fewer decoder layers buys on the CPU: recomputes counted, tokens per CPU-second measured.

    python benchmarks/checkpointing.py                       # all / half / none of 4 layers, 3 interleaved rounds
    python benchmarks/checkpointing.py --rounds 5 --steps 10 --json ckpt.json

The tiny LLaVA-1.5 of benchmarks/peers.py's work (336 px, 576 image tokens, a
4-layer LLaMA of width 256) trains through `lora_llava.training.run.train` with
train.gradient_checkpointing set to true, to half the layers and to false
(what `auto` picks between, by memory), each for --steps steps, the runs
interleaved round by round. Reported per run: attention calls of the decoder
layers per step (a checkpointed layer runs its attention twice: forward and
recompute), tokens per CPU-second over the steps after --warmup (real tokens,
padding left out), and the final loss, which must not depend on the choice.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers_lib.workload import Workload, prepare  # noqa: E402  (the model and data benchmarks/peers.py trains)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three settings")
    p.add_argument("--workdir", type=Path, help="where the model and data are built (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write all figures to this file")
    return p.parse_args(argv)


def recipe_for(work: Workload, checkpointing, steps: int, out: Path):
    from lora_llava.recipe.parse import parse_recipe

    return parse_recipe(
        {
            "model": {"name_or_path": str(work.model), "dtype": "float32"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
            "data": {"train": [{"path": str(work.llava_json), "image_folder": str(work.images)}], "max_length": 1024},
            "train": {"output_dir": str(out), "max_steps": steps, "batch_size": 4, "save_steps": 100000, "seed": 0,
                      "gradient_checkpointing": checkpointing},
        }
    )  # fmt: skip


def run_one(work: Workload, checkpointing, args) -> dict:
    """One training run; attention calls and CPU time per optimizer step, counted by wrapping the trainer's step."""
    from transformers import Trainer

    from lora_llava.training.run import train

    calls, times, tokens = [0], [], []
    original_step = Trainer.training_step
    original_init = Trainer.__init__

    def counting_init(self, *a, **kw):
        original_init(self, *a, **kw)
        for layer in self.model.get_base_model().model.language_model.layers:
            layer.self_attn.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def timed_step(self, model, inputs, num_items_in_batch=None):
        tokens.append(int(inputs["attention_mask"].sum()))
        start = time.process_time()
        loss = original_step(self, model, inputs, num_items_in_batch)
        times.append(time.process_time() - start)
        return loss

    Trainer.__init__, Trainer.training_step = counting_init, timed_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run = train(recipe_for(work, checkpointing, args.steps, Path(tmp) / "run"))
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    finally:
        Trainer.__init__, Trainer.training_step = original_init, original_step
    timed = slice(args.warmup, None)
    return {
        "gradient_checkpointing": checkpointing,
        "attention_calls_per_step": calls[0] / len(times),
        "tokens_per_cpu_s": sum(tokens[timed]) / sum(times[timed]),
        "final_loss": [r["loss"] for r in rows if "loss" in r][-1],
    }


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)  # steady figures on a shared machine
    os.environ.setdefault("LORA_LLAVA_PROGRESS", "0")
    settings = [True, 2, False]
    with tempfile.TemporaryDirectory() as tmp:
        work = prepare(args.workdir or Path(tmp))
        runs = [run_one(work, c, args) for _ in range(args.rounds) for c in settings]
    results = {"command": "python benchmarks/checkpointing.py " + " ".join(argv), "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.platform()}, {os.cpu_count()} CPUs", "runs": runs}  # fmt: skip
    base = statistics.median(r["tokens_per_cpu_s"] for r in runs if r["gradient_checkpointing"] is True)
    for c in settings:
        mine = [r for r in runs if r["gradient_checkpointing"] is c]
        speed = [r["tokens_per_cpu_s"] for r in mine]
        print(
            f"gradient_checkpointing={str(c).lower():<5}  attention calls/step {mine[0]['attention_calls_per_step']:.0f}  "
            f"tokens/CPU-s {statistics.median(speed):.0f} (runs {', '.join(f'{v:.0f}' for v in speed)})  "
            f"x{statistics.median(speed) / base:.2f} of all-checkpointed  final loss {mine[0]['final_loss']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
