"""Stream mode: datasets larger than memory, read, decoded and cropped while training, on grain.

`StreamBatches` serves the same batches as memory mode (`data.Batches`): {"image": uint8 (B, S, S,
C), "label"} for training and padded, masked ones for evaluation, with S = dataset.image_size and C
the channels memory mode would read (a folder's by `data.folder_channels`, a tfds dataset's as it
declares them). The sources are an image folder (listed, never read ahead) or a tfds dataset
through `tfds.data_source` (ArrayRecord files, no TensorFlow while reading). grain worker processes
decode each image and crop it the torchvision way (`transforms`): RandomResizedCrop for training,
Resize(S * 256 / 224) + CenterCrop(S) for evaluation. Flips, normalization and any other
augmentation stay on the device, in the compiled step both modes share.

Order and randomness come from (seed, epoch, example) alone: the epoch's permutation and each
process's slice of every global batch are memory mode's (`data.train_batch_indices`), and each
example's crop is drawn from its own generator. So the checkpoint's step is the whole iterator
state: a resumed run reads exactly the batches it would have read, whatever the worker count.

A file that cannot be decoded is skipped with one warning naming it: in training the next file of
the listing takes its place (the batch keeps its size and the run its place), in evaluation it is
masked out. `skipped_files` keeps them for metrics.jsonl, results.json and the checkpoints.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import signal
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from PIL import Image

from resnet_jax import data, tfds_data, transforms
from resnet_jax.errors import DataError

# A run of this many unreadable files in a row is a damaged dataset, not a bad file to skip.
MAX_CONSECUTIVE_BAD_FILES = 16
# How many train images (at most) stream mode measures augment.normalization = "dataset" on.
STATS_SAMPLE_SIZE = 1000
# Batches each process (a worker, or the main one with no workers) prepares ahead, in one
# thread: grain's default read-ahead (500 elements on 16 threads) held up to 500 batches per
# worker, so a worker's memory grew with the dataset up to that many batches.
READ_AHEAD_BATCHES = 2

log = logging.getLogger(__name__)


class InputWorkerDied(DataError):
    """A grain worker process ended without finishing its work (killed, out of memory, ...)."""


# --- Sources: (encoded image, label, name) by index ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class FolderSource:
    """An image folder's split as listed: the image at `i` is read only when asked for."""

    paths: Sequence[Path]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Path, int, str]:
        return self.paths[i], int(self.labels[i]), str(self.paths[i])


@dataclasses.dataclass(frozen=True)
class TfdsSource:
    """A prepared tfds split as a random-access ArrayRecord source with undecoded images."""

    records: Any  # tfds' data source (pickles into the workers by its file paths)
    name: str
    indices: np.ndarray | None = None  # a subset of the split (a carved validation), or all

    def __len__(self) -> int:
        return len(self.records) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        index = i if self.indices is None else int(self.indices[i])
        record = self.records[index]
        return record["image"], int(record["label"]), f"{self.name} example {index}"


