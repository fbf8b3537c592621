"""ResNet-50 from torchvision's ImageNet weights vs from scratch, same recipe and budget.

One report fine-tuned a pretrained ResNet-50 on CIFAR-10 and trained the same net from scratch
for 20 epochs: 82% vs 40% test accuracy. Here both arms share everything but the starting
weights: ResNet-50 with the ImageNet stem, CIFAR-10 images resized to 224x224 on the device,
ImageNet normalization, SGD + Nesterov (lr 0.01 per 128 images, a fine-tuning rate), cosine with
1 warmup epoch, 20 epochs. The head (10 classes) is new in both.

  pretrained   model.pretrained = --pretrained (torchvision's resnet50-0676ba61.pth, or a
               directory converted with `python -m resnet_jax.convert`)
  scratch      model.pretrained = "" (torchvision's initialization)

Everything else comes from configs/r50.py: label smoothing 0.1, weight decay 5e-4 (kernels only),
batch 128, crop + flip. The report states none of these, so they are ours, not its.

Full scale (a GPU; download the weights elsewhere first, resnet_jax never downloads them):
  curl -LO https://download.pytorch.org/models/resnet50-0676ba61.pth
  python -m experiments.pretrained_vs_scratch --pretrained resnet50-0676ba61.pth \\
      --data_dir ~/tensorflow_datasets
The report's two other figures, each in its own --out (a workdir keeps one run's length):
  # ~80% after fine-tuning for a single epoch
  python -m experiments.pretrained_vs_scratch --pretrained resnet50-0676ba61.pth \\
      --data_dir ~/tensorflow_datasets --arms=pretrained --config.num_epochs=1 \\
      --out workdirs/pretrained_1_epoch
  # ~45% from scratch even after 320 epochs
  python -m experiments.pretrained_vs_scratch --data_dir ~/tensorflow_datasets --arms=scratch \\
      --config.num_epochs=320 --out workdirs/scratch_320_epochs
Quick check that it runs (not a result): 32x32 inputs, 2 epochs of batch 32. The width stays
ResNet-50's own, because the weights fix it:
  python -m experiments.pretrained_vs_scratch --quick --pretrained resnet50-0676ba61.pth
Writes <out>/results.csv, results.md, curves.png and test_accuracy.png; a rerun resumes.
"""

from absl import flags

from experiments import sweep

sweep.define_pretrained_flag()
flags.adopt_module_key_flags(sweep)  # --help lists the study flags

ARCH = "resnet50"


def arms() -> list[sweep.Arm]:
    needed = not sweep.FLAGS.arms or "pretrained" in sweep.FLAGS.arms
    return [
        sweep.Arm(
            "pretrained",
            "ImageNet-pretrained",
            {"model.pretrained": sweep.pretrained_path(ARCH, needed)},
        ),
        sweep.Arm("scratch", "from scratch", {"model.pretrained": ""}),
    ]


STUDY = sweep.Study(
    name="pretrained_vs_scratch",
    title="ResNet-50: ImageNet-pretrained vs from scratch (CIFAR-10, 20 epochs)",
    base_config="configs/r50.py",
    overrides={
        "model.name": ARCH,
        "model.stem": "imagenet",  # the stem the weights were trained with
        "augment.resize_to": 224,
        "augment.normalization": "imagenet",  # both arms see the same inputs
        "optimizer.learning_rate": 0.01,
        "schedule.name": "cosine",
        "schedule.warmup_epochs": 1.0,
        "num_epochs": 20,
    },
    quick_overrides={"model.width": 0, "augment.resize_to": 0},
    arms=arms,
    full_command="python -m experiments.pretrained_vs_scratch --pretrained "
    "resnet50-0676ba61.pth --data_dir ~/tensorflow_datasets",
    note="Both arms: ResNet-50 (ImageNet stem, inputs resized to 224 on the device, ImageNet "
    "normalization), SGD + Nesterov at lr 0.01 per 128 images, cosine, 20 epochs; only the "
    "starting weights differ; label smoothing 0.1 and weight decay 5e-4 come from configs/r50.py. "
    "A report gives 82% (pretrained) vs 40% (scratch) after 20 epochs, about 80% after one "
    "epoch of fine-tuning, and about 45% from scratch after 320 epochs.",
)


def main(argv: list[str]) -> list[sweep.ArmResult]:
    return sweep.main(STUDY, argv)


if __name__ == "__main__":
    sweep.run_cli(STUDY)
