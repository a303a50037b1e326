"""`lora-llava check RECIPE.yaml [key.path=value ...]`: validate a recipe and every sample of its data."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser(
        "check",
        parents=[common],
        help="validate a recipe and every sample of its datasets (processor and tokenizer only, no model weights)",
        description="Validate a recipe and every sample of its datasets (images decoded, text tokenised, lengths "
        "measured) with the processor alone, before any GPU time is spent.",
    )
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="recipe YAML file, then key.path=value overrides")
    p.add_argument(
        "--workers", type=int, default=None, help="processes that decode images and tokenise (default: data.num_workers)"
    )
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON (counts, bad samples, lengths)")
    p.set_defaults(func=run)


def run(args) -> int:
    """Print the report; exit 1 when the share of bad samples exceeds data.max_bad_fraction."""
    import json
    from pathlib import Path

    from ..check import check
    from ..errors import OutputError, RecipeError
    from ..recipe.parse import load_recipe
    from .train import split_items

    recipes, overrides = split_items(args.items)
    if len(recipes) != 1:
        raise RecipeError("<command line>", [f"check takes one recipe file, got {len(recipes)}"])
    if args.workers is not None and args.workers < 0:
        raise RecipeError("<command line>", ["--workers: must be at least 0"])
    if args.json and Path(args.json).exists():
        raise OutputError(f"--json: {args.json} exists; choose another file")
    recipe = load_recipe(recipes[0], overrides)
    source = recipe.model.name_or_path or f"{recipe.model.language_model} + {recipe.model.vision_tower}"
    print(f"check: reads the tokenizer and processor of {source} only (no model weights)", flush=True)
    report = check(recipe, workers=args.workers)
    print(report.format(), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=1), encoding="utf-8")
    return 1 if report.failed else 0
