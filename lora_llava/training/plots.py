"""The run's curves as a PNG in the run folder: training and eval loss, eval metrics over steps, before / after scores.

Everything comes from metrics.jsonl rows: `{"step", "loss"}` per logging step,
`{"step", "eval_loss"}` per evaluation, `{"step", "eval": {dataset: report}}` from
generation during training (evaluate/callback.py). Steps are whole numbers, so
the step axes tick on integers only (a 3-step run would otherwise show 2.25).
"""

from __future__ import annotations

from pathlib import Path

from ..evaluate.metrics import headline


def eval_series(metrics: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """The headline eval metrics over steps, per dataset: {"closed accuracy" or "test: closed accuracy": (steps, values)}."""
    rows = [m for m in metrics if isinstance(m.get("eval"), dict)]
    datasets = {name for m in rows for name in m["eval"]}
    series: dict[str, tuple[list[int], list[float]]] = {}
    for m in rows:
        for name, report in m["eval"].items():
            for metric, value in headline(report).items():
                label = metric if len(datasets) == 1 else f"{Path(name).stem}: {metric}"
                steps, values = series.setdefault(label, ([], []))
                steps.append(m["step"])
                values.append(value)
    return series


def draw_run(metrics: list[dict], title: str = "", evals: dict[str, dict] | None = None):
    """The figure `plot_run` saves (None without a training loss): loss panel, eval-metrics panel, before / after panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    if not any(m.get("loss") is not None for m in metrics):
        return None
    series = eval_series(metrics)
    panels = 1 + bool(series) + bool(evals)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    axes = list(axes[0])
    _loss_panel(axes.pop(0), metrics, title)
    if series:
        _series_panel(axes.pop(0), series)
    if evals:
        _bars_panel(axes.pop(0), evals)
    fig.tight_layout()
    return fig


def plot_run(metrics: list[dict], path: Path, title: str = "", evals: dict[str, dict] | None = None) -> Path | None:
    """Write `draw_run`'s figure to `path`; None when there is no training loss to draw."""
    import matplotlib.pyplot as plt

    fig = draw_run(metrics, title, evals)
    if fig is None:
        return None
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _curve(ax, steps: list, values: list, **style) -> None:
    ax.plot(steps, values, marker="." if len(steps) < 50 else None, **style)


def _loss_panel(ax, metrics: list[dict], title: str) -> None:
    train = [(m["step"], m["loss"]) for m in metrics if m.get("loss") is not None]
    # The Trainer evaluates at the last step and train() once more after it: one point per step.
    evals = sorted({m["step"]: m["eval_loss"] for m in metrics if m.get("eval_loss") is not None}.items())
    _curve(ax, *zip(*train), label="training loss")
    if evals:
        # One eval (at the end only) is a point, not a line: a larger marker keeps it visible.
        ax.plot(*zip(*evals), marker="o", linestyle="-" if len(evals) > 1 else "none", label="eval loss")
        ax.legend(frameon=False)
    ax.set_ylabel("loss")
    ax.set_title(title or "loss")
    _step_axis(ax)


def _series_panel(ax, series: dict[str, tuple[list[int], list[float]]]) -> None:
    for label, (steps, values) in series.items():
        _curve(ax, steps, values, label=label)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.set_title("evaluation during training")
    ax.legend(frameon=False, fontsize="small")
    _step_axis(ax)


def _bars_panel(ax, evals: dict[str, dict]) -> None:
    names = sorted({k for v in evals.values() for k in v})
    width = 0.8 / len(evals)
    for j, (label, values) in enumerate(evals.items()):
        xs = [i + j * width for i in range(len(names))]
        ax.bar(xs, [values.get(n, 0.0) for n in names], width=width, label=label)
    ax.set_xticks([i + width * (len(evals) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels(names, rotation=20, ha="right")
    ax.set_ylim(0, 1.15)  # headroom above 1.0 for the legend
    ax.set_title("evaluation")
    ax.legend(loc="upper center", ncol=len(evals), frameon=False)
