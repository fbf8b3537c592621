"""ResNet-18 (CIFAR stem) on CIFAR-10 with the regularizers modern recipes add: aims at ~96%.

r18.py (SGD + Nesterov, cosine with warmup, label smoothing 0.1, crop + flip, 200 epochs) plus
TrivialAugmentWide (Müller & Hutter, 2021), mixup or CutMix on every batch (timm's batch mode,
switching between them with probability 0.5), and an EMA of the weights that picks the best
checkpoint and gives the test figures. Reference: mixup (Zhang et al., ICLR 2018, Table 1) reports
4.2% test error (95.8% accuracy) for PreAct ResNet-18 on CIFAR-10 with mixup alone over 200
epochs, against 5.6% without; this recipe aims at that figure or above. Not yet run at full scale
here: experiments/regularization.py measures each addition against r18.py's baseline.
"""

import runpy
from pathlib import Path

# r18.py's recipe, from beside this file: copy r18.py, r50.py and this file together to use it.
r18 = runpy.run_path(str(Path(__file__).with_name("r18.py")))


def get_config():
    """r18.py + TrivialAugmentWide, mixup/CutMix and an EMA of the weights."""
    config = r18["get_config"]()
    config.augment.policy = "trivialaugment"  # after crop + flip, as torchvision's reference
    config.augment.mixup_alpha = 1.0  # mixup's CIFAR-10 setting
    config.augment.cutmix_alpha = 1.0  # CutMix's CIFAR setting
    config.augment.mix_prob = 1.0
    config.augment.mix_switch_prob = 0.5  # half the batches CutMix, half mixup
    # ~2k-update horizon (~6 epochs of 351 steps): long enough to smooth, short enough to follow
    # the cosine schedule's last epochs.
    config.ema.decay = 0.9995
    config.ema.warmup = True
    return config
