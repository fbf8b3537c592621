"""tfds image-classification datasets: the builder, prepared once, and a split read into memory.

`prepared_tfds_builder` downloads and prepares a dataset the first time (from the network, or from
archives put in `<data_dir>/downloads/manual/`), one process at a time under a file lock, and fails
at once with a message naming the files to fetch when it can neither reach them nor find them.
Memory mode reads whole splits through TensorFlow (`load_tfds`); stream mode reads records through
the builder's data source (stream.py). TensorFlow is imported only when a split is prepared or read.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from resnet_jax import files
from resnet_jax.data_types import FOLDER_PREFIX, Split, check_class_count
from resnet_jax.errors import DataError

# Enough for a connection and an answer from the dataset's host; tfds itself waits without limit.
_NETWORK_PROBE_TIMEOUT_S = 10

log = logging.getLogger(__name__)

# Datasets whose "test" split has no public labels: their validation split is the test split.
TFDS_TEST_SPLIT = {"imagenet2012": "validation"}


def load_tfds(
    name: str, data_dir: str | None, image_size: int | None, verify_checksums: bool
) -> tuple[dict[str, Split], list[str]]:
    """Every split of a tfds dataset in memory (resized to image_size if given), and its class
    names."""
    builder = prepared_tfds_builder(name, data_dir, verify_checksums)
    if image_size is None and None in builder.info.features["image"].shape:
        raise DataError(
            f"The images of {name} differ in size: pass image_size (config dataset.image_size) "
            "to resize them all to one size."
        )
    splits = {
        ours: _read_tfds_split(builder, theirs, image_size)
        for ours, theirs in tfds_split_names(builder).items()
    }
    return splits, list(builder.info.features["label"].names)  # cifar10 reads them at preparation


def tfds_builder(name: str, data_dir: str | None, **kwargs: Any) -> Any:
    """The tfds builder of an image-classification dataset (not necessarily prepared); a
    DataError for an unknown name, a dataset without "image" and "label" features, or one whose
    labels have a single class."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir, **kwargs)
    except (ValueError, AssertionError) as error:
        reason = str(error).splitlines()[0]
        raise DataError(
            f"Unknown dataset {name!r} ({reason}). Name a tfds image-classification "
            "dataset such as 'cifar10', 'cifar100' or 'svhn_cropped' (the catalog at "
            "https://www.tensorflow.org/datasets/catalog/overview lists them all; a "
            "version or config goes as 'name/config:1.2.3'), or an image folder as "
            f"'{FOLDER_PREFIX}/path/to/folder'."
        ) from error
    features = builder.info.features  # as the code declares them; label names may come later
    if "image" not in features or "label" not in features:
        raise DataError(
            f"{name} is not an image-classification dataset (it has no 'image' and 'label' "
            "features): choose one such as 'cifar10', 'cifar100' or 'svhn_cropped'."
        )
    num_classes = getattr(features["label"], "num_classes", None)  # a ClassLabel's, known in code
    if num_classes is not None:
        check_class_count(
            num_classes, f"The tfds dataset {name}",
            "Choose a dataset with two or more classes, or an image folder of them.",
        )  # fmt: skip
    return builder


def prepared_tfds_builder(
    name: str, data_dir: str | None, verify_checksums: bool, **kwargs: Any
) -> Any:
    """The dataset's tfds builder, prepared in `data_dir` first if it is not yet (once, under a
    lock); `kwargs` go to `tfds.builder` (stream mode asks for file_format="array_record")."""
    builder = tfds_builder(name, data_dir, **kwargs)
    if not builder.is_prepared():
        _fail_if_offline(builder)
        with _preparation_lock(Path(builder.data_dir_root), builder.name):
            # Made anew: another run may have prepared the dataset while this one waited, and a
            # builder made before that would not know the prepared split names.
            builder = tfds_builder(name, data_dir, **kwargs)
            if not builder.is_prepared():
                _download_and_prepare(builder, verify_checksums)
    tfds_split_names(builder)  # split names are known only once the dataset is prepared
    return builder


def tfds_split_names(builder: Any) -> dict[str, str]:
    """Our split names ("train", "test", optionally "val") -> the prepared dataset's."""
    test = TFDS_TEST_SPLIT.get(builder.name, "test")
    available = builder.info.splits
    if "train" not in available or test not in available:
        raise DataError(
            f"{builder.name} has no train and {test} splits (it has {sorted(available)}): "
            "choose a dataset that has both, or an image folder."
        )
    names = {"train": "train", "val": "validation", "test": test}
    return {
        ours: theirs
        for ours, theirs in names.items()
        if theirs in available and not (ours == "val" and theirs == test)
    }


