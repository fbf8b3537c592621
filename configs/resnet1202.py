"""He et al. (2015), §4.2: ResNet-1202 on CIFAR-10. Published: 7.93% test error (92.07% accuracy).

The paper's point (Table 6): at 1202 layers (19.4M parameters) the ResNet still optimizes, to a
training error below 0.1%, yet tests worse than ResNet-110 (6.43%): it overfits a small dataset.
resnet110.py's recipe at depth 1202, warmup included ("we use the same" as for 110). It needs
far more accelerator memory and time than ResNet-110; docs/EXPERIMENTS.md gives the figures.
"""

import runpy
from pathlib import Path

# resnet110.py's recipe, from beside this file (it reads resnet20.py): copy the three together.
resnet110 = runpy.run_path(str(Path(__file__).with_name("resnet110.py")))


def get_config():
    """ResNet-1202 with the paper's CIFAR recipe and ResNet-110's warmup."""
    config = resnet110["get_config"]()
    config.model.name = "resnet1202"
    return config
