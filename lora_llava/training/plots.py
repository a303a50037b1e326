"""The loss curve (and evaluation metrics, when there are any) as a PNG in the run folder."""

from __future__ import annotations

from pathlib import Path


def plot_run(metrics: list[dict], path: Path, title: str = "", evals: dict[str, dict] | None = None) -> Path | None:
    """Training loss per step; a second panel of eval metrics (before / after) when given."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics if m.get("loss") is not None]
    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    if not steps:
        return None
    panels = 2 if evals else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, losses, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    if evals:
        ax2 = axes[0][1]
        names = sorted({k for v in evals.values() for k in v})
        width = 0.8 / len(evals)
        for j, (label, values) in enumerate(evals.items()):
            xs = [i + j * width for i in range(len(names))]
            ax2.bar(xs, [values.get(n, 0.0) for n in names], width=width, label=label)
        ax2.set_xticks([i + width * (len(evals) - 1) / 2 for i in range(len(names))])
        ax2.set_xticklabels(names, rotation=20, ha="right")
        ax2.set_ylim(0, 1.15)  # headroom above 1.0 for the legend
        ax2.set_title("evaluation")
        ax2.legend(loc="upper center", ncol=len(evals), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
