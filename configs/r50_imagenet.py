"""ResNet-50 on ImageNet (ILSVRC-2012) from scratch, as torchvision's reference trains it: aims at
~76% top-1 on the 50k validation images.

torchvision's classification reference (references/classification/train.py, whose recipe gave
ResNet50_Weights.IMAGENET1K_V1: 76.13% top-1) and the Flax ImageNet example (76.3% after 100
epochs) agree on: ResNet-50 with the 7x7 stem, 90 epochs, SGD with momentum 0.9, 0.1 per 256
images, weight decay 1e-4 on every parameter, RandomResizedCrop(224) + flip for training and
Resize(256) + CenterCrop(224) for evaluation. As the Flax example does, it takes a cosine schedule
with 5 warmup epochs (Goyal et al.) instead of torchvision's 30/60/80 steps, and bfloat16.

ImageNet is ~190 GB as 224x224 uint8, so it streams (dataset.pipeline = "stream"): grain workers
decode and crop on the host, the device flips and normalizes. Run it with
  --config.dataset.name=imagenet2012   (tfds: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
                                        in <data_dir>/downloads/manual/, prepared once)
or --config.dataset.name=folder:/path/to/imagenet (train/<class>/*.JPEG, test/<class>/ = val).
ImageNet's test labels are not public: the validation images are the test split, every epoch is
evaluated on them, and results.json reports the final checkpoint, as the references do.
90 epochs x 5004 steps = 450k steps at batch 256.
"""

from resnet_jax import base_config


def get_config():
    """ResNet-50 (ImageNet stem), SGD momentum 0.9, cosine + 5 warmup epochs, 90 epochs, bf16."""
    config = base_config.get_config()
    config.model.name = "resnet50"
    config.model.stem = "imagenet"  # 7x7/2 conv + 3x3/2 max-pool, as torchvision
    config.dataset.name = "imagenet2012"
    config.dataset.image_size = 224  # RandomResizedCrop(224) / Resize(256) + CenterCrop(224)
    config.dataset.pipeline = "stream"  # 1.28M images do not fit in host memory
    config.dataset.val_fraction = 0.0  # the validation split is the test split (see above)
    config.augment.crop_padding = 0  # the host's RandomResizedCrop is the crop
    config.augment.flip = True  # RandomHorizontalFlip, on the device
    config.augment.normalization = "imagenet"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.05  # per 128 images = 0.1 per 256 (Goyal et al.'s rule)
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False  # torchvision's reference: plain heavy-ball momentum
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_all_params = True  # torchvision decays BatchNorm parameters too
    config.schedule.name = "cosine"
    config.schedule.warmup_epochs = 5.0
    config.half_precision = True  # bfloat16 compute
    config.batch_size = 256
    config.num_epochs = 90
    config.results_checkpoint = "final"
    config.log_every_steps = 500
    return config
