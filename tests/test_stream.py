"""Stream mode's batches, in this process (no worker processes, no training): the same order as
memory mode, a resume that reads the same batches, unreadable files skipped and counted, the
choice between memory and stream, and folder problems explained. The end-to-end runs (worker
processes, a resumed run, the ImageNet recipe) are in test_stream_training.py."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import requests
from PIL import Image

from resnet_jax import builders, config_utils, data, stream, tfds_data, transforms, workdir
from resnet_jax.errors import ConfigError, DataError
from tests.fake_cifar import CIFAR10_CLASS_NAMES, prepare_fake_cifar10
from tests.fake_mnist import prepare_fake_fashion_mnist
from tests.test_data import _refuse_network


def jpeg_folder(root: Path, layout: dict[str, dict[str, int]], size=(40, 48)) -> Path:
    """`root` with layout {split: {class: number of random JPEGs of `size` (H, W)}}."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (*size, 3), np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    return root


def stream_config(root: Path, **dataset):
    config = config_utils.default_config()
    options = dict(pipeline="stream", image_size=16, val_fraction=0.0, stream_workers=0)
    config.dataset.update(name=f"folder:{root}", **{**options, **dataset})
    config.batch_size, config.eval_batch_size = 4, 4
    return config_utils.resolve(config)


def open_stream(config) -> stream.StreamBatches:
    """The config's dataset streamed, evaluation in batches of 4."""
    spec = builders.dataset_spec(config)
    return stream.open_stream(spec, config.batch_size, 4, config.dataset.stream_workers)


def choose_pipeline(config) -> tuple[str, str]:
    options = config.dataset
    return stream.choose_pipeline(
        builders.dataset_spec(config), options.pipeline, options.memory_budget_gb
    )


@pytest.fixture
def folder(tmp_path) -> Path:
    return jpeg_folder(tmp_path / "images", {"train": {"a": 6, "b": 6}, "test": {"a": 3, "b": 2}})


def test_batches_follow_memory_modes_order_and_resume_exactly(folder):
    batches = open_stream(stream_config(folder))
    epoch = list(batches.train_batches(epoch=1))
    assert len(epoch) == 3 and all(b["image"].shape == (4, 16, 16, 3) for b in epoch)
    assert all(b["image"].dtype == np.uint8 for b in epoch)
    # The labels come in memory mode's order: the permutation of (seed, epoch).
    labels = np.repeat([0, 1], 6)
    order = data.train_batch_indices(12, 4, seed=0, epoch=1)
    np.testing.assert_array_equal([b["label"] for b in epoch], labels[order])
    resumed = list(batches.train_batches(epoch=1, start_step=1))
    for batch, again in zip(epoch[1:], resumed, strict=True):
        np.testing.assert_array_equal(batch["image"], again["image"])
    other_epoch = next(batches.train_batches(epoch=2))
    assert not np.array_equal(other_epoch["image"], epoch[0]["image"])  # new crops, new order


