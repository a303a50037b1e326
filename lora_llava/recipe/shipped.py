"""The recipes shipped inside the package: found by name (`lora-llava train medical`) after any install."""

from __future__ import annotations

from pathlib import Path

SHIPPED = Path(__file__).resolve().parents[1] / "recipes"  # package data: lora_llava/recipes/*.yaml


def shipped_recipes() -> dict[str, Path]:
    """Name -> file of every shipped recipe, sorted by name."""
    return {p.stem: p for p in sorted(SHIPPED.glob("*.yaml"))}


def first_comment(path: Path) -> str:
    """What a recipe is for: the first comment line after its command line."""
    lines = [line.lstrip("# ").rstrip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    text = [line for line in lines[1:] if line]
    return text[0] if text else ""


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: the path when it exists, else the shipped recipe of that name (`medical`, `medical.yaml`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    if len(p.parts) == 1 or p.parts[0] == "recipes":  # `medical`, `medical.yaml`, `recipes/medical.yaml` outside the repo
        shipped = shipped_recipes().get(p.name.removesuffix(".yaml").removesuffix(".yml"))
        if shipped is not None:
            return shipped
    return p
