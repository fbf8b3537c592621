"""Optimizers, each at its usual learning rate: SGD with and without momentum, Adam, RMSprop, AdamW.

ResNet-20 on CIFAR-10 with one schedule (cosine to 0) and one budget (64k iterations of batch 128,
He et al.'s); rates are per 128 images:

  sgd       SGD, momentum 0.9, lr 0.1, L2 weight decay 1e-4 (He et al.)
  sgd_plain SGD without momentum (plain mini-batch SGD, which a report contrasts with momentum),
            lr 0.1, L2 weight decay 1e-4
  adam      Adam (0.9, 0.999), lr 1e-3, L2 weight decay 1e-4
  rmsprop   RMSprop (decay 0.9, no momentum), lr 1e-3, L2 weight decay 1e-4
  adamw     AdamW (0.9, 0.999), lr 1e-3, decoupled weight decay 0.05

Full scale (a GPU: five ResNet-20 runs of 64k iterations):
  python -m experiments.optimizers --data_dir ~/tensorflow_datasets
Quick check that it runs (minutes on a CPU; tiny nets, not a result):
  python -m experiments.optimizers --quick --out workdirs/optimizers_quick
Writes <out>/results.csv, results.md, curves.png and test_accuracy.png; a rerun resumes.
"""

from absl import flags

from experiments import sweep

flags.adopt_module_key_flags(sweep)  # --help lists the study flags


def arms() -> list[sweep.Arm]:
    def arm(key: str, label: str, **options: float | str) -> sweep.Arm:
        return sweep.Arm(key, label, {f"optimizer.{k}": v for k, v in options.items()})

    return [
        arm("sgd", "SGD + momentum, lr 0.1", name="sgd", learning_rate=0.1, momentum=0.9,
            weight_decay=1e-4),
        arm("sgd_plain", "SGD, no momentum, lr 0.1", name="sgd", learning_rate=0.1, momentum=0.0,
            weight_decay=1e-4),
        arm("adam", "Adam, lr 1e-3", name="adam", learning_rate=1e-3, momentum=0.0,
            weight_decay=1e-4),
        arm("rmsprop", "RMSprop, lr 1e-3", name="rmsprop", learning_rate=1e-3, momentum=0.0,
            weight_decay=1e-4),
        arm("adamw", "AdamW, lr 1e-3, wd 0.05", name="adamw", learning_rate=1e-3, momentum=0.0,
            weight_decay=0.05),
    ]  # fmt: skip


STUDY = sweep.Study(
    name="optimizers",
    title="Optimizers at their usual learning rates (ResNet-20, cosine, same budget)",
    base_config="configs/resnet20.py",
    overrides={"schedule.name": "cosine"},
    arms=arms,
    full_command="python -m experiments.optimizers --data_dir ~/tensorflow_datasets",
    note="Same schedule (cosine to 0) and budget for every arm; each optimizer at its usual "
    "learning rate (per 128 images). Momentum is SGD's; Adam and AdamW use their betas.",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
