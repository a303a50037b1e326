"""`lora-llava make-tiny DIR`: a random LLaVA-1.5-shaped model for offline tests and the demo."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("make-tiny", parents=[common], help="write a tiny random LLaVA-1.5-shaped model folder")
    p.add_argument("output_dir")
    p.add_argument("--image-size", type=int, default=336, help="vision tower input size (336 as LLaVA-1.5; 56 keeps tests fast)")
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tiny import make_tiny

    out = make_tiny(args.output_dir, image_size=args.image_size, patch_size=args.patch_size, seed=args.seed)
    print(out)
    return 0
