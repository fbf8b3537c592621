"""A small CIFAR-10 archive in the real binary format, for tests that must run offline.

`write_fake_cifar10_archive` writes `cifar-10-binary.tar.gz` with the same member names and record
layout as the file from https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz, so the real tfds
cifar10 builder parses it. Its sha256 differs from the real one: load it with
`data.load("cifar10", data_dir, verify_checksums=False)`.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np

ARCHIVE_NAME = "cifar-10-binary.tar.gz"
CIFAR10_CLASS_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_IMAGE_SHAPE = (32, 32, 3)
_NUM_TRAIN_BATCHES = 5


class FakeCifar10(NamedTuple):
    """What the archive holds, in file order (train = data_batch_1.bin .. data_batch_5.bin)."""

    train_images: np.ndarray  # uint8 (5 * n_train_per_batch, 32, 32, 3)
    train_labels: np.ndarray  # int32
    test_images: np.ndarray
    test_labels: np.ndarray


def write_fake_cifar10_archive(
    manual_dir: Path, n_train_per_batch: int = 20, n_test: int = 20, seed: int = 0
) -> FakeCifar10:
    """Writes `manual_dir/cifar-10-binary.tar.gz` of random images and returns its contents.

    Every split of at least 10 examples holds every class. Each record is one label byte then the
    3072 image bytes in CHW order, as in the real files.
    """
    rng = np.random.default_rng(seed)
    train_batches = [_random_examples(rng, n_train_per_batch) for _ in range(_NUM_TRAIN_BATCHES)]
    test_images, test_labels = _random_examples(rng, n_test)
    members = {f"data_batch_{i}.bin": _records(*batch) for i, batch in enumerate(train_batches, 1)}
    members["test_batch.bin"] = _records(test_images, test_labels)
    members["batches.meta.txt"] = ("\n".join(CIFAR10_CLASS_NAMES) + "\n\n").encode()

    manual_dir = Path(manual_dir)
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / ARCHIVE_NAME, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
    return FakeCifar10(
        train_images=np.concatenate([images for images, _ in train_batches]),
        train_labels=np.concatenate([labels for _, labels in train_batches]),
        test_images=test_images,
        test_labels=test_labels,
    )


def prepare_fake_cifar10(
    data_dir: Path, n_train_per_batch: int = 20, n_test: int = 20, seed: int = 0
) -> FakeCifar10:
    """Puts a fake archive where `data.load("cifar10", data_dir)` looks for a manual download."""
    manual_dir = Path(data_dir) / "downloads" / "manual"
    return write_fake_cifar10_archive(manual_dir, n_train_per_batch, n_test, seed)


def _random_examples(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    images = rng.integers(0, 256, size=(count, *_IMAGE_SHAPE), dtype=np.uint8)
    # Cycling through the classes before shuffling puts every class in any 10 examples.
    labels = rng.permutation(np.arange(count) % len(CIFAR10_CLASS_NAMES)).astype(np.int32)
    return images, labels


def _records(images: np.ndarray, labels: np.ndarray) -> bytes:
    return b"".join(
        bytes([label]) + image.transpose(2, 0, 1).tobytes()
        for image, label in zip(images, labels, strict=True)
    )
