"""`lora-llava convert SRC DST`: an original-format LLaVA-1.5 checkpoint -> a llava-hf folder."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="convert an original LLaVA-1.5 checkpoint (liuhaotian/llava-v1.5-7b layout) to a llava-hf folder",
        description="Convert an original LLaVA-1.5 checkpoint (liuhaotian/llava-v1.5-7b layout) into a llava-hf "
        "folder that every other verb reads.",
    )
    p.add_argument("src", metavar="SRC", help="original checkpoint: local folder or hub id")
    p.add_argument("dst", metavar="DST", help="output folder (llava-hf layout)")
    p.add_argument(
        "--vision-tower",
        metavar="PATH",
        help="CLIP checkpoint to take the vision weights from (default: the config's mm_vision_tower)",
    )
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="weights dtype (default: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.convert import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, vision_tower=args.vision_tower, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted: {out}")
    return 0
