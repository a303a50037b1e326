"""`lora-llava train RECIPE.yaml [RECIPE2.yaml ...] [key.path=value ...]`."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser("train", parents=[common], help="train a recipe (stage align or instruct)")
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
