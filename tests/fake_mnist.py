"""A small Fashion-MNIST in the real idx format, for tests that must run offline.

`write_fake_fashion_mnist` writes the four gzipped idx files that tfds' fashion_mnist builder
downloads (train-images-idx3-ubyte.gz, ...), with the real headers (magic number, count, 28, 28)
and 28x28 gray images, so the real builder parses them from `<data_dir>/downloads/manual/`. Their
sha256 differ from the real ones: prepare with verify_checksums=False. The builder reads exactly
60,000 train and 10,000 test examples (its module's _TRAIN_EXAMPLES and _TEST_EXAMPLES, whatever
the headers say), so `prepare_fake_fashion_mnist` prepares the dataset in this process with those
counts patched to the fake's; a later run (a training subprocess) finds it prepared.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import requests

# Where Debian's dataset-fashion-mnist package puts the original files (.ci/run installs it).
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_debian_files = pytest.mark.skipif(
    not DEBIAN_FASHION_MNIST.is_dir(),
    reason=f"no {DEBIAN_FASHION_MNIST}: apt-get install -y dataset-fashion-mnist (.ci/run does)",
)
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_SIZE = 28
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FakeFashionMnist(NamedTuple):
    """What the files hold, in file order: uint8 images (N, 28, 28, 1) and int32 labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def write_fake_fashion_mnist(
    manual_dir: Path, n_train: int = 60, n_test: int = 20, seed: int = 0
) -> FakeFashionMnist:
    """Writes the four idx files into `manual_dir` and returns their contents. Every split of at
    least 10 examples holds every class; each class has its own brightness, so it can be learned."""
    rng = np.random.default_rng(seed)
    manual_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(count) % len(CLASS_NAMES)).astype(np.int32)
        noise = rng.integers(0, 128, (count, _SIZE, _SIZE))
        images = (noise + 12 * labels[:, None, None]).astype(np.uint8)
        images_file, labels_file = _FILES[split]
        header = struct.pack(">IIII", 2051, count, _SIZE, _SIZE)  # idx3: ubyte, 3 dimensions
        (manual_dir / images_file).write_bytes(gzip.compress(header + images.tobytes()))
        header = struct.pack(">II", 2049, count)  # idx1: ubyte, 1 dimension
        content = header + labels.astype(np.uint8).tobytes()
        (manual_dir / labels_file).write_bytes(gzip.compress(content))
        written[split] = (images[..., None], labels)
    return FakeFashionMnist(*written["train"], *written["test"])


def prepare_fake_fashion_mnist(
    data_dir: Path, n_train: int = 60, n_test: int = 20, file_format: str | None = None
) -> FakeFashionMnist:
    """Writes the fake files into `data_dir`'s manual directory and prepares fashion_mnist from
    them there, offline (in "array_record" files for stream mode if `file_format` says so)."""
    from tensorflow_datasets.image_classification import mnist

    from resnet_jax import tfds_data

    written = write_fake_fashion_mnist(Path(data_dir) / "downloads" / "manual", n_train, n_test)
    options = {"file_format": file_format} if file_format else {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mnist, "_TRAIN_EXAMPLES", n_train)
        patch.setattr(mnist, "_TEST_EXAMPLES", n_test)
        patch.setattr(requests.Session, "request", _refuse_network)
        tfds_data.prepared_tfds_builder("fashion_mnist", str(data_dir), False, **options)
    return written


def _refuse_network(*args, **kwargs):
    raise requests.ConnectionError("network disabled by the fake Fashion-MNIST")
