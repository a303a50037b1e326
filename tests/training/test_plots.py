"""loss.png: training and eval loss, eval metrics over steps, integer step ticks."""

from __future__ import annotations

from matplotlib.ticker import MaxNLocator

from lora_llava.training.plots import draw_run, eval_series, plot_run


def _report(accuracy: float) -> dict:
    return {
        "n": 4,
        "exact_match": accuracy,
        "closed": {"n": 2, "accuracy": accuracy, "exact_match": accuracy},
        "open": {"n": 2, "recall": accuracy, "exact_match": accuracy},
    }


METRICS = [
    {"step": 1, "epoch": 0.3, "loss": 3.0, "learning_rate": 1e-3},
    {"step": 2, "epoch": 0.6, "loss": 2.5, "learning_rate": 1e-3},
    {"step": 2, "eval_loss": 2.7},
    {"step": 2, "eval": {"/data/test.json": _report(0.5)}},
    {"step": 3, "epoch": 1.0, "loss": None},  # a non-finite loss, written as null
    {"step": 4, "epoch": 1.3, "loss": 2.0, "learning_rate": 5e-4},
    {"step": 4, "eval_loss": 2.4},
    {"step": 4, "eval_loss": 2.4},  # the Trainer's last eval and train()'s final one, at the same step
    {"step": 4, "eval": {"/data/test.json": _report(0.75)}},
    {"step": 4, "train_loss": 2.5, "train_runtime": 1.0},
]


def test_loss_png_has_training_and_eval_loss_and_eval_metrics(tmp_path):
    path = plot_run(METRICS, tmp_path / "loss.png", title="instruct")
    assert path.read_bytes()[:4] == b"\x89PNG"
    fig = draw_run(METRICS, title="instruct")
    loss, scores = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in loss.get_lines()}
    assert lines == {"training loss": ([1, 2, 4], [3.0, 2.5, 2.0]), "eval loss": ([2, 4], [2.7, 2.4])}
    curves = {line.get_label(): list(line.get_ydata()) for line in scores.get_lines()}
    assert curves["closed accuracy"] == [0.5, 0.75] and curves["open recall"] == [0.5, 0.75]


def test_step_axes_tick_on_whole_numbers_only():
    fig = draw_run(METRICS)
    for ax in fig.axes:
        locator = ax.xaxis.get_major_locator()
        assert isinstance(locator, MaxNLocator) and locator._integer
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_without_eval_there_is_one_panel_and_with_before_after_a_bar_panel(tmp_path):
    train_only = [m for m in METRICS if "loss" in m]
    assert len(draw_run(train_only).axes) == 1
    assert len(draw_run(train_only, evals={"before": {"exact match": 0.0}, "after": {"exact match": 1.0}}).axes) == 2
    assert plot_run([{"step": 1, "eval_loss": 1.0}], tmp_path / "none.png") is None  # nothing trained, nothing drawn


def test_several_eval_sets_are_named_by_file():
    rows = [{"step": 5, "eval": {"/a/slake.json": _report(1.0), "/b/vqa_rad.json": _report(0.0)}}]
    assert set(eval_series(rows)) >= {"slake: closed accuracy", "vqa_rad: closed accuracy"}
