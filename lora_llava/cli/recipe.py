"""`lora-llava recipe [SECTION]`: every recipe key with its type, default and meaning."""

from __future__ import annotations


def register(sub, common) -> None:
    p = sub.add_parser(
        "recipe",
        parents=[common],
        help="list every recipe key with its type, default and help text",
        description="List the keys a recipe may hold. SECTION (model, lora, projector, data, train, or a dotted "
        "path such as data.train) narrows the list.",
    )
    p.add_argument("section", nargs="?", help="only this section or key (e.g. train, data.train, lora.r)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..recipe.describe import describe_fields

    print("\n".join(describe_fields(section=args.section)))
    return 0
