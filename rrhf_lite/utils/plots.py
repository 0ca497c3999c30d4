"""PNG plots for run reports: training curves and reward distributions.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so nothing here changes
the global backend of a notebook or needs a display. Files are written atomically.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from rrhf_lite.utils.io import read_jsonl

# Keys in a Trainer log that are bookkeeping, not curves.
_NOT_CURVES = {
    "step", "epoch", "total_flos", "train_loss", "train_runtime", "train_samples_per_second",
    "train_steps_per_second", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
}
# Panels in this order first (loss, then ranking, then SFT); anything else after, by name.
_PRIORITY = ("loss", "loss/total", "loss/rank", "loss/sft", "rank/accuracy", "rank/margin")
MAX_PANELS = 12


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return out


def _finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _message(fig, text: str) -> None:
    ax = fig.add_subplot()
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")


# ----------------------------------------------------------------------------- training curves


def training_curves(log_history: Sequence[Mapping]) -> dict[str, dict[str, list[tuple]]]:
    """{metric: {"train": [(step, value)], "eval": [...]}} from Trainer-style log entries.

    `eval_loss/rank` and `loss/rank` share a panel, so train and held-out curves line up.
    Entries without a step use their position in the log.
    """
    curves: dict[str, dict[str, list[tuple]]] = {}
    for index, entry in enumerate(log_history):
        step = entry.get("step", index)
        step = step if _finite(step) else index
        for key, value in entry.items():
            if key in _NOT_CURVES or not _finite(value):
                continue
            split, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
            curves.setdefault(name, {"train": [], "eval": []})[split].append((step, value))
    order = [k for k in _PRIORITY if k in curves] + sorted(k for k in curves if k not in _PRIORITY)
    return {k: curves[k] for k in order}


def plot_training_curves(
    log_history: Sequence[Mapping] | str | Path,
    out_png: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    title: str = "Training curves",
) -> Path:
    """One panel per logged metric (loss, rank loss, SFT loss, ranking accuracy, ...).

    log_history: `trainer.state.log_history`, or the path of a metrics.jsonl with one log
    entry per line. metrics: which metric names to draw (default: all, up to 12 panels).
    A log with no numeric metric gives a PNG that says so, rather than breaking a report.
    """
    if isinstance(log_history, str | Path):
        log_history = read_jsonl(log_history)
    curves = training_curves(log_history)
    if metrics is not None:
        curves = {k: curves[k] for k in metrics if k in curves}
    names = list(curves)[:MAX_PANELS]
    cols = min(3, max(1, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    fig = _figure(4.0 * cols, 3.0 * rows)
    if not names:
        _message(fig, "no training metrics were logged")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        for split, style in (("train", "-"), ("eval", "o--")):
            points = sorted(curves[name][split])
            if points:
                xs, ys = zip(*points, strict=True)
                if len(points) < 30 and "o" not in style:
                    style += "o"  # a short run: a line alone would not show a single point
                ax.plot(xs, ys, style, label=split, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if curves[name]["eval"]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, out_png)


# ----------------------------------------------------------------------------- rewards


def plot_reward_distributions(
    rewards: Mapping[str, Sequence[float]],
    out_png: str | Path,
    *,
    title: str = "Reward distributions",
    bins: int = 30,
) -> Path:
    """Overlaid histograms (shared bins) and a violin per model, means marked.

    rewards: name -> rewards, e.g. {"initial": [...], "round-1": [...], "best-of-n": [...]}.
    NaN values are dropped; a name without values is listed as "(no data)".
    """
    clean = {str(k): [float(v) for v in vals if _finite(float(v))] for k, vals in rewards.items()}
    present = {k: v for k, v in clean.items() if v}
    fig = _figure(11.0, 4.0)
    if not present:
        _message(fig, "no rewards to plot")
        fig.suptitle(title)
        return _save(fig, out_png)

    low = min(min(v) for v in present.values())
    high = max(max(v) for v in present.values())
    if high == low:  # every reward equal: give the bins some width
        low, high = low - 0.5, high + 0.5
    edges = [low + (high - low) * i / bins for i in range(bins + 1)]

    hist, violin = fig.subplots(1, 2, width_ratios=[3, 2])
    for name, values in present.items():
        mean = sum(values) / len(values)
        hist.hist(values, bins=edges, histtype="step", linewidth=1.5,
                  label=f"{name} (n={len(values)}, mean {mean:.3g})")
    hist.set_xlabel("reward")
    hist.set_ylabel("count")
    hist.grid(alpha=0.3)
    hist.legend(fontsize=8)

    names = list(present)
    positions = list(range(1, len(names) + 1))
    # A violin needs spread; a single value or a constant list is drawn as a point instead.
    spread = [i for i, n in enumerate(names) if len(set(present[n])) > 1]
    if spread:
        violin.violinplot([present[names[i]] for i in spread],
                          positions=[positions[i] for i in spread], showextrema=True)
    means = [sum(present[n]) / len(present[n]) for n in names]
    violin.scatter(positions, means, marker="D", color="black", zorder=3, label="mean")
    missing = [k for k in clean if k not in present]
    labels = names + [f"{k}\n(no data)" for k in missing]
    violin.set_xticks(list(range(1, len(labels) + 1)), labels, fontsize=8, rotation=15)
    violin.set_xlim(0.5, len(labels) + 0.5)
    violin.set_ylabel("reward")
    violin.grid(alpha=0.3)
    violin.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, out_png)
