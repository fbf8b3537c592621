"""He et al. (2015), §4.2: ResNet-110 on CIFAR-10. Published: 6.43% test error (93.57% accuracy;
best of 5 runs, mean 6.61 +- 0.16%).

resnet20.py's recipe at depth 110, with the paper's warmup: it trains at lr 0.01 until the
training error falls below 80% (about 400 iterations), then at 0.1. A constant 0.01 phase is not
one of our schedules, so a linear warmup from 0 to 0.1 over one epoch (390 iterations)
approximates it; both keep the first few hundred steps gentle.
"""

import runpy
from pathlib import Path

# resnet20.py's recipe, from beside this file: copy the two together to use this one elsewhere.
resnet20 = runpy.run_path(str(Path(__file__).with_name("resnet20.py")))


def get_config():
    """ResNet-110 with the paper's CIFAR recipe and ~400 iterations of warmup."""
    config = resnet20["get_config"]()
    config.model.name = "resnet110"
    config.schedule.warmup_epochs = 1.0  # 390 iterations ~ the paper's ~400 at lr 0.01
    return config
