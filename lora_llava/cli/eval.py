"""`lora-llava eval RECIPE.yaml [key.path=value ...]`, or `lora-llava eval --model X [--adapter RUN] --data FILE`.

With a recipe: the run in its `train.output_dir` answers every `data.eval`
dataset; per-question rows and the metrics go to `<output_dir>/eval/`.
"""

from __future__ import annotations

from ..evaluate.sampling import GENERATION_BATCH
from .args import positive_int
from .predict import add_model_args, add_sampling_args, load, sampling


def register(sub, common) -> None:
    p = sub.add_parser(
        "eval",
        parents=[common],
        help="score a run or model on VQA data (closed accuracy, open recall, POPE)",
        description="Score a run (a recipe's train.output_dir) or any model on VQA data: closed-set accuracy, "
        "open-set recall, exact match and POPE, as LLaVA-Med reports them.",
    )
    p.add_argument("items", nargs="*", metavar="RECIPE_OR_OVERRIDE", help="a recipe YAML file, then key.path=value overrides")
    add_model_args(p)
    p.add_argument("--data", metavar="FILE", help="without a recipe: the LLaVA JSON / JSONL eval file")
    p.add_argument(
        "--image-folder", metavar="DIR", help="with --data: folder its image paths are relative to (default: its folder)"
    )
    p.add_argument("--limit", type=int, help="only the first N questions of each dataset (a quick look)")
    p.add_argument(
        "--output",
        metavar="PATH",
        help="recipe: folder for predictions.jsonl + metrics.json (default <output_dir>/eval); --data: a .jsonl file",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=GENERATION_BATCH, help="with --data: prompts generated together (a recipe uses train.batch_size)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace earlier results at the output path")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LoraLlavaError
    from ..evaluate.metrics import format_report
    from ..evaluate.run import evaluate_model, evaluate_recipe
    from .train import split_items

    recipes, overrides = split_items(args.items)
    if len(recipes) > 1:
        raise LoraLlavaError(f"give one recipe, not {len(recipes)}")
    if recipes:
        if args.data:
            raise LoraLlavaError("--data: the recipe's data.eval is evaluated; give either a recipe or --data")
        from ..recipe.parse import load_recipe

        recipe = load_recipe(recipes[0], overrides)
        model = load(args) if args.model else None
        reports = evaluate_recipe(recipe, model, sampling(args), args.limit, args.output, args.overwrite)
        for path, report in reports.items():
            print(format_report(report, title=path))
        print(f"per-question results: {args.output or recipe.train.output_dir + '/eval'}")
        return 0
    if overrides:
        raise LoraLlavaError(f"{overrides[0]}: overrides need a recipe file")
    if not args.data:
        raise LoraLlavaError("give a recipe file, or --model and --data")
    report = evaluate_model(
        load(args), args.data, args.image_folder, sampling(args), args.batch_size, args.limit, args.output, args.overwrite
    )
    print(format_report(report, title=args.data))
    return 0
