"""ResNet-18 (CIFAR stem) on CIFAR-10 from scratch: aims at ~95% test accuracy (>= 94%).

r50.py's recipe. Reference: kuangliu/pytorch-cifar lists 93.02% for ResNet-18 with a step
schedule; with cosine over 200 epochs the same net commonly reaches ~95%. The fastest of the
torchvision nets to get there.
"""

from configs import r50


def get_config():
    """ResNet-18 with r50.py's recipe: SGD + Nesterov, cosine with warmup, 200 epochs."""
    config = r50.get_config()
    config.model.name = "resnet18"
    config.schedule.warmup_epochs = 1.0  # shallow basic-block nets train stably at lr 0.1 at once
    return config
