"""Every recipe key with its type, default and help text: what `lora-llava recipe` prints."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import get_args, get_origin

from ..errors import RecipeError
from .schema import Recipe, _type_name


def _lines(cls: type, prefix: str) -> list[tuple[str, str]]:
    """(key, line) for every field of `cls` and of the sections below it."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = prefix + f.name
        sub = get_args(tp)[0] if get_origin(tp) is tuple else tp
        if dataclasses.is_dataclass(sub):
            out.append((key, f"{key}: {f.metadata.get('help', '')}"))
            out.extend(_lines(sub, key + ("[]." if sub is not tp else ".")))
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        out.append((key, f"  {key} ({_type_name(tp)}; {default}): {f.metadata.get('help', '')}"))
    return out


def describe_fields(cls: type = Recipe, prefix: str = "", section: str | None = None) -> list[str]:
    """One line per recipe key with its type, default and help text; `section` keeps one section or key."""
    rows = _lines(cls, prefix)
    if not section:
        return [line for _, line in rows]
    want = section.replace("[]", "")
    kept = [line for key, line in rows if key.replace("[]", "") == want or key.replace("[]", "").startswith(want + ".")]
    if not kept:
        keys = [key.replace("[]", "") for key, _ in rows]
        close = difflib.get_close_matches(want, keys, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise RecipeError("lora-llava recipe", [f"{section}: no such section or key{hint}"])
    return kept


def choices(cls: type, name: str) -> tuple:
    """The values a `Literal` key allows (`choices(ModelConfig, "dtype")`): command-line choices come from here."""
    tp = typing.get_type_hints(cls)[name]
    if get_origin(tp) is not typing.Literal:
        raise TypeError(f"{cls.__name__}.{name} is not a Literal")
    return get_args(tp)
