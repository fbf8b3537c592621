"""Datasets as host uint8 arrays, and the deterministic batch iterators over them.

`load` reads a whole dataset into memory once: a tfds image-classification dataset by name
(`cifar10`, `cifar100`, `svhn_cropped`, ...) or an image folder (`folder:/path`). Training then
needs no input pipeline: `train_batches` gathers each batch from a permutation that depends only
on (seed, epoch), so a resumed run sees exactly the batches it would have seen, and
`eval_batches` pads the last batch and marks the real examples with a mask.

A tfds dataset is prepared and read by tfds_data.py, which imports TensorFlow only then: importing
this module does not import it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import jax
import numpy as np
from PIL import Image, ImageMode

from resnet_jax import tfds_data, transforms
from resnet_jax.data_types import FOLDER_PREFIX, Split, check_class_count
from resnet_jax.errors import DataError

PIPELINES = ("auto", "memory", "stream")  # config dataset.pipeline; stream mode is stream.py
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_LAYOUT = (
    "path/train/<class>/*.png|jpg|jpeg and path/test/<class>/... (and optionally "
    "path/val/<class>/...), one subfolder per class"
)

Batch = dict[str, np.ndarray]
Stats = tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std), in [0, 1] units
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train, optional validation and test splits of one dataset, and its class names."""

    train: Split
    val: Split | None
    test: Split
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image in every split."""
        return self.train.images.shape[1:]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Which dataset to read and how (what both pipelines take): a tfds name or
    `folder:/path`, tfds' data directory (None: its default), the square size to resize or crop
    to (None: as stored), the fraction of train carved out as validation (seeded by `seed`), and
    whether a manually downloaded tfds archive is checked against tfds' sha256."""

    name: str
    data_dir: str | None = None
    image_size: int | None = None
    val_fraction: float = 0.0
    seed: int = 0
    verify_checksums: bool = True


# How a photo of any size becomes a model input (predict, export): memory mode resizes it (as
# folders are resized on load); stream mode takes its evaluation view (transforms.eval_crop).
IMAGE_FITS = ("resize", "eval_crop")


class Batches(Protocol):
    """Where a run's batches come from, whichever the pipeline: `MemoryBatches` (every split in
    host memory) or `stream.StreamBatches` (read and decoded while training). The loop, the
    compiled steps and evaluation only see this."""

    class_names: list[str]
    image_shape: tuple[int, int, int]  # (H, W, C) of every image delivered
    split_sizes: dict[str, int]  # examples of "train", "test" and, if there is one, "val"
    skipped_files: dict[str, str]  # unreadable file -> why, skipped so far (stream mode)
    image_fit: str  # how an image of another size is fitted to image_shape: one of IMAGE_FITS
    pipeline: str  # "memory" or "stream": the batches differ, so a run keeps its pipeline

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This process's share of each batch of `epoch` from `start_step` on (`train_batches`)."""
        ...

    def eval_batches(self, split: str) -> Iterator[Batch]:
        """This process's share of each padded, masked batch of a split (`eval_batches`)."""
        ...

    def channel_stats(self) -> Stats:
        """The train split's per-channel mean and std (`channel_stats`), the same on every
        process: over every image in memory mode, over a seeded sample in stream mode."""
        ...


class MemoryBatches:
    """`Batches` over a `Dataset` in host memory: `train_batches` and `eval_batches` per process."""

    def __init__(self, dataset: Dataset, batch_size: int, eval_batch_size: int, seed: int):
        self.dataset, self.batch_size, self.eval_batch_size, self.seed = (
            dataset, batch_size, eval_batch_size, seed,
        )  # fmt: skip
        self.class_names = dataset.class_names
        self.image_shape = dataset.image_shape
        self.split_sizes = {name: len(split) for name, split in self._splits().items()}
        self.skipped_files: dict[str, str] = {}  # every image was read on load
        self.image_fit = "resize"  # as image folders are resized on load
        self.pipeline = "memory"

    def _splits(self) -> dict[str, Split]:
        splits = {"train": self.dataset.train, "val": self.dataset.val, "test": self.dataset.test}
        return {name: split for name, split in splits.items() if split is not None}

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        return train_batches(
            self.dataset.train, self.batch_size, seed=self.seed, epoch=epoch,
            start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )  # fmt: skip

    def eval_batches(self, split: str) -> Iterator[Batch]:
        return eval_batches(
            self._splits()[split], self.eval_batch_size, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )  # fmt: skip

    def channel_stats(self) -> Stats:
        images = self.dataset.train.images
        # In chunks: counting one channel of the whole split at once would copy all of it.
        return channel_stats(images[i : i + 1024] for i in range(0, len(images), 1024))


