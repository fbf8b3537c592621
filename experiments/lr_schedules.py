"""Learning-rate schedules: constant, time-based, step, exponential and cosine.

One optimizer (SGD, momentum 0.9, weight decay 1e-4, peak rate 0.1 per 128 images) and one budget
(He et al.'s ResNet-20 recipe on CIFAR-10: 64k iterations of batch 128); only the schedule differs:

  constant      0.1 throughout
  time_based    0.1 / (1 + 0.05 * epoch)  (Keras' classic decay; ends near 0.01)
  step          /10 at 50% and 75% of the run (32k and 48k: the paper's)
  exponential   0.1 * 0.01^(t / T): smooth, ends at 1e-3 like the step schedule
  cosine        half a cosine from 0.1 to 0

Full scale (a GPU: five ResNet-20 runs of 64k iterations):
  python -m experiments.lr_schedules --data_dir ~/tensorflow_datasets
Quick check that it runs (minutes on a CPU; tiny nets, not a result):
  python -m experiments.lr_schedules --quick --out workdirs/lr_schedules_quick
Writes <out>/results.csv, results.md, curves.png, test_accuracy.png and schedules.png (each
arm's learning rate at every epoch's end); a rerun resumes.
"""

from pathlib import Path

from absl import flags

from experiments import study_figures, sweep

flags.adopt_module_key_flags(sweep)  # --help lists the study flags


def arms() -> list[sweep.Arm]:
    return [
        sweep.Arm("constant", "constant", {"schedule.name": "constant"}),
        sweep.Arm(
            "time_based",
            "time-based",
            {"schedule.name": "time_based", "schedule.decay_per_epoch": 0.05},
        ),
        sweep.Arm("step", "step (/10 at 50%, 75%)", {"schedule.name": "step"}),
        sweep.Arm(
            "exponential",
            "exponential",
            {"schedule.name": "exponential", "schedule.decay_rate": 0.01},
        ),
        sweep.Arm("cosine", "cosine", {"schedule.name": "cosine"}),
    ]


def schedule_figure(results: list[sweep.ArmResult], out: Path) -> list[Path]:
    """schedules.png: the learning rate each arm trained with, at the end of every epoch."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    study_figures.plot_lines(ax, results, "learning_rate")
    ax.set(
        title=study_figures.quick_mark("Learning rate at the end of each epoch", results),
        xlabel="Epoch",
        ylabel="Learning rate (as used: per batch, after scaling)",
    )
    fig.tight_layout()
    fig.subplots_adjust(right=0.8)
    path = out / "schedules.png"
    study_figures.save_figure(fig, path)
    return [path]


STUDY = sweep.Study(
    name="lr_schedules",
    title="Learning-rate schedules (ResNet-20, SGD, same budget)",
    base_config="configs/resnet20.py",
    arms=arms,
    full_command="python -m experiments.lr_schedules --data_dir ~/tensorflow_datasets",
    figures=schedule_figure,
    note="Same optimizer (SGD, momentum 0.9, peak lr 0.1) and budget for every arm; only "
    "schedule.name (and its own option) differs.",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
