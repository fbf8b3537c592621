"""A frozen ResNet-34 backbone with a new head vs fine-tuning every layer, on two classes.

One report froze every layer of an ImageNet-pretrained ResNet-34, replaced the fc layer with a
two-class head and trained it with Adam and cosine annealing for 20 epochs: 88% test accuracy.
Both arms here start from the same torchvision weights with a new two-class head:

  frozen     model.freeze = "backbone": only the head trains (Adam, lr 1e-3)
  finetune   model.freeze = "none": every layer trains (Adam, lr 1e-4, the usual fine-tuning rate)

The data: tfds' horses_or_humans by default (1027 train / 256 test images, resized to 224x224
on load), or your own two-class folder: --dataset folder:/path with path/train/<class>/*.png and
path/test/<class>/*.png.

Full scale (a GPU; download the weights elsewhere first, resnet_jax never downloads them):
  curl -LO https://download.pytorch.org/models/resnet34-b627a593.pth
  python -m experiments.transfer_frozen --pretrained resnet34-b627a593.pth \\
      --data_dir ~/tensorflow_datasets
Quick check that it runs (not a result): 32x32 images, 2 epochs of batch 16; the width stays
ResNet-34's own, because the weights fix it:
  python -m experiments.transfer_frozen --quick --pretrained resnet34-b627a593.pth \\
      --dataset folder:/path/to/two_classes
Writes <out>/results.csv, results.md, curves.png and test_accuracy.png; a rerun resumes.
"""

from absl import flags

from experiments import sweep

sweep.define_pretrained_flag()
flags.adopt_module_key_flags(sweep)  # --help lists the study flags

ARCH = "resnet34"


def arms() -> list[sweep.Arm]:
    weights = sweep.pretrained_path(ARCH)
    return [
        sweep.Arm(
            "frozen",
            "frozen backbone, new head",
            {"model.pretrained": weights, "model.freeze": "backbone",
             "optimizer.learning_rate": 1e-3},
        ),
        sweep.Arm(
            "finetune",
            "fine-tune all layers",
            {"model.pretrained": weights, "model.freeze": "none",
             "optimizer.learning_rate": 1e-4},
        ),
    ]  # fmt: skip


STUDY = sweep.Study(
    name="transfer_frozen",
    title="ResNet-34 transfer to two classes: frozen backbone vs fine-tuning",
    base_config="configs/r34.py",
    dataset="horses_or_humans",
    overrides={
        "model.name": ARCH,
        "model.stem": "imagenet",
        "dataset.image_size": 224,
        "augment.normalization": "imagenet",
        "augment.crop_padding": 16,
        "optimizer.name": "adam",
        "optimizer.weight_decay": 0.0,
        "schedule.name": "cosine",
        "schedule.warmup_epochs": 0.0,
        "label_smoothing": 0.0,
        "batch_size": 32,
        "num_epochs": 20,
    },
    quick_overrides={
        "model.width": 0,
        "dataset.image_size": 32,
        "augment.crop_padding": 4,
        "batch_size": 16,
    },
    arms=arms,
    full_command="python -m experiments.transfer_frozen --pretrained resnet34-b627a593.pth "
    "--data_dir ~/tensorflow_datasets",
    note="Both arms start from the same ImageNet weights with a new two-class head: Adam, "
    "cosine, 20 epochs of batch 32, 224x224 inputs. The frozen arm trains the head only "
    "(lr 1e-3); the fine-tuning arm trains every layer (lr 1e-4). A report gives 88% test "
    "accuracy for the frozen ResNet-34 on its own two-class data set.",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
