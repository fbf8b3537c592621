"""What data.py and tfds_data.py share: a split in host memory, how a dataset name points at an
image folder, and the class-count check every loader makes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from resnet_jax.errors import DataError

FOLDER_PREFIX = "folder:"  # a dataset name "folder:/path" is an image folder, not a tfds name


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split in host memory: uint8 images (N, H, W, C) and int32 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 ({len(self.images)},), got {self.labels.dtype} "
                f"{self.labels.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> Split:
        """The examples at `indices` (integer or boolean), in that order."""
        return Split(self.images[indices], self.labels[indices])


def check_class_count(num_classes: int, dataset: str, fix: str) -> None:
    """A DataError naming `dataset` and the `fix` unless it has at least two classes."""
    if num_classes < 2:
        raise DataError(
            f"{dataset} has {num_classes} class{'' if num_classes == 1 else 'es'}, and a "
            "classifier needs at least two: with one, every prediction is right, so a run would "
            f"report 100% accuracy having learned nothing. {fix}"
        )
