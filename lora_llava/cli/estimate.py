"""`lora-llava estimate RECIPE.yaml [--gpu-memory 24GiB] [key.path=value ...]`: will the recipe fit the card?"""

from __future__ import annotations

from ..memory.budget import DEFAULT_GPU
from ..memory.shapes import GiB


def register(sub, common) -> None:
    p = sub.add_parser(
        "estimate",
        parents=[common],
        help="predict the peak GPU memory of a recipe from the model config alone",
        description="Peak GPU memory of training a recipe, part by part, from the model's config (no weights, no network), "
        "with a fits / does-not-fit verdict and the cheapest changes that would make it fit.",
    )
    p.add_argument("items", nargs="+", metavar="RECIPE_OR_OVERRIDE", help="the recipe YAML file, then key.path=value overrides")
    p.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help=f"memory of the card, e.g. 24GiB, 80GB (GB = GiB, as cards are labelled); default: this machine's GPU, else {DEFAULT_GPU}",
    )
    p.set_defaults(func=run)


def report(est, recipe, shape) -> list[str]:
    """The estimate, part by part, ending with the `total:` line (checkpointing: see the plan's own line)."""
    t = recipe.train
    lines = [
        f"model: {shape.source}",
        f"batch {t.batch_size} x {recipe.data.max_length} tokens ({shape.image_tokens} image tokens per sample"
        f"{', the worst case of the AnyRes grid' if shape.grid else ''}), "
        f"quantization {recipe.model.quantization}, LoRA r={recipe.lora.r}, optimizer {t.optimizer}, loss {t.loss}",
    ]
    titles = {"weights": "weights", "trained": "trained parameters", "activations": f"at the peak ({est.moment})"}
    for group, title in titles.items():
        lines.append(f"{title}:")
        lines += [f"  {p.name:<66}{p.bytes / GiB:7.2f} GiB" for p in est.parts if p.group == group]
    lines.append(f"{'peak allocated':<68}{est.allocated / GiB:7.2f} GiB")
    lines += [f"  {p.name:<66}{p.bytes / GiB:7.2f} GiB" for p in est.parts if p.group == "overhead"]
    lines.append(f"total: {est.total / GiB:.1f} GiB")
    return lines


def run(args) -> int:
    from ..errors import RecipeError
    from ..memory.budget import card_memory
    from ..memory.checkpointing import plan
    from ..memory.fit import cheapest_fit
    from ..memory.shapes import model_shape
    from ..recipe.parse import load_recipe
    from .train import split_items

    recipes, overrides = split_items(args.items)
    if len(recipes) != 1:
        raise RecipeError("<command line>", [f"estimate takes one recipe file, got {len(recipes)}"])
    budget, card = card_memory(args.gpu_memory)
    recipe = load_recipe(recipes[0], overrides)
    shape = model_shape(recipe.model)
    checkpointing = plan(recipe, shape, budget, card)
    est = checkpointing.estimate
    print("\n".join(report(est, recipe, shape)))
    print(checkpointing.describe())
    print(f"(data.max_length is the worst case: batches are padded to their longest sample; {est.tokens} tokens counted)")
    if est.total <= budget:
        print(f"fits: {card}, {(budget - est.total) / GiB:.1f} GiB to spare")
        return 0
    print(f"does not fit: {card}, {(est.total - budget) / GiB:.1f} GiB short")
    found = cheapest_fit(recipe, shape, budget)
    if found is None:
        print("no change known to this tool makes it fit: use a larger card")
        return 0
    changes, fitted = found
    print(f"cheapest changes that fit ({fitted.total / GiB:.1f} GiB): {' '.join(changes)}")
    print(f"  lora-llava train {recipes[0]} {' '.join(overrides + changes)}")
    return 0
