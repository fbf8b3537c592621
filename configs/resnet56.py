"""He et al. (2015), §4.2: ResNet-56 on CIFAR-10. Published: 6.97% test error (93.03% accuracy).

resnet20.py's recipe (64k iterations, lr 0.1 /10 at 32k and 48k, all 50k training images, the
final model reported) at depth 56.
"""

import runpy
from pathlib import Path

# resnet20.py's recipe, from beside this file: copy the two together to use this one elsewhere.
resnet20 = runpy.run_path(str(Path(__file__).with_name("resnet20.py")))


def get_config():
    """ResNet-56 with the paper's CIFAR recipe."""
    config = resnet20["get_config"]()
    config.model.name = "resnet56"
    return config