def test_each_process_reads_its_own_slice_of_every_batch(folder, monkeypatch):
    """Two hosts' shares, stacked, are the one-host batches: each reads only its slice."""
    batches = open_stream(stream_config(folder))
    whole = list(batches.train_batches(epoch=0))
    whole_test = list(batches.eval_batches("test"))
    shares, test_shares = [], []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append(list(batches.train_batches(epoch=0)))
        test_shares.append(list(batches.eval_batches("test")))
    for got, parts in ((whole, shares), (whole_test, test_shares)):
        assert all(len(part) == len(got) for part in parts)
        for i, batch in enumerate(got):
            assert all(len(part[i]["label"]) == len(batch["label"]) // 2 for part in parts)
            for key in batch:
                stacked = np.concatenate([part[i][key] for part in parts])
                np.testing.assert_array_equal(stacked, batch[key])


def test_reading_ahead_is_bounded_not_the_epoch(tmp_path):
    layout = {"train": {"a": 20, "b": 20}, "test": {"a": 1, "b": 1}}
    root = jpeg_folder(tmp_path / "images", layout, size=(8, 8))
    batches = open_stream(stream_config(root))
    read = set()
    source = batches.sources["train"]
    batches.sources["train"] = stream.FolderSource(ReadLog(source.paths, read), source.labels)
    epoch = batches.train_batches(epoch=0)  # 10 batches of 4
    next(epoch)
    time.sleep(0.5)  # time for the read-ahead thread to read as far as it may
    epoch.close()
    # The batch served, the read-ahead and the one the thread was reading when the buffer filled.
    assert len(read) <= 4 * (1 + stream.READ_AHEAD_BATCHES + 1)


class ReadLog(list):
    """A list of paths that adds to `read` the index of every path taken from it."""

    def __init__(self, paths, read: set):
        super().__init__(paths)
        self.read = read

    def __getitem__(self, i):
        self.read.add(i)
        return super().__getitem__(i)


def test_evaluation_is_padded_and_masked(folder):
    batches = open_stream(stream_config(folder))
    test = list(batches.eval_batches("test"))
    assert [b["mask"].tolist() for b in test] == [[True] * 4, [True, False, False, False]]
    assert [b["label"].tolist() for b in test] == [[0, 0, 0, 1], [1, 1, 1, 1]]
    again = list(batches.eval_batches("test"))  # no randomness in evaluation
    np.testing.assert_array_equal(test[0]["image"], again[0]["image"])


def test_an_unreadable_file_is_skipped_once_with_a_warning(folder, caplog):
    bad_train = folder / "train" / "a" / "2.jpg"
    bad_train.write_bytes(bad_train.read_bytes()[:100])  # truncated
    bad_test = folder / "test" / "b" / "notes.png"
    bad_test.write_text("not an image")
    batches = open_stream(stream_config(folder))
    with caplog.at_level(logging.WARNING):
        for epoch in (0, 1):
            assert len(list(batches.train_batches(epoch))) == 3  # full batches, none lost
        test = list(batches.eval_batches("test"))
    assert sorted(batches.skipped_files) == [str(bad_test), str(bad_train)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and str(bad_train) in " ".join(warnings)
    assert sum(int(b["mask"].sum()) for b in test) == 5  # the unreadable test file is masked out


@pytest.mark.parametrize("colour_image", [False, True])
def test_a_folder_streams_with_the_channels_memory_mode_reads(tmp_path, colour_image):
    root = jpeg_folder(tmp_path, {"train": {"a": 4, "b": 4}, "test": {"a": 1, "b": 1}})
    for path in root.glob("*/*/*.jpg"):
        Image.open(path).convert("L").save(path)
    if colour_image:  # one is enough to make the folder RGB, in both modes
        jpeg_folder(root, {"test": {"b": 1}})
    memory = data.load(f"folder:{root}", image_size=16)
    batches = open_stream(stream_config(root))
    channels = 3 if colour_image else 1
    assert batches.image_shape == memory.image_shape == (16, 16, channels)
    assert all(b["image"].shape == (4, 16, 16, channels) for b in batches.train_batches(0))
    test = next(batches.eval_batches("test"))["image"]
    with Image.open(root / "test" / "a" / "0.jpg") as first:
        expected = transforms.eval_crop(first.convert(transforms.MODES[channels]), 16)
    np.testing.assert_array_equal(test[0], expected)


def test_dataset_statistics_come_from_a_seeded_sample_of_train_views(folder, monkeypatch):
    batches = open_stream(stream_config(folder, val_fraction=0.25))
    train = batches.sources["train"]

    def views(paths):
        return [transforms.eval_crop(Image.open(path).convert("RGB"), 16) for path in paths]

    # Every train image (after the validation carve) when there are fewer than the sample size.
    assert batches.channel_stats() == data.channel_stats(views(train.paths))
    monkeypatch.setattr(stream, "STATS_SAMPLE_SIZE", 4)
    sample = np.random.default_rng(0).choice(len(train), 4, replace=False)  # config.seed's
    assert batches.channel_stats() == data.channel_stats(views(np.take(train.paths, sample)))
    assert batches.channel_stats() != data.channel_stats(views(train.paths))


def test_a_damaged_dataset_is_not_skipped_file_by_file(tmp_path):
    root = jpeg_folder(tmp_path, {"train": {"a": 10, "b": 10}, "test": {"a": 1, "b": 1}})
    for path in (root / "train").glob("*/*"):
        path.write_bytes(b"")
    batches = open_stream(stream_config(root))
    with pytest.raises(DataError, match="16 files in a row cannot be decoded"):
        next(batches.train_batches(0))


def test_auto_streams_what_does_not_fit_the_budget(folder):
    config = stream_config(folder, pipeline="auto")
    assert choose_pipeline(config)[0] == "memory"
    config.dataset.memory_budget_gb = 12 * 16 * 16 * 3 / 1e9 * 0.99  # just under 12 crops
    pipeline, why = choose_pipeline(config)
    assert pipeline == "stream" and "12 images of 16x16x3" in why and "exceeds" in why
    config.dataset.image_size = 0  # memory mode would keep the files' 40x48
    assert "12 images of 40x48x3" in choose_pipeline(config)[1]
    with pytest.raises(ConfigError, match=r"dataset\.image_size"):
        builders.load_batches(config)


@pytest.mark.parametrize(
    ("layout", "fragments"),
    [
        ({"train": {"a": 2, "b": 0}, "test": {"a": 1}}, ["train/b hold no", "remove the folder"]),
        ({"train": {"a": 2, "b": 2}, "test": {"a": 1}}, ["no images of the class b", "test/<"]),
    ],
)
def test_folder_problems_are_explained(tmp_path, layout, fragments):
    root = jpeg_folder(tmp_path, layout)
    with pytest.raises(DataError) as error:
        open_stream(stream_config(root))
    for fragment in fragments:
        assert fragment in str(error.value)


@pytest.mark.tfds
def test_imagenet_names_the_archives_to_download_by_hand(tmp_path):
    with pytest.raises(DataError) as error:
        tfds_data.prepared_tfds_builder("imagenet2012", str(tmp_path), verify_checksums=True)
    message = str(error.value)
    for fragment in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "downloads/manual"):
        assert fragment in message


@pytest.mark.tfds
def test_a_tfds_dataset_streams_from_its_array_record_files(tmp_path, monkeypatch):
    written = prepare_fake_cifar10(tmp_path, n_train_per_batch=4, n_test=10)
    monkeypatch.setattr(requests.Session, "request", _refuse_network)
    config = config_utils.default_config()
    config.dataset.update(
        name="cifar10", data_dir=str(tmp_path), verify_checksums=False, pipeline="stream",
        image_size=32, val_fraction=0.0, stream_workers=0,
    )  # fmt: skip
    config.batch_size, config.eval_batch_size = 4, 4
    batches = open_stream(config_utils.resolve(config))
    assert batches.split_sizes == {"train": 20, "test": 10}
    assert list(batches.class_names) == list(CIFAR10_CLASS_NAMES)
    assert any(tmp_path.glob("cifar10/*/*.array_record*"))

    train = list(batches.train_batches(epoch=0))
    assert len(train) == 5 and all(b["image"].shape == (4, 32, 32, 3) for b in train)
    # Every test image once, as evaluation views it (Resize + CenterCrop of the stored PNG).
    test = list(batches.eval_batches("test"))
    got = sorted(
        (int(label), image.tobytes())
        for batch in test
        for image, label, real in zip(batch["image"], batch["label"], batch["mask"], strict=True)
        if real
    )
    expected = sorted(
        (int(label), transforms.eval_crop(Image.fromarray(image), 32).tobytes())
        for image, label in zip(written.test_images, written.test_labels, strict=True)
    )
    assert got == expected


@pytest.mark.tfds
def test_a_gray_tfds_dataset_streams_with_its_one_channel(tmp_path):
    written = prepare_fake_fashion_mnist(
        tmp_path, n_train=20, n_test=10, file_format="array_record"
    )
    config = config_utils.default_config()
    config.dataset.update(
        name="fashion_mnist", data_dir=str(tmp_path), verify_checksums=False, pipeline="auto",
        image_size=28, val_fraction=0.0, stream_workers=0,
    )  # fmt: skip
    config.batch_size, config.eval_batch_size = 4, 4
    config = config_utils.resolve(config)
    assert "20 images of 28x28x1" in choose_pipeline(config)[1]  # its declared channels
    config.dataset.pipeline = "stream"
    batches = open_stream(config)
    assert batches.image_shape == (28, 28, 1)
    assert all(b["image"].shape == (4, 28, 28, 1) for b in batches.train_batches(epoch=0))
    got = sorted(
        image.tobytes()
        for batch in batches.eval_batches("test")
        for image, real in zip(batch["image"], batch["mask"], strict=True)
        if real
    )
    expected = sorted(
        transforms.eval_crop(Image.fromarray(image[..., 0]), 28).tobytes()
        for image in written.test_images
    )
    assert got == expected


def test_a_run_resumes_only_in_the_pipeline_it_started_in(tmp_path):
    workdir.check_same_pipeline({"pipeline": "stream"}, "stream", tmp_path)
    workdir.check_same_pipeline({}, "memory", tmp_path)  # saved before stream mode existed
    with pytest.raises(ConfigError, match=r"--config\.dataset\.pipeline=stream"):
        workdir.check_same_pipeline({"pipeline": "stream"}, "memory", tmp_path)
    with pytest.raises(ConfigError, match=r"--config\.dataset\.pipeline=memory"):
        workdir.check_same_pipeline({}, "stream", tmp_path)
