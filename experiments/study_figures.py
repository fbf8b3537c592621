"""A study's figures, and what the studies draw theirs with.

curves.png (validation accuracy and training loss against epoch, every arm) and test_accuracy.png
(final test accuracy, one bar per arm), written for every study; `plot_lines`,
`label_line_ends`, `quick_mark` and `save_figure` for the figures a study adds. Every arm keeps
one colour (and line style) in every figure (`arm_color`), and lines are labelled where they end,
so no figure needs a legend. matplotlib is imported where a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnet_jax import files

if TYPE_CHECKING:
    from experiments.sweep import Arm, ArmResult, Study

# One colour per arm, in the study's arm order; an arm may name its own.
PALETTE = (
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22",
    "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173",
)  # fmt: skip


def arm_color(study_arms: Sequence[Arm], arm: Arm) -> str:
    """The arm's own colour, else the palette's by its place among the study's arms."""
    if arm.color:
        return arm.color
    index = [a.name for a in study_arms].index(arm.name)
    return PALETTE[index % len(PALETTE)]


def save_figure(fig: Any, path: Path) -> None:
    """Writes and closes `fig`, grown to take in the line-end labels outside its axes."""
    import matplotlib.pyplot as plt

    try:
        files.write_atomically(
            path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", pad_inches=0.15)
        )
    finally:
        plt.close(fig)


def label_line_ends(ax: Any, ends: list[tuple[float, float, str, str]]) -> None:
    """Writes each label (x, y, text, color) right of its line's end, spread so none overlap."""
    if not ends:
        return
    low, high = ax.get_ylim()
    gap = 0.055 * (high - low)
    # A line that leaves the axes (a diverged arm's) is labelled at the edge it leaves by.
    ends = [(x, min(max(y, low), high) if math.isfinite(y) else high, t, c) for x, y, t, c in ends]
    placed = sorted(ends, key=lambda e: e[1])
    ys = [e[1] for e in placed]
    for i in range(1, len(ys)):
        ys[i] = max(ys[i], ys[i - 1] + gap)
    overflow = ys[-1] - high
    if overflow > 0:  # pushed past the top: shift the stack down, not below the axis
        ys = [max(y - overflow, low + i * gap) for i, y in enumerate(ys)]
    x_right = ax.get_xlim()[1]
    for (_, _, text, color), y in zip(placed, ys, strict=True):
        ax.annotate(
            text,
            xy=(x_right, y),
            xytext=(4, 0),
            textcoords="offset points",
            color=color,
            fontsize=8,
            va="center",
            annotation_clip=False,
        )


def plot_lines(
    ax: Any,
    results: Sequence[ArmResult],
    key: str | Callable[[ArmResult], str],
    scale: float = 1.0,
    label_ends: bool = True,
) -> None:
    """One line per arm of a per-epoch key (or a key chosen per arm) in the arm's style. A
    diverged arm is labelled so, and does not set the y range when other arms are on the axes."""
    ends = []
    settled = []  # the values of the arms that did not diverge
    for result in results:
        x, y = result.series(key(result) if callable(key) else key)
        if not x:
            continue
        y = [scale * v for v in y]
        if not result.diverged:
            settled += [v for v in y if math.isfinite(v)]
        ax.plot(
            x,
            y,
            color=result.color,
            linestyle="--" if result.arm.dashed else "-",
            marker="o" if len(x) < 12 else None,
            markersize=3,
            linewidth=1.6,
        )
        label = f"{result.arm.label} (diverged)" if result.diverged else result.arm.label
        ends.append((x[-1], y[-1], label, result.color))
    if settled and any(result.diverged for result in results):
        low, high = min(settled), max(settled)
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 1.0
        ax.set_ylim(low - margin, high + margin)
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if label_ends:
        label_line_ends(ax, ends)


def quick_mark(text: str, results: Sequence[ArmResult]) -> str:
    """Titles of figures made from --quick arms say so."""
    return text + ("  [QUICK RUN: not a result]" if any(r.quick for r in results) else "")


def plot_curves(study: Study, results: Sequence[ArmResult], path: Path) -> Path:
    """Validation accuracy and training loss against epoch, every arm on each panel."""
    import matplotlib.pyplot as plt

    splits = {r.eval_split for r in results if r.epochs}
    held_out = (
        "Validation accuracy (%)"
        if splits <= {"val"}
        else "Test accuracy (%), evaluated every epoch"
        if splits == {"test"}
        else "Validation (or test) accuracy (%)"
    )
    # Constrained layout makes room for the line-end labels between the panels.
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    plot_lines(acc_ax, results, lambda r: f"{r.eval_split}_accuracy", scale=100.0)
    acc_ax.set(title=held_out.split(" (")[0], xlabel="Epoch", ylabel=held_out)
    plot_lines(loss_ax, results, "train_loss")
    loss_ax.set(title="Training loss", xlabel="Epoch", ylabel="Training loss (cross-entropy, nats)")
    fig.suptitle(quick_mark(study.title, results))
    save_figure(fig, path)
    return path


def plot_test_accuracy(study: Study, results: Sequence[ArmResult], path: Path) -> Path:
    """Final test accuracy, one bar per arm (a note where an arm has none)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(7.0, 0.9 * len(results) + 2), 5.0))
    xs = range(len(results))
    for x, result in zip(xs, results, strict=True):
        accuracy = (result.results or {}).get("test_accuracy")
        if accuracy is None:
            text = "diverged" if result.diverged else "not\nfinished"
            ax.text(x, 1, text, ha="center", va="bottom", fontsize=8, color=result.color)
            continue
        ax.bar(
            x,
            100 * accuracy,
            color=result.color,
            hatch="//" if result.arm.dashed else None,
            edgecolor="white" if result.arm.dashed else result.color,
        )
        ax.text(x, 100 * accuracy, f"{100 * accuracy:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r.arm.label for r in results], rotation=30, ha="right")
    for tick, result in zip(ax.get_xticklabels(), results, strict=True):
        tick.set_color(result.color)
    ax.set(
        ylabel="Test accuracy (%)",
        ylim=(0, 105),
    )
    title = quick_mark(f"Final test accuracy\n{study.title}", results)
    ax.set_title(title.replace("  [", "\n["), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return path
