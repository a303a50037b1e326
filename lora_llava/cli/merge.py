"""`lora-llava merge RUN_OR_ADAPTER_DIR --output DIR`: one checked, standalone llava-hf checkpoint."""

from __future__ import annotations

from ..merging.options import MAX_SHARD_SIZE, MERGE_MODES, OUTPUT_DTYPES, PARITY_SAMPLES
from .args import positive_float, positive_int


def register(sub, common) -> None:
    p = sub.add_parser(
        "merge",
        parents=[common],
        help="merge a run's adapter (or stage-1 projector) into a standalone llava-hf checkpoint",
        description="Merge a run into its base model; check the result against the adapter model; write a model card.",
    )
    p.add_argument(
        "run_dir", metavar="RUN_OR_ADAPTER_DIR", help="a run folder, one of its checkpoint-N folders, or a PEFT adapter folder"
    )
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="the merged checkpoint folder (written atomically)")
    p.add_argument("--base", help="base model folder or hub id (default: the run's recipe)")
    p.add_argument(
        "--merge-into",
        choices=MERGE_MODES,
        default=MERGE_MODES[0],
        help="trained: the weights the adapter was trained against (after QLoRA: the dequantized NF4 weights; default); "
        "original: the base checkpoint's 16-bit weights",
    )
    p.add_argument("--dtype", choices=OUTPUT_DTYPES, help="dtype of the merged weights (default: the run's)")
    p.add_argument(
        "--tolerance",
        type=positive_float,
        help="max |delta logit| the parity check accepts (default: a share of the largest |logit|, per mode)",
    )
    p.add_argument(
        "--samples", type=positive_int, default=PARITY_SAMPLES, help=f"samples the parity check runs (default {PARITY_SAMPLES})"
    )
    p.add_argument("--no-check", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--max-shard-size", default=MAX_SHARD_SIZE, help=f"largest safetensors shard (default {MAX_SHARD_SIZE})")
    p.add_argument("--recipe", help="the run's recipe, for an adapter folder that has none beside it")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..merging.run import merge

    report = merge(
        args.run_dir,
        args.output,
        base=args.base,
        merge_into=args.merge_into,
        dtype=args.dtype,
        tolerance=args.tolerance,
        samples=args.samples,
        check=not args.no_check,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        recipe=args.recipe,
    )
    print(report)
    return 0
