"""`lora-llava recipes`: the recipes shipped with the package, by name."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser(
        "recipes",
        parents=[common],
        help="list the shipped recipes (train them by name: lora-llava train medical)",
        description="List the recipes shipped with lora-llava. Any verb that takes a recipe takes one of these names; "
        "--show NAME prints the file, to copy and edit.",
    )
    p.add_argument("--show", metavar="NAME", help="print this recipe's YAML")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import RecipeError
    from ..recipe.shipped import find_recipe, first_comment, shipped_recipes

    recipes = shipped_recipes()
    if args.show:
        path = find_recipe(args.show)
        if not path.is_file():
            raise RecipeError(args.show, [f"no shipped recipe of that name ({', '.join(recipes)})"])
        print(path.read_text(encoding="utf-8"), end="")
        return 0
    width = max(len(n) for n in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {first_comment(path)}")
    print(f"\n(in {next(iter(recipes.values())).parent}; `lora-llava recipes --show NAME` prints one)")
    return 0