def load(
    name: str,
    data_dir: str | None = None,
    *,
    image_size: int | None = None,
    val_fraction: float = 0.0,
    seed: int = 0,
    verify_checksums: bool = True,
) -> Dataset:
    """Loads every split of a dataset into host memory as uint8 arrays.

    Args:
      name: a tfds image-classification dataset (`cifar10`, `cifar100`, `svhn_cropped`,
        `fashion_mnist`, ...; anything with "image" and "label" features, at least two classes
        and "train" and "test" splits), or `folder:/path` for an image folder laid out as
        `FOLDER_LAYOUT` says. A folder's class names are its train/ subfolder names, sorted; its
        images are read as gray (one channel) when all of them are, else as RGB
        (`folder_channels`). A tfds dataset's images have the channels it declares.
      data_dir: tfds' data directory (default `~/tensorflow_datasets`, or $TFDS_DATA_DIR). A tfds
        dataset is downloaded and prepared there once. Offline, put the dataset's archive in
        `<data_dir>/downloads/manual/` (for CIFAR-10, `cifar-10-binary.tar.gz`). Unused for
        folders.
      image_size: resize every image once, on load, to image_size x image_size (bilinear, aspect
        ratio not kept). None keeps the native size; a folder's images must then all have one size.
        To upscale a small dataset for a big network, resizing on the device (augment's
        `resize_to`) saves host memory.
      val_fraction: carve a validation split of this fraction out of train, stratified by class
        and seeded by `seed`: each class gives round-half-up(val_fraction * its count) examples.
        Ignored when the dataset has its own validation split (tfds "validation" or a folder's
        val/), which is used instead.
      seed: seeds the validation carve.
      verify_checksums: check a tfds archive found in the manual directory against the sha256 that
        tfds records for it. False accepts a re-packed archive as it is. Fresh downloads are
        always checked, and a dataset that is already prepared is not read again.

    Raises:
      DataError: unknown dataset, data missing and no network, checksum mismatch, unreadable
        image, wrong folder layout, or a bad argument.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(
            f"val_fraction must be in [0, 1), got {val_fraction}: it is the fraction of "
            "the training examples set aside for validation (0 for none)."
        )
    if name.startswith(FOLDER_PREFIX):
        path = Path(name.removeprefix(FOLDER_PREFIX)).expanduser()
        splits, class_names = _load_folder(path, image_size)
    else:
        # A "~/..." from a flag is not expanded by the shell after "=", nor by tfds.
        data_dir = str(Path(data_dir).expanduser()) if data_dir else data_dir
        splits, class_names = tfds_data.load_tfds(name, data_dir, image_size, verify_checksums)

    train, val = splits["train"], splits.get("val")
    if val is not None and val_fraction > 0:
        log.info("%s has its own validation split; val_fraction=%s is ignored.", name, val_fraction)
    elif val_fraction > 0:
        train, val = _carve_validation(train, val_fraction, seed)
    for split_name, split in splits.items():
        if split.images.shape[1:] != train.images.shape[1:]:
            raise DataError(
                f"The {split_name} images of {name} are {split.images.shape[1:]} but "
                f"the train images are {train.images.shape[1:]}: pass image_size "
                "(config dataset.image_size) to resize them all to one size."
            )
    return Dataset(train=train, val=val, test=splits["test"], class_names=class_names)


def channel_stats(images: Iterable[np.ndarray]) -> Stats:
    """Per-channel mean and (population) standard deviation, in [0, 1] units, of the pixels of
    uint8 images given as arrays (..., H, W, C): batches or single images. Exact, from counts of
    each of the 256 values in each channel, so the same pixels give the same figures in any
    order. A DataError if there is no pixel, or a channel has one value only (no spread to divide
    by)."""
    counts = 0
    for batch in images:
        flat = batch.reshape(-1, batch.shape[-1])
        counts = counts + np.stack([np.bincount(column, minlength=256) for column in flat.T])
    if np.sum(counts) == 0:
        raise DataError("No readable train image to measure the normalization statistics on.")
    values = np.arange(256) / 255.0
    pixels = counts.sum(axis=1)
    mean = counts @ values / pixels
    std = np.sqrt(np.maximum(counts @ values**2 / pixels - mean**2, 0.0))
    if not np.all(std > 0):
        raise DataError(
            f"Every train pixel has one value in channel(s) {np.flatnonzero(std == 0).tolist()} "
            f"({np.round(mean * 255).tolist()} of 255), so the images carry nothing to learn and "
            "their spread to normalize by is 0: check the dataset."
        )
    return tuple(mean.tolist()), tuple(std.tolist())


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full batches in one epoch; the remainder is dropped."""
    assert 0 < global_batch_size <= num_examples, (global_batch_size, num_examples)
    return num_examples // global_batch_size


