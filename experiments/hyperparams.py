"""Batch size and learning rate: a grid, with the iterations per epoch each batch size gives.

ResNet-20 on CIFAR-10, SGD with momentum 0.9, /10 at 50% and 75% of the run, 100 epochs for every
arm (so a smaller batch takes more, smaller steps: 50k training images / batch = iterations per
epoch). The learning rate is given per 128 images; the trainer scales it linearly with the batch
(lr_used = learning_rate * batch_size / 128), as the table's lr_used column shows.

  --batch_sizes=32,128,512 --learning_rates=0.01,0.1,0.4   (the default grid: 9 arms)

Full scale (a GPU: nine ResNet-20 runs of 100 epochs):
  python -m experiments.hyperparams --data_dir ~/tensorflow_datasets
Quick check that it runs (minutes on a CPU; a 2x2 grid of tiny nets, not a result):
  python -m experiments.hyperparams --quick --out workdirs/hyperparams_quick
Writes <out>/results.csv, results.md, curves.png, test_accuracy.png and grid.png (test accuracy
over the grid); a rerun resumes.
"""

from pathlib import Path

from absl import flags

from experiments import study_figures, sweep

flags.adopt_module_key_flags(sweep)  # --help lists the study flags

FULL_GRID = ([32, 128, 512], [0.01, 0.1, 0.4])
QUICK_GRID = ([16, 32], [0.05, 0.1])
FLAGS = flags.FLAGS
flags.DEFINE_list(
    "batch_sizes",
    None,
    f"Batch sizes of the grid (default {FULL_GRID[0]}; --quick {QUICK_GRID[0]}).",
)
flags.DEFINE_list(
    "learning_rates",
    None,
    f"Learning rates per 128 images (default {FULL_GRID[1]}; --quick {QUICK_GRID[1]}).",
)


def grid() -> tuple[list[int], list[float]]:
    default_sizes, default_rates = QUICK_GRID if FLAGS.quick else FULL_GRID
    try:
        sizes = [int(b) for b in FLAGS.batch_sizes] if FLAGS.batch_sizes else default_sizes
        rates = [float(r) for r in FLAGS.learning_rates] if FLAGS.learning_rates else default_rates
    except ValueError as error:
        raise sweep.SweepError(
            f"--batch_sizes and --learning_rates take numbers: {error}"
        ) from None
    return sizes, rates


def arm_name(batch_size: int, learning_rate: float) -> str:
    return f"bs{batch_size}_lr{learning_rate:g}"


def arms() -> list[sweep.Arm]:
    sizes, rates = grid()
    return [
        sweep.Arm(
            arm_name(b, lr),
            f"batch {b}, lr {lr:g}",
            {"batch_size": b, "optimizer.learning_rate": lr},
        )
        for b in sizes
        for lr in rates
    ]


def columns(result: sweep.ArmResult) -> dict:
    config = result.config
    if not config:
        return {"lr_used": None}
    return {"lr_used": config["optimizer"]["learning_rate"] * config["batch_size"] / 128}


def grid_figure(results: list[sweep.ArmResult], out: Path) -> list[Path]:
    """grid.png: final test accuracy over (batch size, learning rate), iterations per epoch."""
    import matplotlib.pyplot as plt
    import numpy as np

    sizes, rates = grid()
    by_name = {r.arm.name: r for r in results}
    accuracy = np.full((len(sizes), len(rates)), np.nan)
    missing = {}  # (i, j) -> why a cell has no accuracy
    iterations = {}
    for i, b in enumerate(sizes):
        for j, lr in enumerate(rates):
            result = by_name.get(arm_name(b, lr))
            if result is None:
                missing[i, j] = "not run"
                continue
            if result.results:
                accuracy[i, j] = 100 * result.results["test_accuracy"]
            else:
                missing[i, j] = "diverged" if result.diverged else "unfinished"
            iterations[b] = iterations.get(b) or result.iterations_per_epoch
    fig, ax = plt.subplots(figsize=(1.6 * len(rates) + 3, 1.0 * len(sizes) + 2))
    # Cells without an accuracy (diverged, unfinished, not run) are grey, with dark text.
    colormap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    image = ax.imshow(accuracy, cmap=colormap, vmin=0, vmax=100, aspect="auto")
    fig.colorbar(image, ax=ax, label="Test accuracy (%)")
    for (i, j), value in np.ndenumerate(accuracy):
        text = missing.get((i, j), "") if np.isnan(value) else f"{value:.1f}"
        color = "black" if np.isnan(value) or value >= 60 else "white"
        ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_xticks(range(len(rates)), [f"{lr:g}" for lr in rates])
    ax.set_yticks(
        range(len(sizes)),
        [f"{b}  ({iterations[b]} it/epoch)" if iterations.get(b) else str(b) for b in sizes],
    )
    ax.set(
        xlabel="Learning rate per 128 images (the run uses lr x batch / 128)",
        ylabel="Batch size (iterations per epoch)",
        title=study_figures.quick_mark("Final test accuracy (%) over the grid", results),
    )
    fig.tight_layout()
    path = out / "grid.png"
    study_figures.save_figure(fig, path)
    return [path]


STUDY = sweep.Study(
    name="hyperparams",
    title="Batch size x learning rate (ResNet-20, SGD, 100 epochs)",
    base_config="configs/resnet20.py",
    overrides={"num_steps": 0, "num_epochs": 100},
    arms=arms,
    columns=columns,
    figures=grid_figure,
    full_command="python -m experiments.hyperparams --data_dir ~/tensorflow_datasets",
    note="Every arm trains the same number of epochs; iterations_per_epoch = training images // "
    "batch_size, and lr_used is the rate the run used (learning_rate per 128 images, scaled "
    "linearly with the batch).",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
