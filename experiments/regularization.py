"""Regularization: configs/r18_strong.py's additions, one at a time, against a plain baseline.

ResNet-18 (CIFAR stem) on CIFAR-10 with r18.py's recipe (SGD + Nesterov, cosine, crop + flip,
200 epochs). The baseline has no label smoothing; each arm adds one of r18_strong.py's pieces with
r18_strong.py's own values, and the last arm has them all (r18_strong.py itself):

  baseline         r18.py without label smoothing
  label_smoothing  + label smoothing
  policy           + TrivialAugmentWide (augment.policy)
  mixing           + mixup / CutMix (augment.mixup_alpha, cutmix_alpha, mix_prob, ...)
  ema              + an EMA of the weights (its test figures come from the EMA weights)
  all              everything r18_strong.py adds

The values are read from configs/r18_strong.py, so the study always measures the recipe as it is.

Full scale (a GPU: six ResNet-18 runs of 200 epochs):
  python -m experiments.regularization --data_dir ~/tensorflow_datasets
Quick check that it runs (minutes on a CPU; tiny nets, not a result):
  python -m experiments.regularization --quick --out workdirs/regularization_quick
Writes <out>/results.csv, results.md, curves.png and test_accuracy.png; a rerun resumes.
"""

import runpy
from typing import Any

from experiments import sweep
from resnet_jax import config_utils

BASELINE = "configs/r18.py"
BASELINE_OVERRIDES = {"label_smoothing": 0.0}  # r18.py smooths labels: here that is an addition
STRONG = "configs/r18_strong.py"
# r18_strong.py's additions, grouped into the arms that add them (by dotted-key prefix).
GROUPS = {
    "label_smoothing": ("+ label smoothing", ("label_smoothing",)),
    "policy": ("+ TrivialAugmentWide", ("augment.policy", "augment.randaugment_")),
    "mixing": ("+ mixup / CutMix", ("augment.mixup_", "augment.cutmix_", "augment.mix_")),
    "ema": ("+ EMA of the weights", ("ema.",)),
}


def recipe(path: str) -> dict[str, Any]:
    """A config file of the repository: its `get_config()`, flattened."""
    return config_utils.flatten(runpy.run_path(str(sweep.REPO_ROOT / path))["get_config"]())


def strong_additions() -> dict[str, Any]:
    """Every key whose value r18_strong.py sets differently from the baseline, with its value."""
    base = recipe(BASELINE) | BASELINE_OVERRIDES
    return {key: value for key, value in recipe(STRONG).items() if base.get(key) != value}


def arms() -> list[sweep.Arm]:
    additions = strong_additions()
    study_arms = [sweep.Arm("baseline", "baseline: r18.py without label smoothing", {})]
    grouped = set()
    for name, (label, prefixes) in GROUPS.items():
        keys = {k: v for k, v in additions.items() if k.startswith(prefixes)}
        if not keys:
            raise sweep.SweepError(
                f"{STRONG} no longer adds {label.removeprefix('+ ')}: remove the {name!r} group "
                "from experiments/regularization.py."
            )
        grouped.update(keys)
        study_arms.append(sweep.Arm(name, label, keys))
    ungrouped = sorted(set(additions) - grouped)
    if ungrouped:
        raise sweep.SweepError(
            f"{STRONG} changes {', '.join(ungrouped)}, which no arm of this study adds: add "
            "them to a group in experiments/regularization.py so that the study measures them."
        )
    study_arms.append(sweep.Arm("all", "all of r18_strong.py", additions))
    return study_arms


STUDY = sweep.Study(
    name="regularization",
    title="Regularization, one addition at a time (ResNet-18, CIFAR-10)",
    base_config=BASELINE,
    overrides=BASELINE_OVERRIDES,
    arms=arms,
    full_command="python -m experiments.regularization --data_dir ~/tensorflow_datasets",
    note="Same net, optimizer, schedule and budget for every arm; each arm adds one of "
    "configs/r18_strong.py's regularizers with its value there. With mixup/CutMix, train "
    "accuracy is against each image's dominant label. The EMA arms report the EMA weights.",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