def train_batches(
    split: Split,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
    """The batches of one training epoch: {"image": uint8 (B, H, W, C), "label": int32 (B,)}.

    The order is a permutation drawn from (seed, epoch) alone, the same on every process, and the
    last partial batch is dropped. `start_step` skips the epoch's first batches without gathering
    them, to resume mid-epoch. Each process gets its contiguous slice of B = global_batch_size //
    process_count examples of every global batch.
    """
    indices = train_batch_indices(
        len(split), global_batch_size, seed=seed, epoch=epoch, start_step=start_step,
        process_index=process_index, process_count=process_count,
    )  # fmt: skip
    return (_gather(split, batch_indices) for batch_indices in indices)


def train_batch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """The example indices of this process's batches from `start_step` to the end of `epoch`:
    int (steps, global_batch_size // process_count), as `train_batches` (and stream mode) use
    them."""
    local_size = _local_batch_size(global_batch_size, process_index, process_count)
    num_steps = steps_per_epoch(num_examples, global_batch_size)
    if not 0 <= start_step <= num_steps:
        raise ValueError(f"start_step must be in [0, {num_steps}], got {start_step}")
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    global_batches = order[: num_steps * global_batch_size].reshape(num_steps, global_batch_size)
    mine = slice(process_index * local_size, (process_index + 1) * local_size)
    return global_batches[start_step:, mine]


def eval_batches(
    split: Split, global_batch_size: int, *, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """Every example once, in order: {"image", "label", "mask": bool (B,)}.

    The last global batch is padded to full size by repeating the split's last example; "mask" is
    False on the padding. Every process yields the same number of batches, each its contiguous
    slice of B = global_batch_size // process_count examples of every global batch.
    """
    indices, masks = eval_batch_indices(len(split), global_batch_size, process_index, process_count)
    return (
        {**_gather(split, batch_indices), "mask": mask}
        for batch_indices, mask in zip(indices, masks, strict=True)
    )


def eval_batch_indices(
    num_examples: int, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """This process's evaluation batches as example indices and masks, both (batches, B), as
    `eval_batches` (and stream mode) use them: padding repeats the last example, masked False."""
    local_size = _local_batch_size(global_batch_size, process_index, process_count)
    num_batches = -(-num_examples // global_batch_size)
    positions = np.arange(num_batches * global_batch_size).reshape(num_batches, global_batch_size)
    positions = positions[:, process_index * local_size : (process_index + 1) * local_size]
    return np.minimum(positions, num_examples - 1), positions < num_examples


def _gather(split: Split, indices: np.ndarray) -> Batch:
    return {"image": split.images[indices], "label": split.labels[indices]}


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    assert global_batch_size > 0 and global_batch_size % process_count == 0, global_batch_size
    assert 0 <= process_index < process_count, (process_index, process_count)
    return global_batch_size // process_count


def _carve_validation(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    is_val = validation_mask(train.labels, fraction, seed)
    return train.take(~is_val), train.take(is_val)


def validation_mask(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which training examples form the validation split: a stratified, seeded carve (both parts
    keep train's order). Stream mode gives a tfds split one label (it reads none): a plain carve."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(np.floor(fraction * len(members) + 0.5))  # round half up, unlike round()
        is_val[rng.choice(members, size=count, replace=False)] = True
    if not is_val.any():
        raise DataError(
            f"val_fraction={fraction} of {len(labels)} training examples rounds to an "
            "empty validation split: raise val_fraction, or set it to 0 for none."
        )
    return is_val


# --- image folders ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderSplit:
    """One split of an image folder, listed but not read: image paths and their int32 labels."""

    paths: list[Path]
    labels: np.ndarray


def list_folder(root: Path) -> tuple[dict[str, FolderSplit], list[str]]:
    """The splits ("train", "test", optionally "val") of an image folder and its class names
    (train/'s subfolders, sorted), without reading an image.

    Raises DataError for a layout other than FOLDER_LAYOUT, a single class, a split without
    images, an empty train/ class folder or a class test/ lacks, each with its fix.
    """
    class_names = _class_dir_names(root / "train")
    if not class_names or not (root / "test").is_dir():
        raise DataError(
            f"The image folder {root} needs train/ and test/ subfolders: {FOLDER_LAYOUT}."
        )
    check_class_count(
        len(class_names), f"The image folder {root} ({class_names[0]})",
        f"Add a subfolder of images for each other class to train/ and test/: {FOLDER_LAYOUT}.",
    )  # fmt: skip
    splits = {
        split: _list_folder_split(root / split, class_names)
        for split in ("train", "val", "test")
        if (root / split).is_dir()
    }
    present = {name: set(splits[name].labels.tolist()) for name in ("train", "test")}
    empty = [name for i, name in enumerate(class_names) if i not in present["train"]]
    if empty:
        raise DataError(
            f"The class folder{'s' if len(empty) > 1 else ''} "
            f"{', '.join(str(root / 'train' / name) for name in empty)} hold no "
            ".png/.jpg/.jpeg images: a class without training images cannot be learned. Add "
            "images to it, or remove the folder (from test/ and val/ too) to drop the class."
        )
    untested = [name for i, name in enumerate(class_names) if i not in present["test"]]
    if untested:
        raise DataError(
            f"test/ in {root} has no images of the class{'es' if len(untested) > 1 else ''} "
            f"{', '.join(untested)}, which train/ has: the test results would not measure "
            "them. Add test images in a subfolder of the same name (test/<class>/), or remove "
            "the class from train/."
        )
    return splits, class_names


def folder_channels(listing: dict[str, FolderSplit]) -> int:
    """The channels an image folder is read with: 1 (gray, PIL mode L) when every image in it
    is single-channel (modes 1, L, LA, I, I;16, F), else 3 (RGB). One colour or palette image
    makes the whole folder RGB, which keeps an RGB folder as it always was read. Reads only
    headers and stops at the first colour image, so an RGB folder costs one header."""
    for split in listing.values():
        for path in split.paths:
            try:
                with Image.open(path) as image:
                    gray = ImageMode.getmode(image.mode).basemode == "L"
            except transforms.UNREADABLE:
                continue  # memory mode names it when it reads it; stream mode skips it
            if not gray:
                return 3
    return 1


def _load_folder(root: Path, image_size: int | None) -> tuple[dict[str, Split], list[str]]:
    listing, class_names = list_folder(root)
    mode = transforms.MODES[folder_channels(listing)]
    splits = {
        name: _read_folder_split(root / name, split, image_size, mode)
        for name, split in listing.items()
    }
    return splits, class_names


def _class_dir_names(split_dir: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, ...) are tool clutter, not classes.
    return sorted(d.name for d in split_dir.glob("*/") if not d.name.startswith("."))


def _list_folder_split(split_dir: Path, class_names: list[str]) -> FolderSplit:
    split_classes = _class_dir_names(split_dir)
    unknown = [name for name in split_classes if name not in class_names]
    if unknown:
        raise DataError(
            f"{split_dir} has classes that train/ has not: {', '.join(unknown)}. Every "
            "class needs a train/ subfolder; add it or remove these."
        )
    paths, labels = [], []
    for name in split_classes:
        files = sorted(
            p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
        )
        paths += files
        labels += [class_names.index(name)] * len(files)
    if not paths:
        raise DataError(
            f"{split_dir} holds no .png/.jpg/.jpeg images in class subfolders. "
            f"Expected layout: {FOLDER_LAYOUT}."
        )
    return FolderSplit(paths, np.array(labels, dtype=np.int32))


def _read_folder_split(
    split_dir: Path, listing: FolderSplit, image_size: int | None, mode: str
) -> Split:
    images = [_read_image(path, image_size, mode) for path in listing.paths]
    sizes = {image.shape for image in images}
    if len(sizes) > 1:
        raise DataError(
            f"The images in {split_dir} have different sizes ({sorted(sizes)[:3]} ...): "
            "pass image_size (config dataset.image_size) to resize them to one size."
        )
    return Split(np.stack(images), listing.labels)


def _read_image(path: Path, image_size: int | None, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            converted = image.convert(mode)  # as stream mode's transforms.decode_image does
    except transforms.UNREADABLE as error:
        raise DataError(
            f"Cannot read the image {path} ({error}): replace it with a valid "
            "PNG or JPEG file, or delete it."
        ) from error
    if image_size is not None:
        converted = converted.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return transforms.to_array(converted)
