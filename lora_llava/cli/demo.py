"""`lora-llava demo [--workdir runs/demo]`: a tiny LLaVA-1.5 learns a generated VQA task on the CPU, before/after."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="train a tiny LLaVA-1.5 on generated shapes VQA and show what it learned",
        description="Build a tiny LLaVA-1.5 and a coloured-shapes VQA set offline, score the model, train the "
        "demo recipe on the CPU, score it again and print both.",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides of recipes/demo.yaml, e.g. train.max_steps=100")
    p.add_argument("--workdir", default="runs/demo", help="folder for the tiny model, the data and the run (default runs/demo)")
    p.add_argument("--recipe", help="the demo recipe (default: recipes/demo.yaml)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated data")
    p.add_argument("--overwrite", action="store_true", help="train again over a finished demo run in the work folder")
    p.add_argument(
        "--hd",
        action="store_true",
        help="what high resolution buys: train the tiny model and its LLaVA-1.5-HD conversion on a fine-texture task, score both",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo, run_hd_demo

    if args.hd:
        workdir = "runs/demo-hd" if args.workdir == "runs/demo" else args.workdir
        run_hd_demo(workdir, args.overrides, overwrite=args.overwrite, seed=args.seed)
        print(f"done: {workdir}")
        return 0
    result = run_demo(args.workdir, args.recipe, args.overrides, overwrite=args.overwrite, seed=args.seed)
    print(f"done: {result.run_dir}")
    return 0
