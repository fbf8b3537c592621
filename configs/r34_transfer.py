"""Pretrained ResNet-34, all layers frozen, a new two-class head: aims at ~88% test accuracy.

The recipe of one published transfer-learning report (the one experiments/transfer_frozen.py
follows): torchvision's ImageNet ResNet-34 with all layers frozen, its fc replaced by a freshly
initialized two-class head, Adam with cosine annealing for 20 epochs; it reached 88% test accuracy
on its two-class set. Only the head's 1,026 parameters train, and the frozen BatchNorm layers stay
in inference mode, so their ImageNet statistics do not move.

It needs the torchvision weights (resnet_jax never downloads them) and any two-class dataset, e.g.
an image folder (path/train/<class>/..., path/test/<class>/...):

  curl -LO https://download.pytorch.org/models/resnet34-b627a593.pth
  python -m resnet_jax.train --config configs/r34_transfer.py --workdir workdir/r34_transfer \
      --config.dataset.name=folder:/path --config.model.pretrained=resnet34-b627a593.pth

model.pretrained also takes a `python -m resnet_jax.convert` output directory. Without it the run
trains a head on a random frozen backbone, which is not this recipe.
"""

from resnet_jax import base_config


def get_config():
    """ResNet-34 from ImageNet weights, backbone frozen, Adam + cosine, 20 epochs at 224x224."""
    config = base_config.get_config()
    config.model.name = "resnet34"
    config.model.stem = "imagenet"  # the 7x7/2 stem + max-pool the weights were trained with
    config.model.freeze = "backbone"  # the report's "all layers frozen": only the new fc trains
    config.dataset.name = "horses_or_humans"  # a two-class tfds set; any folder:/path also works
    config.dataset.image_size = 224  # ImageNet's input size, resized once on load (folders vary)
    config.augment.crop_padding = 16  # random crops ~7% of 224, as 4 px is of CIFAR's 32
    config.augment.normalization = "imagenet"  # the statistics the pretrained backbone expects
    config.optimizer.name = "adam"  # the report's optimizer
    config.optimizer.learning_rate = 1e-3  # Adam's usual rate: only a fresh linear head trains
    config.optimizer.weight_decay = 0.0  # 1,026 parameters on 512 frozen features: no need
    config.schedule.name = "cosine"  # the report's cosine annealing, down to 0
    config.schedule.warmup_epochs = 0.0  # a linear head on fixed features cannot blow up
    config.label_smoothing = 0.0  # the report's plain cross-entropy
    config.batch_size = 32  # small datasets (~1k images): 32 still gives ~30 steps per epoch
    config.eval_batch_size = 128  # 224x224 images: keeps evaluation memory modest
    config.num_epochs = 20  # the report's length
    return config
