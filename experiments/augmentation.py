"""Data augmentation: none, random crop, horizontal flip, rotation, and all three.

ResNet-20 on CIFAR-10 with He et al.'s recipe (SGD, lr 0.1 /10 at 32k and 48k, 64k iterations);
only the training-time augmentation differs:

  none       the images as they are
  crop       zero-pad 4 pixels, random 32x32 crop (He et al.'s)
  flip       random left-right flip
  rotation   random rotation in [-15, 15] degrees
  all        crop + flip + rotation
  report     one report's pipeline as written: torchvision's RandomCrop(24, padding=4) (the net
             trains on 24x24 inputs and is tested on the 24x24 centre crop), RandomRotation by
             [0, 180] degrees (nearest, zero fill) and RandomHorizontalFlip

The crop and the rotation are this script's flags, e.g. a report's 24x24 crops resized back and
rotations up to 180 degrees: --crop_padding=0 --crop_size=24 --rotation=180 (every arm that
crops or rotates uses them; the others do neither). The report arm ignores these flags.

Full scale (a GPU: five ResNet-20 runs of 64k iterations):
  python -m experiments.augmentation --data_dir ~/tensorflow_datasets
Quick check that it runs (minutes on a CPU; tiny nets, not a result):
  python -m experiments.augmentation --quick --out workdirs/augmentation_quick
Writes <out>/results.csv, results.md, curves.png and test_accuracy.png; a rerun resumes.
"""

from absl import flags

from experiments import sweep

flags.adopt_module_key_flags(sweep)  # --help lists the study flags
flags.DEFINE_integer("crop_padding", 4, "Zero-padding (pixels) before the random crop.")
flags.DEFINE_integer(
    "crop_size", 0, "Random crop size, resized back to the image size; 0 = the image size."
)
flags.DEFINE_float("rotation", 15.0, "Random rotation in [-rotation, rotation] degrees.")
FLAGS = flags.FLAGS


def arms() -> list[sweep.Arm]:
    if FLAGS.crop_padding < 0 or FLAGS.crop_size < 0 or FLAGS.rotation <= 0:
        raise sweep.SweepError(
            f"--crop_padding and --crop_size must be >= 0 and --rotation > 0, got "
            f"{FLAGS.crop_padding}, {FLAGS.crop_size} and {FLAGS.rotation:g}."
        )
    crop_name = f"{FLAGS.crop_size}x{FLAGS.crop_size}, " if FLAGS.crop_size else ""
    crop_label = f"crop ({crop_name}pad {FLAGS.crop_padding})"
    rotation_label = f"rotation (±{FLAGS.rotation:g}°)"

    def arm(name, label, crop=False, flip=False, rotation=False, **verbatim):
        overrides = {
            "augment.crop_padding": FLAGS.crop_padding if crop else 0,
            "augment.crop_size": FLAGS.crop_size if crop else 0,
            "augment.resize_crop": True,
            "augment.flip": flip,
            "augment.rotation": FLAGS.rotation if rotation else 0.0,
            "augment.rotation_from_zero": False,
            "augment.rotation_interpolation": "bilinear",
        }
        overrides.update({f"augment.{key}": value for key, value in verbatim.items()})
        return sweep.Arm(name, label, overrides)

    return [
        arm("none", "none"),
        arm("crop", crop_label, crop=True),
        arm("flip", "flip", flip=True),
        arm("rotation", rotation_label, rotation=True),
        arm("all", "crop + flip + rotation", crop=True, flip=True, rotation=True),
        arm(
            "report", "report: 24x24 crop (pad 4), rotation 0-180° nearest, flip", flip=True,
            crop_padding=4, crop_size=24, resize_crop=False, rotation=180.0,
            rotation_from_zero=True, rotation_interpolation="nearest",
        ),
    ]  # fmt: skip


STUDY = sweep.Study(
    name="augmentation",
    title="Data augmentation (ResNet-20, He et al.'s recipe)",
    base_config="configs/resnet20.py",
    arms=arms,
    full_command="python -m experiments.augmentation --data_dir ~/tensorflow_datasets",
    note="Same net, optimizer, schedule and budget for every arm; only the training-time "
    "augmentation differs (evaluation never augments).",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