# --- What the workers do to each example --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainExample:
    """Example `i` of a training epoch: decoded to `channels`, RandomResizedCrop to `size` with a
    generator of its own (seed, epoch, i); an unreadable file is replaced by the next readable
    one."""

    source: Any
    size: int
    seed: int
    epoch: int
    channels: int = 3

    def __call__(self, i: np.integer) -> dict[str, Any]:
        skipped = []
        for offset in range(MAX_CONSECUTIVE_BAD_FILES):
            encoded, label, name = self.source[(int(i) + offset) % len(self.source)]
            try:
                image = transforms.decode_image(encoded, name, transforms.MODES[self.channels])
            except transforms.BadImage as bad:
                skipped.append((name, str(bad)))
                continue
            rng = np.random.default_rng([self.seed, self.epoch, int(i)])
            crop = transforms.random_resized_crop(image, rng, self.size)
            return {"image": crop, "label": np.int32(label), "skipped": skipped}
        raise DataError(
            f"{MAX_CONSECUTIVE_BAD_FILES} files in a row cannot be decoded, from "
            f"{skipped[0][0]} to {skipped[-1][0]} ({skipped[0][1]}): the dataset is damaged "
            "or not images. Check that the files are complete PNG or JPEG images (copy or "
            "extract them again), then rerun the same command to resume."
        )


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """An evaluation example (index, real): decoded to `channels`, Resize + CenterCrop to `size`;
    padding and an unreadable file come out masked."""

    source: Any
    size: int
    channels: int = 3

    def __call__(self, index_and_real: np.ndarray) -> dict[str, Any]:
        index, real = int(index_and_real[0]), bool(index_and_real[1])
        encoded, label, name = self.source[index]
        try:
            image = transforms.decode_image(encoded, name, transforms.MODES[self.channels])
        except transforms.BadImage as bad:
            blank = np.zeros((self.size, self.size, self.channels), np.uint8)
            return {"image": blank, "label": np.int32(label), "mask": False,
                    "skipped": [(name, str(bad))]}  # fmt: skip
        crop = transforms.eval_crop(image, self.size)
        return {"image": crop, "label": np.int32(label), "mask": real, "skipped": []}


def stack_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """grain's batch function: arrays stacked, the skipped files of every example in one list."""
    batch = {
        key: np.stack([example[key] for example in examples])
        for key in examples[0]
        if key != "skipped"
    }
    batch["skipped"] = [entry for example in examples for entry in example["skipped"]]
    return batch


# --- The batches --------------------------------------------------------------------------------


class StreamBatches:
    """`data.Batches` read from `sources` ({"train", "test", optionally "val"}) while training.

    Each epoch (and each evaluation) runs one grain pipeline over this process's examples, in
    `workers` processes (0: in a thread of this one), each READ_AHEAD_BATCHES batches ahead.
    """

    def __init__(
        self,
        sources: dict[str, Any],
        class_names: list[str],
        image_size: int,
        channels: int,
        *,
        batch_size: int,
        eval_batch_size: int,
        seed: int,
        workers: int,
    ):
        self.sources, self.class_names, self.seed, self.workers = (
            sources, class_names, seed, workers,
        )  # fmt: skip
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.image_shape = (image_size, image_size, channels)
        self.split_sizes = {name: len(source) for name, source in sources.items()}
        self.skipped_files: dict[str, str] = {}
        self.image_fit = "eval_crop"  # what evaluation does to every image
        self.pipeline = "stream"

    def train_batches(self, epoch: int, start_step: int = 0) -> Iterator[data.Batch]:
        import grain

        indices = data.train_batch_indices(
            len(self.sources["train"]), self.batch_size, seed=self.seed, epoch=epoch,
            start_step=start_step, process_index=jax.process_index(),
            process_count=jax.process_count(),
        )  # fmt: skip
        size, _, channels = self.image_shape
        read = TrainExample(self.sources["train"], size, self.seed, epoch, channels)
        dataset = grain.MapDataset.source(indices.reshape(-1)).map(read)
        return self._iterate(dataset.batch(indices.shape[1], batch_fn=stack_examples))

    def eval_batches(self, split: str) -> Iterator[data.Batch]:
        import grain

        indices, real = data.eval_batch_indices(
            len(self.sources[split]), self.eval_batch_size, jax.process_index(),
            jax.process_count(),
        )  # fmt: skip
        examples = np.stack([indices.reshape(-1), real.reshape(-1)], axis=1)
        size, _, channels = self.image_shape
        read = EvalExample(self.sources[split], size, channels)
        dataset = grain.MapDataset.source(examples).map(read)
        return self._iterate(dataset.batch(indices.shape[1], batch_fn=stack_examples))

    def channel_stats(self) -> data.Stats:
        """The per-channel statistics of the evaluation views of a sample of STATS_SAMPLE_SIZE
        train images drawn by the seed, decoded here (seconds, for ImageNet's JPEGs); a file that
        cannot be read is left out."""
        train = self.sources["train"]
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(len(train), min(STATS_SAMPLE_SIZE, len(train)), replace=False))
        size, _, channels = self.image_shape
        read = EvalExample(train, size, channels)
        examples = (read(np.array([index, True])) for index in sample)
        return data.channel_stats(example["image"] for example in examples if example["mask"])

    def _iterate(self, dataset: Any) -> Iterator[data.Batch]:
        import grain
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library caller has none
            flags.FLAGS.mark_as_parsed()
        read_ahead = grain.ReadOptions(num_threads=1, prefetch_buffer_size=READ_AHEAD_BATCHES)
        pipeline = dataset.to_iter_dataset(read_ahead)
        if self.workers:
            options = grain.MultiprocessingOptions(num_workers=self.workers)
            pipeline = pipeline.mp_prefetch(options, worker_init_fn=_ignore_keyboard_interrupt)
        iterator = iter(pipeline)
        try:
            for batch in iterator:
                self._note_skipped(batch.pop("skipped"))
                yield batch
        except RuntimeError as error:
            if "Worker process" not in str(error):  # grain's words for a worker that died
                raise
            raise InputWorkerDied(
                f"An input worker process died ({' '.join(str(error).split())[:200]}), so the "
                "run stopped. A kill by the out-of-memory killer is the usual cause: lower "
                "dataset.stream_workers or the batch size, or give the host more memory. The "
                "checkpoints are kept: rerun the same command to resume from the latest."
            ) from None
        finally:
            iterator.close()
            # Dropped now, while the interpreter is whole: grain's iterators clean up in __del__.
            del iterator, pipeline
            gc.collect()

    def _note_skipped(self, skipped: Iterable[tuple[str, str]]) -> None:
        for name, why in skipped:
            if name not in self.skipped_files:
                log.warning("%s", why)
                self.skipped_files[name] = why


