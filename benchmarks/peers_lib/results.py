"""From the probe's result files to the figures: tokens per CPU-second per run, ratios with their spread, checks."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

NAMES = {"lora-llava": "lora-llava", "llamafactory": "LLaMA-Factory", "swift": "ms-swift"}


class UnequalWork(RuntimeError):
    """The trainers did not train the same parameters: their figures would not compare the same work."""


@dataclass(frozen=True)
class RunFigures:
    trainer: str
    run: int
    steps: int  # measured steps (after warmup)
    tokens_per_step: float
    label_tokens_per_step: float
    cpu_s_per_step: float
    wall_s_per_step: float
    tokens_per_cpu_s: float
    tokens_per_wall_s: float
    first_loss: float
    last_loss: float
    trainable_params: int
    peak_rss_gib: float


def figures(trainer: str, run: int, result: dict, warmup: int) -> RunFigures:
    steps = result["steps"]
    timed = steps[warmup:] if len(steps) > warmup else steps
    tokens = sum(s["tokens"] for s in timed)
    cpu = sum(s["cpu_s"] for s in timed)
    wall = sum(s["wall_s"] for s in timed)
    return RunFigures(
        trainer=trainer,
        run=run,
        steps=len(timed),
        tokens_per_step=tokens / len(timed),
        label_tokens_per_step=sum(s["label_tokens"] for s in timed) / len(timed),
        cpu_s_per_step=cpu / len(timed),
        wall_s_per_step=wall / len(timed),
        tokens_per_cpu_s=tokens / cpu,
        tokens_per_wall_s=tokens / wall,
        first_loss=steps[0]["loss"],
        last_loss=steps[-1]["loss"],
        trainable_params=result["settings"]["model"]["trainable_params"],
        peak_rss_gib=result["peak_rss_gib"],
    )


def effective_settings(result: dict) -> dict:
    """What each trainer actually set up, in one vocabulary: the settings that must agree between all runs."""
    st = result["settings"]
    m, a, opt = st["model"], st["args"], st.get("optimizer") or {"groups": []}
    groups = opt["groups"]
    checkpoint = str(m.get("checkpoint_func", ""))
    return {
        "trainable_params": m["trainable_params"],
        "trainable_lora_params": m["trainable_lora_params"],
        "trainable_projector_params": m["trainable_projector_params"],
        "lora_modules (in tower, in projector)": (
            m["lora_modules"],
            m["lora_modules_in_vision_tower"],
            m["lora_modules_in_projector"],
        ),
        "lora r, alpha, dropout": tuple((m.get("peft") or {}).get(k) for k in ("r", "lora_alpha", "lora_dropout")),
        "dtypes (model, trainable)": (m["model_dtype"], tuple(m["trainable_dtypes"])),
        "mixed precision": (st.get("mixed_precision"), a["fp16"], a["bf16"]),
        "checkpointed decoder layers": m["checkpointed_layers"].get("LlamaDecoderLayer", 0),
        "non-reentrant checkpointing": "use_reentrant=False" in checkpoint.replace(" ", "")
        or "'use_reentrant': False" in checkpoint,
        "optimizer": opt.get("class"),
        "learning rates": tuple(sorted({g["lr"] for g in groups})),
        "betas, eps": tuple(sorted({(tuple(g["betas"]), g["eps"]) for g in groups})),
        "weight decay": tuple(sorted({g["weight_decay"] for g in groups})),
        "batch, grad accum, max steps": (a["per_device_train_batch_size"], a["gradient_accumulation_steps"], a["max_steps"]),
        "max grad norm, scheduler": (a["max_grad_norm"], a["lr_scheduler_type"]),
        "threads": result["threads"],
    }


def check_equal_work(results: dict[str, list[dict]]) -> None:
    """Fail loudly unless every run trained the same parameters with the same settings."""
    runs = [(f"{t} run {i}", effective_settings(r)) for t, rs in results.items() for i, r in enumerate(rs, 1)]
    if not runs:
        return
    differ = sorted({k for _, e in runs for k in e if e[k] != runs[0][1][k]})
    if differ:
        lines = [f"  {k}: " + "; ".join(f"{who} {e[k]}" for who, e in runs) for k in differ]
        raise UnequalWork("the runs did not do the same work:\n" + "\n".join(lines))


def ratios(figs: list[RunFigures], base: str = "lora-llava") -> dict[str, dict]:
    """lora-llava / peer per run (runs paired by their position in the interleaved order), mean and min..max."""
    by = {}
    for f in figs:
        by.setdefault(f.trainer, []).append(f)
    out = {}
    for peer, runs in by.items():
        if peer == base or base not in by:
            continue
        paired = [b.tokens_per_cpu_s / p.tokens_per_cpu_s for b, p in zip(by[base], runs)]
        mean_ratio = statistics.mean(f.tokens_per_cpu_s for f in by[base]) / statistics.mean(f.tokens_per_cpu_s for f in runs)
        out[peer] = {"per_run": paired, "of_means": mean_ratio, "min": min(paired), "max": max(paired)}
    return out


def table(figs: list[RunFigures]) -> list[str]:
    """Markdown: one row per run in the order they ran."""
    rows = [
        "| run | trainer | tokens/step | supervised/step | CPU s/step | tokens per CPU-second | tokens/s wall | "
        "loss step 1 | loss last | trainable | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for f in figs:
        rows.append(
            f"| {f.run} | {NAMES.get(f.trainer, f.trainer)} | {f.tokens_per_step:.1f} | {f.label_tokens_per_step:.1f} | "
            f"{f.cpu_s_per_step:.3f} | {f.tokens_per_cpu_s:.0f} | {f.tokens_per_wall_s:.0f} | {f.first_loss:.4f} | "
            f"{f.last_loss:.4f} | {f.trainable_params:,} | {f.peak_rss_gib:.2f} GiB |"
        )
    return rows


def summary(figs: list[RunFigures]) -> list[str]:
    """Per trainer: mean tokens per CPU-second with min..max; then the ratios."""
    by: dict[str, list[RunFigures]] = {}
    for f in figs:
        by.setdefault(f.trainer, []).append(f)
    lines = ["| trainer | runs | tokens per CPU-second, mean (min..max) | CPU s/step, mean |", "|---|---|---|---|"]
    for t, runs in by.items():
        v = [f.tokens_per_cpu_s for f in runs]
        cpu = statistics.mean(f.cpu_s_per_step for f in runs)
        lines.append(f"| {NAMES.get(t, t)} | {len(runs)} | {statistics.mean(v):.0f} ({min(v):.0f}..{max(v):.0f}) | {cpu:.3f} |")
    for peer, r in ratios(figs).items():
        per_run = ", ".join(f"{x:.3f}" for x in r["per_run"])
        lines.append("")
        lines.append(
            f"lora-llava / {NAMES.get(peer, peer)}: {r['of_means']:.3f}x of the means; "
            f"per run {per_run} (min..max {r['min']:.3f}..{r['max']:.3f})"
        )
    return lines
