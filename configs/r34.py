"""ResNet-34 (CIFAR stem) on CIFAR-10 from scratch: aims at ~95% test accuracy (>= 94%).

r50.py's recipe. No widely cited CIFAR-10 figure exists for ResNet-34 (He et al. report none);
it typically lands within a few tenths of ResNet-18's ~95% (see r18.py) at twice the cost.
"""

import runpy
from pathlib import Path

# r50.py's recipe, from beside this file: copy the two together to use this one elsewhere.
r50 = runpy.run_path(str(Path(__file__).with_name("r50.py")))


def get_config():
    """ResNet-34 with r50.py's recipe: SGD + Nesterov, cosine with warmup, 200 epochs."""
    config = r50["get_config"]()
    config.model.name = "resnet34"
    config.schedule.warmup_epochs = 2.0  # deeper than ResNet-18: a little more warmup
    return config
