"""Where a training step's CPU time goes, measured the same way in any Trainer.

Loaded by the probe (sitecustomize) when PEERS_PROBE_PROFILE is set; the
steps named by PEERS_PROBE_PROFILE_STEPS are profiled. Two kinds
(PEERS_PROBE_PROFILE_KIND):

* cpu (default): every aten op that runs (forward, backward, recompute,
  optimizer) is timed in thread CPU time through a TorchDispatchMode, and
  charged to the innermost labelled region open at the time (regions: see
  peers_probe_regions). CPU time, unlike the wall-clock times of
  torch.profiler, is not inflated when other jobs take the core. The mode
  itself costs a few microseconds of Python per op (compare the step's CPU
  time with an unprofiled run's).
* torch: torch.profiler over the same steps (wall-clock), its op table.

Written: PREFIX.json (ms per step by region, by op, by region and op) and
PREFIX.txt (the same as tables).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import peers_probe_regions as regions
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpTimer(TorchDispatchMode):
    """Thread CPU time of every aten op, keyed by (innermost region, op name)."""

    def __init__(self):
        super().__init__()
        self.totals: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.thread_time()
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        self.totals[(regions.STACK[-1] if regions.STACK else "outside", name)] += time.thread_time() - start
        self.calls[name] += 1
        return out


class StepProfiler:
    def __init__(self, prefix: str, steps: str, kind: str = "cpu"):
        first, _, last = steps.partition("-")
        self.first, self.last = int(first), int(last or first)
        self.prefix, self.kind = prefix, kind
        self.session: Any = None

    def attach(self, trainer: Any, model: Any, optimizer: Any) -> None:
        regions.attach(trainer, model, optimizer)

    def maybe_start(self, step: int) -> None:
        if step != self.first - 1 or self.session is not None:
            return
        if self.kind == "torch":
            self.session = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        else:
            self.session = OpTimer()
        self.session.__enter__()
        regions.TOTALS.clear()
        regions.ACTIVE[0] = True

    def at_step_end(self, step: int, steps: list[dict]) -> None:
        self.maybe_start(step)
        if step == self.last and self.session is not None:
            self.session.__exit__(None, None, None)
            regions.ACTIVE[0] = False
            self.write(steps[self.first - 1 : self.last])
            self.session = None

    def write(self, profiled: list[dict]) -> None:
        n = len(profiled)
        per_step = {k: 1e3 * v / n for k, v in sorted(regions.TOTALS.items())}
        summary = {
            "kind": self.kind,
            "steps": [s["step"] for s in profiled],
            "cpu_ms_per_step": 1e3 * sum(s["cpu_s"] for s in profiled) / n,
            "wall_ms_per_step": 1e3 * sum(s["wall_s"] for s in profiled) / n,
            "tokens_per_step": sum(s["tokens"] for s in profiled) / n,
            "regions_ms_per_step": per_step,
        }
        text = [f"{n} steps profiled ({summary['steps']}), ms per step", json.dumps(summary, indent=1)]
        if self.kind == "torch":
            text.append(self.session.key_averages().table(sort_by="self_cpu_time_total", row_limit=50, max_name_column_width=70))
        else:
            summary |= _op_summary(self.session, n)
            text += _op_tables(summary)
        with open(self.prefix + ".json", "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
        with open(self.prefix + ".txt", "w", encoding="utf-8") as f:
            f.write("\n\n".join(text) + "\n")


def _op_summary(timer: OpTimer, n: int) -> dict:
    by_op: dict[str, float] = defaultdict(float)
    by_region: dict[str, float] = defaultdict(float)
    for (region, op), t in timer.totals.items():
        by_op[op] += 1e3 * t / n
        by_region[region] += 1e3 * t / n
    cells = {f"{region} / {op}": 1e3 * t / n for (region, op), t in timer.totals.items()}
    return {
        "ops_ms_per_step": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
        "op_calls_per_step": {k: v / n for k, v in sorted(timer.calls.items(), key=lambda kv: -kv[1])},
        "ops_by_innermost_region_ms_per_step": dict(sorted(by_region.items(), key=lambda kv: -kv[1])),
        "region_op_ms_per_step": dict(sorted(cells.items(), key=lambda kv: -kv[1])),
    }


def _op_tables(summary: dict) -> list[str]:
    ops = summary["ops_ms_per_step"]
    calls = summary["op_calls_per_step"]
    lines = ["op                                          ms/step   calls/step"]
    lines += [f"{op:42s} {ms:9.1f} {calls.get(op, 0):10.1f}" for op, ms in list(ops.items())[:30]]
    cells = ["region / op                                 ms/step"]
    cells += [f"{k:42s} {ms:9.1f}" for k, ms in list(summary["region_op_ms_per_step"].items())[:40]]
    total = sum(ops.values())
    tail = f"all ops: {total:.1f} ms/step of {summary['cpu_ms_per_step']:.1f} ms CPU (the rest: Python, autograd, dispatch)"
    return ["\n".join(lines), "\n".join(cells), tail]
