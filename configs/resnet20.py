"""He et al. (2015), §4.2: ResNet-20 on CIFAR-10. Published: 8.75% test error (91.25% accuracy).

The paper's recipe: SGD with momentum 0.9, weight decay 1e-4, batch 128, learning rate 0.1 divided
by 10 at 32k and 48k iterations and stopped at 64k; 4-pixel padding, random 32x32 crops and
horizontal flips. The paper chose those 64k iterations on a 45k/5k train/validation split, then
reports the model at 64k: so this recipe trains on all 50k images and reports the final
checkpoint (--config.dataset.val_fraction=0.1 --config.results_checkpoint=best_val holds out 5k
and picks by validation instead). The one difference: images are normalized with per-channel mean
and std instead of the paper's per-pixel mean subtraction.
resnet56.py and resnet110.py change only the depth (and resnet110's warmup).
"""

from resnet_jax import base_config


def get_config():
    """ResNet-20 (option A shortcuts) for 64k iterations of SGD, /10 at 32k and 48k."""
    config = base_config.get_config()
    config.model.name = "resnet20"
    config.model.shortcut = "A"  # the paper's CIFAR nets use parameter-free identity shortcuts
    config.dataset.val_fraction = 0.0  # all 50k train; each epoch is evaluated on test
    config.results_checkpoint = "final"  # the paper reports the model at 64k iterations
    config.augment.crop_padding = 4
    config.augment.flip = True
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1  # for the paper's batch of 128
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 1e-4
    config.optimizer.decay_all_params = True  # as the paper's Torch/Caffe code: on every weight
    config.schedule.name = "step"
    # () = at 50% and 75% of the run: exactly 32k and 48k of 64k iterations, at any batch size.
    config.schedule.boundaries_epochs = ()
    config.schedule.decay_factor = 0.1
    config.schedule.warmup_epochs = 0.0
    config.batch_size = 128
    config.num_steps = 64_000  # 64k iterations = 164.1 epochs of 390 steps
    return config
