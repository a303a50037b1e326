"""`lora-llava merge RUN_OR_ADAPTER_DIR --output DIR`: one checked, standalone llava-hf checkpoint."""

from __future__ import annotations


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
        choices=("trained", "original"),
        default="trained",
        help="trained: the weights the adapter was trained against (after QLoRA: the dequantized NF4 weights; default); "
        "original: the base checkpoint's 16-bit weights",
    )
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="dtype of the merged weights (default: the run's)")
    p.add_argument(
        "--tolerance",
        type=float,
        help="max |delta logit| the parity check accepts (default: a share of the largest |logit|, per mode)",
    )
    p.add_argument("--samples", type=int, default=4, help="samples the parity check runs (default 4)")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (not recommended)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.add_argument("--recipe", help="the run's recipe, for an adapter folder that has none beside it")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..merge import merge

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
