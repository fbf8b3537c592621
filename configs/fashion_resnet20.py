"""ResNet-20 on Fashion-MNIST, the published protocol. Published: 4.39% test error (95.61%).

Zhong et al., "Random Erasing Data Augmentation" (AAAI 2020), Table 1, and their code
(zhunzhong07/Random-Erasing, fashionmnist.py): He et al.'s ResNet-20 (option A shortcuts), SGD with
momentum 0.9 and weight decay 5e-4 on every weight, batch 128, learning rate 0.1 divided by 10 at
epochs 150 and 225 of 300, random 28x28 crops of the 4-pixel zero-padded images and horizontal
flips; trained on all 60k images and tested on the 10k test images (4.02% with random erasing:
add --config.augment.random_erasing=0.5 --config.augment.random_erasing_max_area=0.4). The one
difference: images are normalized with the train split's own mean and std ("dataset").

300 epochs of 468 steps is a GPU-sized run (about 3.5 hours on a 2-core CPU would be a ninth of
it); configs/fashion_resnet20_fast.py is the recipe for a CPU's budget. Offline, from Debian's
dataset-fashion-mnist package (README, "Gray datasets and normalization"):

    python -m resnet_jax.train --config configs/fashion_resnet20.py --workdir workdir/fashion \
        --config.dataset.data_dir=~/tensorflow_datasets --config.dataset.verify_checksums=False
"""

from resnet_jax import base_config


def get_config():
    """ResNet-20 for 300 epochs of SGD on Fashion-MNIST, /10 at epochs 150 and 225."""
    config = base_config.get_config()
    config.model.name = "resnet20"
    config.model.shortcut = "A"  # He et al.'s parameter-free identity shortcuts
    config.dataset.name = "fashion_mnist"
    config.dataset.val_fraction = 0.0  # all 60k train; each epoch is evaluated on test
    config.results_checkpoint = "final"  # the model after the last epoch
    config.augment.normalization = "dataset"
    config.augment.crop_padding = 4
    config.augment.flip = True
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1  # for their batch of 128
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 5e-4
    config.optimizer.decay_all_params = True  # torch's SGD weight_decay: on every parameter
    config.schedule.name = "step"
    config.schedule.boundaries_epochs = (150, 225)
    config.schedule.decay_factor = 0.1
    config.schedule.warmup_epochs = 0.0
    config.batch_size = 128
    config.num_epochs = 300
    return config
