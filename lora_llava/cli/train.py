"""`lora-llava train RECIPE.yaml [RECIPE2.yaml ...] [key.path=value ...]`."""

from __future__ import annotations

import argparse

EPILOG = """\
overrides (after the recipe file, any number):
  train.learning_rate=1e-4            key.path=value; the value is YAML (1e-4, true, null, [q_proj, v_proj])
  data.train.0.path=more.json         list items by index
  2:train.max_steps=10                N:key=value applies to stage N only (several recipe files)

resume:
  The same command again resumes from the newest complete checkpoint-N in train.output_dir
  (a changed recipe is refused and the keys that differ are named).
  --resume CHECKPOINT   resume from that checkpoint folder instead
  --no-resume           refuse to resume: stop if the output folder already holds checkpoints
  --overwrite           empty the output folder and start again

example:
  lora-llava train recipes/medical.yaml train.output_dir=runs/medical_r64 lora.r=64 lora.alpha=128
"""


def register(sub, common) -> None:
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a recipe (stage align or instruct)",
        description="Train a recipe (stage align: the projector; instruct: LoRA + projector); several recipes train in turn.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="recipe YAML file(s), then key.path=value overrides")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder of another run")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="CHECKPOINT", help="resume from this checkpoint folder")
    group.add_argument("--no-resume", action="store_true", help="refuse to resume from existing checkpoints")
    p.set_defaults(func=run)


def split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """Recipe files and key.path=value overrides, in any order."""
    recipes = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return recipes, overrides


def run(args) -> int:
    from ..errors import RecipeError
    from ..recipe.parse import load_recipe
    from ..training.run import train

    recipes, overrides = split_items(args.items)
    if not recipes:
        raise RecipeError("<command line>", ["no recipe file given"])
    if len(recipes) > 1:
        from ..training.stages import train_stages

        train_stages(recipes, overrides, overwrite=args.overwrite)
        return 0
    recipe = load_recipe(recipes[0], overrides)
    resume = args.resume if args.resume else (False if args.no_resume else None)
    out = train(recipe, overwrite=args.overwrite, resume=resume)
    print(f"done: {out}")
    return 0
