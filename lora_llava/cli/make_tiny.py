"""`lora-llava make-tiny DIR`: a random LLaVA-1.5-shaped model for offline tests and the demo."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser(
        "make-tiny",
        parents=[common],
        help="write a tiny random LLaVA-1.5-shaped model folder",
        description="Write a tiny, randomly initialised model folder of the LLaVA-1.5 shape, offline: for tests, "
        "the demo and trying a recipe without downloading 7B weights.",
    )
    p.add_argument("output_dir")
    p.add_argument("--image-size", type=int, default=336, help="vision tower input size (336 as LLaVA-1.5; 56 keeps tests fast)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    layout = p.add_mutually_exclusive_group()
    layout.add_argument(
        "--parts",
        action="store_true",
        help="write a CLIP tower (DIR/clip) and an LLM with its tokenizer (DIR/llm) to compose from (model.vision_tower, model.language_model)",
    )
    layout.add_argument(
        "--next",
        action="store_true",
        help="a tiny LLaVA-NeXT (AnyRes tiles, image_newline, LlavaNextProcessor) instead of a LLaVA-1.5",
    )
    layout.add_argument(
        "--original",
        action="store_true",
        help="write a checkpoint in the original LLaVA layout (DIR/llava, DIR/clip) for `lora-llava convert`",
    )
    p.add_argument(
        "--saved-by",
        choices=("transformers4", "transformers5"),
        help="with --original: also store a vision tower inside, named as LLaVA's code saves it under that version",
    )
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32", help="with --original: weight dtype")
    p.add_argument(
        "--anyres",
        dest="next_original",
        action="store_true",
        help="with --original: the LLaVA-NeXT layout (liuhaotian/llava-v1.6: anyres, spatial_unpad, image_newline)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..model.tiny import make_tiny, make_tiny_original, make_tiny_parts

    sizes = dict(image_size=args.image_size, patch_size=args.patch_size, seed=args.seed)
    if not args.original and (args.saved_by or args.dtype != "float32"):
        from ..errors import LoraLlavaError

        raise LoraLlavaError("--saved-by and --dtype describe an original-layout checkpoint: add --original")
    if args.parts:
        for folder in make_tiny_parts(args.output_dir, **sizes):
            print(folder)
    elif args.original:
        print(make_tiny_original(args.output_dir, **sizes, saved_by=args.saved_by, dtype=args.dtype, next=args.next_original))
    else:
        print(make_tiny(args.output_dir, **sizes, next=args.next))
    return 0