def _ignore_keyboard_interrupt(worker_index: int, worker_count: int) -> None:
    """Ctrl-C reaches the whole process group: the workers leave it to the main process, which
    saves a checkpoint at the next step boundary and then closes them (else a worker can die
    before the batch the main process still needs to reach that boundary)."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --- From a dataset's description ------------------------------------------------------------


def open_stream(
    dataset: data.DatasetSpec,
    batch_size: int,
    eval_batch_size: int,
    workers: int,
) -> StreamBatches:
    """The dataset as a `StreamBatches` of `batch_size` (train) and `eval_batch_size` batches,
    decoded by `workers` processes: listed (a folder) or prepared as ArrayRecord (tfds) but not
    read. Every image is cropped to dataset.image_size, which must be set."""
    assert dataset.image_size, "stream mode crops to an image size"
    if dataset.name.startswith(data.FOLDER_PREFIX):
        sources, class_names, channels = _folder_sources(dataset)
    else:
        sources, class_names, channels = _tfds_sources(dataset)
    return StreamBatches(
        sources, class_names, dataset.image_size, channels, batch_size=batch_size,
        eval_batch_size=eval_batch_size, seed=dataset.seed, workers=workers,
    )  # fmt: skip


def _folder_sources(dataset: data.DatasetSpec) -> tuple[dict[str, Any], list[str], int]:
    root = Path(dataset.name.removeprefix(data.FOLDER_PREFIX)).expanduser()
    listing, class_names = data.list_folder(root)
    channels = data.folder_channels(listing)  # memory mode's, so that both read a folder alike
    sources = {name: FolderSource(split.paths, split.labels) for name, split in listing.items()}
    if "val" not in sources and dataset.val_fraction > 0:
        train = listing["train"]
        is_val = data.validation_mask(train.labels, dataset.val_fraction, dataset.seed)
        paths = np.array(train.paths, dtype=object)
        sources["train"] = FolderSource(list(paths[~is_val]), train.labels[~is_val])
        sources["val"] = FolderSource(list(paths[is_val]), train.labels[is_val])
    return sources, class_names, channels


def _tfds_sources(dataset: data.DatasetSpec) -> tuple[dict[str, Any], list[str], int]:
    import tensorflow_datasets as tfds

    builder = tfds_data.prepared_tfds_builder(
        dataset.name, dataset.data_dir, dataset.verify_checksums, file_format="array_record"
    )
    sources = {}
    for ours, theirs in tfds_data.tfds_split_names(builder).items():
        try:
            records = builder.as_data_source(
                split=theirs, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except (ValueError, NotImplementedError, FileNotFoundError) as error:
            raise DataError(
                f"Cannot stream {dataset.name} from {builder.data_dir} "
                f"({' '.join(str(error).split())[:200]}). Stream mode reads ArrayRecord files: "
                "if the dataset was prepared as TFRecord (by memory mode), prepare it again in "
                "another dataset.data_dir, or use dataset.pipeline = 'memory'."
            ) from None
        sources[ours] = TfdsSource(records, f"{dataset.name}[{theirs}]")
    if "val" not in sources and dataset.val_fraction > 0:
        train = sources["train"]
        unlabeled = np.zeros(len(train), np.int32)  # reading the labels would read every record
        is_val = data.validation_mask(unlabeled, dataset.val_fraction, dataset.seed)
        sources["train"] = dataclasses.replace(train, indices=np.flatnonzero(~is_val))
        sources["val"] = dataclasses.replace(train, indices=np.flatnonzero(is_val))
    features = builder.info.features
    return sources, list(features["label"].names), features["image"].shape[-1]


def choose_pipeline(
    dataset: data.DatasetSpec, pipeline: str, memory_budget_gb: float
) -> tuple[str, str]:
    """Memory or stream, as `pipeline` (dataset.pipeline) says, and why. "auto" estimates the
    decoded train split (examples x H x W x C bytes, from the folder's listing and its first
    image's header, or tfds' dataset info) against `memory_budget_gb`, reading no image."""
    if pipeline != "auto":
        return pipeline, f"dataset.pipeline = {pipeline!r}"
    count, shape = _train_split_size(dataset)
    if shape is None:
        return "stream", (
            "the images differ in size and dataset.image_size is 0, so memory mode could not "
            "hold them as one array"
        )
    if count is None:
        return "memory", "the train split's size is known only once it is prepared"
    decoded = count * math.prod(shape)
    fits = decoded <= memory_budget_gb * 1e9
    return ("memory" if fits else "stream"), (
        f"the decoded train split, {count:,} images of {'x'.join(map(str, shape))} = "
        f"{decoded / 1e9:.3g} GB, {'fits' if fits else 'exceeds'} dataset.memory_budget_gb = "
        f"{memory_budget_gb:g}"
    )


def _train_split_size(
    dataset: data.DatasetSpec,
) -> tuple[int | None, tuple[int, int, int] | None]:
    """(train examples or None if unknown, (H, W, C) as memory mode would hold them or None if
    they differ in size). A folder counts 3 channels, its most: whether it is gray would take
    reading every image's header."""
    size = (dataset.image_size, dataset.image_size) if dataset.image_size else None
    if dataset.name.startswith(data.FOLDER_PREFIX):
        root = Path(dataset.name.removeprefix(data.FOLDER_PREFIX)).expanduser()
        listing, _ = data.list_folder(root)
        paths = listing["train"].paths
        if size is None:
            with Image.open(paths[0]) as first:  # reads the header only
                size = (first.height, first.width)
        return len(paths), (*size, 3)
    info = tfds_data.tfds_builder(dataset.name, dataset.data_dir).info
    shape = info.features["image"].shape
    if size is None and None not in shape[:2]:
        size = tuple(shape[:2])
    count = info.splits["train"].num_examples if "train" in info.splits else None
    return count, None if size is None else (*size, shape[-1])