@contextlib.contextmanager
def _preparation_lock(data_dir_root: Path, name: str) -> Iterator[None]:
    """Hold an flock on `data_dir_root/.name.lock`, so that runs started together (a sweep)
    prepare a dataset once, one after the other, instead of each reading a half-written one."""
    try:
        data_dir_root.mkdir(parents=True, exist_ok=True)
        lock = open(data_dir_root / f".{name}.lock", "a")  # noqa: SIM115 (closed below)
    except OSError as error:
        raise DataError(
            f"Cannot prepare {name} in the data directory {data_dir_root}: "
            f"{error.strerror or error}. Pass a data_dir that can be written to (config "
            "dataset.data_dir), or prepare the dataset there once from an account that can."
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def _manual_dir(builder: Any) -> Path:
    return Path(builder.data_dir_root) / "downloads" / "manual"


def _needed_downloads(builder: Any) -> dict[str, str]:
    """URL -> file name of what tfds would download; a file of that name in the manual directory
    replaces it."""
    return {
        url: info.filename or url.rsplit("/", 1)[-1]
        for url, info in (builder.url_infos or {}).items()
        if not (info.filename and (_manual_dir(builder) / info.filename).exists())
    }


def _fail_if_offline(builder: Any) -> None:
    """A DataError at once, before anything is written, if a needed download cannot be reached."""
    manual_dir = _manual_dir(builder)
    instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
    if instructions and not (manual_dir.is_dir() and any(manual_dir.iterdir())):
        raise DataError(
            f"The {builder.name} dataset is downloaded by hand and is not prepared yet: "
            f"{' '.join(instructions.split())} Put the files in {manual_dir} (the "
            "downloads/manual/ folder of config dataset.data_dir) and run again; tfds prepares "
            "the dataset from them once."
        )
    needed = _needed_downloads(builder)
    if needed and not _reachable(next(iter(needed))):
        reason = "no network, or the server did not answer"
        raise DataError(
            _cannot_download_message(builder.name, reason, needed, _manual_dir(builder))
        )


def _download_and_prepare(builder: Any, verify_checksums: bool) -> None:
    """Prepares the dataset from the manual directory or the network."""
    import requests
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError
    from tensorflow_datasets.core.download.extractor import ExtractError

    manual_dir = _manual_dir(builder)
    tf = _tensorflow()  # before tfds imports it, so TF starts quiet and off the accelerator
    if not verify_checksums:
        _trust_manual_archives(builder, manual_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config)
    except NonMatchingChecksumError as error:
        raise DataError(
            f"A file for {builder.name} does not match the size and sha256 that tfds "
            f"records for it ({' '.join(str(error).split())}), so it is incomplete, damaged or "
            f"re-packed. If it is the file you put in {manual_dir}, download it again from the "
            "URL above, or pass verify_checksums=False (--config.dataset.verify_checksums=False) "
            "to use a re-packed archive as it is."
        ) from error
    except (requests.RequestException, tfds.download.DownloadError) as error:
        reason = " ".join(str(error).split())
        raise DataError(
            _cannot_download_message(builder.name, reason, _needed_downloads(builder), manual_dir)
        ) from error
    except (OSError, ExtractError, tf.errors.OpError) as error:  # a full or read-only data_dir
        raise files.write_error(builder.data_dir, error) from None


def _reachable(url: str) -> bool:
    """Whether the URL's server answers at all (through the same proxies that tfds would use)."""
    import requests

    # tfds' downloader retries a failed connection 10 times and has no timeout, so ask first.
    try:
        requests.head(url, timeout=_NETWORK_PROBE_TIMEOUT_S)
    except requests.RequestException:
        return False
    return True


def _cannot_download_message(
    name: str, reason: str, needed: dict[str, str], manual_dir: Path
) -> str:
    files = "; ".join(
        f"{filename} from {url} at {manual_dir / filename}" for url, filename in needed.items()
    )
    fix = (
        f"Download the files on a machine with network and put them here: {files}. Then run again."
        if needed
        else "Check the network and run again."
    )
    return f"The {name} dataset is not prepared yet and cannot be downloaded ({reason}). {fix}"


def _trust_manual_archives(builder: Any, manual_dir: Path) -> None:
    """Makes `builder` accept the files in `manual_dir` whatever their sha256.

    tfds has no switch for this (its `register_checksums` rewrites the checksum files inside the
    installed package), so the download manager the builder makes is told to expect each manual
    file's own size and sha256. Relies on tfds 4.9's private `_make_download_manager` and
    `DownloadManager._url_infos`.
    """
    from tensorflow_datasets.core.download import checksums

    trusted = {
        url: checksums.compute_url_info(manual_dir / info.filename)
        for url, info in (builder.url_infos or {}).items()
        if info.filename and (manual_dir / info.filename).exists()
    }
    make_download_manager = builder._make_download_manager

    def make_trusting_download_manager(**kwargs: Any) -> Any:
        manager = make_download_manager(**kwargs)
        # A new dict: the one tfds made is shared by every download manager in the process.
        manager._url_infos = {**manager._url_infos, **trusted}
        return manager

    builder._make_download_manager = make_trusting_download_manager


def _read_tfds_split(builder: Any, split: str, image_size: int | None) -> Split:
    tf = _tensorflow()

    def image_and_label(example: dict[str, Any]) -> tuple[Any, Any]:
        image = example["image"]
        if image_size is not None:
            image = tf.image.resize(image, (image_size, image_size), antialias=True)
            image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
        return image, example["label"]

    num_examples = builder.info.splits[split].num_examples
    dataset = builder.as_dataset(split=split).map(image_and_label, tf.data.AUTOTUNE)
    images, labels = dataset.batch(num_examples).get_single_element()
    return Split(images.numpy(), labels.numpy().astype(np.int32))


@functools.cache
def _tensorflow() -> Any:
    """Imports TensorFlow once, quiet and without the GPU (JAX owns the accelerator)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TF only decodes and resizes images here; oneDNN's start-up notice ignores the level above.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was started earlier by someone else; its devices are set by then
        log.warning("TensorFlow was already initialized; it may hold GPU memory.")
    return tf
