"""The profiles of the trainers side by side: CPU ms per step by region of the step and by (region, op)."""

from __future__ import annotations

import json
from pathlib import Path

from .results import NAMES

# The step's regions in the order a step runs them; what each holds is in peers_probe_regions.
REGIONS = ("data", "forward", "layer_forward", "lora_dropout", "backward", "recompute", "clip", "optimizer", "step_end", "log")


def load(folder: Path, trainers: list[str]) -> dict[str, dict]:
    found = {}
    for t in trainers:
        path = folder / f"profile_{t}.json"
        if path.is_file():
            found[t] = json.loads(path.read_text(encoding="utf-8"))
    return found


def _row(label: str, values: list[float | None]) -> str:
    cells = " | ".join("-" if v is None else f"{v:.1f}" for v in values)
    return f"| {label} | {cells} |"


def compare(profiles: dict[str, dict], cells: int = 25) -> list[str]:
    """Markdown tables; `cells`: how many (region, op) rows, the largest in any trainer first."""
    names = list(profiles)
    head = "| ms per step | " + " | ".join(NAMES.get(t, t) for t in names) + " |"
    rule = "|---|" + "---|" * len(names)
    ps = [profiles[t] for t in names]
    lines = [head, rule, _row("CPU time of the step (profiled)", [p["cpu_ms_per_step"] for p in ps])]
    lines.append(_row("wall time of the step (profiled)", [p["wall_ms_per_step"] for p in ps]))
    lines.append(_row("tokens per step", [p["tokens_per_step"] for p in ps]))
    for r in REGIONS:
        lines.append(_row(f"region {r} (inclusive)", [p["regions_ms_per_step"].get(r) for p in ps]))
    if all("ops_ms_per_step" in p for p in ps):
        lines.append(_row("all aten ops", [sum(p["ops_ms_per_step"].values()) for p in ps]))
        lines.append(
            _row("the rest (Python, autograd, dispatch)", [p["cpu_ms_per_step"] - sum(p["ops_ms_per_step"].values()) for p in ps])
        )
        lines += ["", head.replace("ms per step", "innermost region / aten op, ms per step"), rule]
        keys = set().union(*(p["region_op_ms_per_step"] for p in ps))
        biggest = sorted(keys, key=lambda k: -max(p["region_op_ms_per_step"].get(k, 0.0) for p in ps))[:cells]
        lines += [_row(k, [p["region_op_ms_per_step"].get(k, 0.0) for p in ps]) for k in biggest]
    return lines


def differences(profiles: dict[str, dict], floor_ms: float = 1.0) -> list[str]:
    """(region, op) cells that one trainer spends time on and another (almost) not: structural differences."""
    names = list(profiles)
    ps = [profiles[t] for t in names]
    if not all("region_op_ms_per_step" in p for p in ps):
        return []
    keys = set().union(*(p["region_op_ms_per_step"] for p in ps))
    lines = [
        "| (innermost region / op) present in one trainer only, ms per step | "
        + " | ".join(NAMES.get(t, t) for t in names)
        + " |"
    ]
    lines.append("|---|" + "---|" * len(names))
    for k in sorted(keys, key=lambda k: -max(p["region_op_ms_per_step"].get(k, 0.0) for p in ps)):
        v = [p["region_op_ms_per_step"].get(k, 0.0) for p in ps]
        if max(v) - min(v) > floor_ms and min(v) < 0.5 * max(v):
            lines.append(_row(k, v))
    return lines
