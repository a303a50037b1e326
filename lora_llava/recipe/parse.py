"""Recipes: YAML -> typed, frozen dataclasses, with strict keys and overrides.

Every default lives in exactly one place, the dataclass field below, and each
field's help text sits beside it (`metadata["help"]`). Parsing collects every
problem of a file (unknown keys with a did-you-mean, wrong types, bad values,
contradictory options) and raises them together as one `RecipeError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from ..errors import RecipeError
from ..io import atomic_write_text
from .schema import LLM_LINEAR_LAYERS, MEMORY_SIZE, SYNONYMS, Recipe, _type_name
from .shipped import find_recipe, shipped_recipes

# ----------------------------------------------------------------------------- parsing

# Values in messages are shortened: a recipe may hold a huge or deeply nested value where a number was meant.
_short = reprlib.Repr()
_short.maxlevel, _short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 2, 80, 80, 4, 4
_show = _short.repr


def _convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check `value` against the annotation `tp`; return the converted value."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], path, problems)
        for a in inner:
            sub: list[str] = []
            out = _convert(value, a, path, sub)
            if not sub:
                return out
        problems.append(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
        return None
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            problems.append(f"{path}: {_show(value)} is not one of {', '.join(repr(a) for a in allowed)}{extra}")
        return value
    if origin is tuple:
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}: expected a list, got {_show(value)}")
            return ()
        return tuple(_convert(v, get_args(tp)[0], f"{path}.{i}", problems) for i, v in enumerate(value))
    if origin is dict:
        return _convert_mapping(value, tp, path, problems)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, problems)
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true/false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        # YAML reads `2e-5` (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{path}: expected a number, got {_show(value)}")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp}")  # a bug in this module, not in a recipe


def _convert_mapping(value: Any, tp: Any, path: str, problems: list[str]) -> dict:
    if not isinstance(value, dict):
        problems.append(f"{path}: expected a mapping, got {_show(value)}")
        return {}
    key_tp, value_tp = get_args(tp)
    return {_convert(k, key_tp, path, problems): _convert(v, value_tp, f"{path}.{k}", problems) for k, v in value.items()}


def _check_value(value: Any, meta: dict, path: str, problems: list[str]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value):  # YAML's .nan / .inf, or 'nan' / '1e999' read as numbers
        problems.append(f"{path}: must be a finite number, got {_show(value)}")
        return
    if "gt" in meta and not value > meta["gt"]:
        problems.append(f"{path}: must be greater than {meta['gt']}, got {_show(value)}")
    if "min" in meta and value < meta["min"]:
        problems.append(f"{path}: must be at least {meta['min']}, got {_show(value)}")
    if "lt" in meta and not value < meta["lt"]:
        problems.append(f"{path}: must be less than {meta['lt']}, got {_show(value)}")
    if "max" in meta and value > meta["max"]:
        problems.append(f"{path}: must be at most {meta['max']}, got {_show(value)}")


def _build(cls: type, raw: Any, path: str, problems: list[str]) -> Any:
    prefix = f"{path}." if path else ""
    if not isinstance(raw, dict):
        problems.append(f"{path or 'recipe'}: expected a mapping, got {_show(raw)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            hint = (
                [SYNONYMS[key]]
                if SYNONYMS.get(key) in fields
                else difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            )
            extra = f" (did you mean {prefix}{hint[0]}?)" if hint else f" (allowed: {', '.join(fields)})"
            problems.append(f"{prefix}{key}: unknown key{extra}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            before = len(problems)
            value = _convert(raw[name], hints[name], prefix + name, problems)
            if len(problems) == before:  # a value of the wrong type has said so already
                _check_value(value, f.metadata, prefix + name, problems)
            kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{prefix}{name}: required key is missing")
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # missing keys: already reported


def _cross_checks(r: Recipe, problems: list[str]) -> None:
    """Combinations that each key allows alone but that cannot work together."""
    m = r.model
    if not m.name_or_path and not (m.vision_tower and m.language_model):
        problems.append("model.name_or_path: required (or both model.vision_tower and model.language_model)")
    if m.name_or_path and (m.vision_tower or m.language_model):
        problems.append("model.name_or_path: give either name_or_path or vision_tower + language_model, not both")
    if bool(m.vision_tower) != bool(m.language_model):
        problems.append("model.vision_tower / model.language_model: composing a model needs both")
    if m.revision and not m.name_or_path:
        problems.append("model.revision: applies to model.name_or_path only (pin a composed part's revision in its folder)")
    if m.image_grid_pinpoints is not None and not m.anyres:
        problems.append("model.image_grid_pinpoints: applies with model.anyres: true (a NeXT checkpoint keeps its own grid)")
    if m.image_grid_pinpoints is not None and any(len(p) != 2 or min(p) <= 0 for p in m.image_grid_pinpoints):
        problems.append("model.image_grid_pinpoints: each pinpoint is a [width, height] pair of positive pixel sizes")
    if r.stage == "align" and m.quantization != "none":
        problems.append("model.quantization: stage align trains only the projector on a frozen model; use quantization: none")
    if r.template == "plain" and r.stage == "instruct":
        problems.append(
            "data.template: 'plain' is the stage-1 caption template; stage instruct needs vicuna_v1, mistral_instruct, "
            "chatml_direct or chat_template"
        )
    if not r.data.train:
        problems.append("data.train: at least one dataset is required")
    g = r.train.gradient_checkpointing
    if not isinstance(g, (bool, str)) and g < 0:
        problems.append(f"train.gradient_checkpointing: {g} layers; give true, false, auto or a number of layers >= 0")
    if r.train.gpu_memory is not None and not re.fullmatch(MEMORY_SIZE, str(r.train.gpu_memory).lower()):
        problems.append(f"train.gpu_memory: {r.train.gpu_memory!r} is not a memory size (e.g. 24GiB, 80GB, 16000MiB)")
    if r.data.on_bad_sample == "skip" and r.data.max_bad_fraction == 0:
        problems.append(
            "data.on_bad_sample: skip needs data.max_bad_fraction > 0, the share of bad samples you accept (e.g. 0.01); "
            "with 0 any bad sample stops the run"
        )
    bad = [t for t in r.lora.target_modules if t not in LLM_LINEAR_LAYERS]
    if bad:
        problems.append(
            f"lora.target_modules: {bad} are not linear layers of the language model ({', '.join(LLM_LINEAR_LAYERS)})"
        )


def parse_recipe(raw: Any, source: str = "<recipe>") -> Recipe:
    """Build a `Recipe` from a parsed YAML mapping; every problem is raised at once."""
    problems: list[str] = []
    recipe = _build(Recipe, raw, "", problems)
    if recipe is not None and not problems:
        _cross_checks(recipe, problems)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def apply_overrides(raw: dict, overrides: list[str], source: str = "<command line>") -> dict:
    """Apply `key.path=value` overrides (value in YAML syntax; list items by index)."""
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            problems.append(f"{item}: an override is key.path=value")
            continue
        try:
            value = load_yaml_text(text) if text != "" else None
        except yaml.YAMLError as e:
            problems.append(f"{key}: value {text!r} is not valid YAML ({e.problem})")
            continue
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"{where}: no list item {part!r} (the list has {len(node)})")
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                problems.append(f"{where}: cannot set a key inside {_show(node)}")
                break
    if problems:
        raise RecipeError(source, problems)
    return raw


MAX_DEPTH = 50  # a recipe nests four levels deep; far more is a broken or hostile file


class _RecipeYAMLError(yaml.MarkedYAMLError):
    """A YAML document that parses but that a recipe must not be: duplicate keys, absurd nesting."""


class RecipeLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate mapping keys (PyYAML keeps the last silently) and absurd nesting."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _RecipeYAMLError(problem=f"nested more than {MAX_DEPTH} levels deep", problem_mark=mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then a key of its own is an override, not a duplicate
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it
            if seen:
                problem = f"duplicate key {_show(key)} (first at line {first[key] + 1})"
                raise _RecipeYAMLError(problem=problem, problem_mark=key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml_text(text: str) -> Any:
    """One YAML document read with `RecipeLoader`."""
    loader = RecipeLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _decode(raw: bytes, path: str | Path) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise RecipeError(str(path), [f"line {line}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None


def read_yaml(path: str | Path) -> Any:
    """Read a YAML file with the safe loader (no Python objects from a stranger's file)."""
    p = find_recipe(path)
    if not p.is_file():
        names = ", ".join(shipped_recipes())
        raise RecipeError(str(path), [f"file not found (shipped recipes, by name: {names}; `lora-llava recipes` lists them)"])
    try:
        text = _decode(p.read_bytes(), path)
    except OSError as e:
        raise RecipeError(str(path), [f"cannot read ({e.strerror})"]) from None
    try:
        return load_yaml_text(text) or {}
    except _RecipeYAMLError as e:
        raise RecipeError(str(path), [f"line {e.problem_mark.line + 1}: {e.problem}"]) from None
    except yaml.reader.ReaderError as e:  # a control character: binary data, not a text file
        line = text.count("\n", 0, e.position) + 1
        raise RecipeError(str(path), [f"line {line}: not a text file (character #x{e.character:04x})"]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}invalid YAML ({getattr(e, 'problem', e)})"]) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    raw = read_yaml(path)
    raw = apply_overrides(raw, list(overrides))
    return parse_recipe(raw, str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(recipe))


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write the resolved recipe (every default filled in) so a run can be reproduced; never seen half-written."""
    atomic_write_text(Path(path), yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
