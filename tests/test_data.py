"""Tests for dataset loading (tfds offline, image folders) and the batch iterators."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from resnet_jax import data
from resnet_jax.errors import DataError
from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S, subprocess_env
from tests.fake_cifar import ARCHIVE_NAME, CIFAR10_CLASS_NAMES, prepare_fake_cifar10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"


def _refuse_network(*args, **kwargs):
    raise requests.ConnectionError("network disabled by the test")


@pytest.fixture
def no_network(monkeypatch):
    """Every HTTP request fails at once, as on a machine without network.

    Both the reachability probe in data.py and tfds' downloader send through requests.Session,
    and the patch sits above urllib3's retries, so nothing waits or retries.
    """
    monkeypatch.setattr(requests.Session, "request", _refuse_network)


# --- tfds, offline ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    """A data_dir with the fake archive in its manual directory, prepared once through tfds."""
    data_dir = tmp_path_factory.mktemp("tfds")
    written = prepare_fake_cifar10(data_dir, n_train_per_batch=20, n_test=30)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(requests.Session, "request", _refuse_network)
        dataset = data.load("cifar10", str(data_dir), verify_checksums=False)
    return data_dir, written, dataset


def _tfds_record_indices(data_dir: Path, split: str) -> np.ndarray:
    """For each example in tfds' stored order, its record index in the archive's files."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("cifar10", data_dir=str(data_dir))
    ids = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))["id"]  # b"train_00042"
    return np.array([int(example_id.split(b"_")[1]) for example_id in ids])


@pytest.mark.tfds
def test_fake_archive_loads_through_the_tfds_builder(fake_cifar10):
    data_dir, written, dataset = fake_cifar10
    assert dataset.class_names == list(CIFAR10_CLASS_NAMES)
    assert dataset.num_classes == 10 and dataset.image_shape == (32, 32, 3)
    assert dataset.val is None
    # tfds stores the examples shuffled by a hash of their keys (the record index), the same way
    # every time, and load keeps that order; the builder's "id" feature names each one's record.
    for name, split, images, labels in [
        ("train", dataset.train, written.train_images, written.train_labels),
        ("test", dataset.test, written.test_images, written.test_labels),
    ]:
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        records = _tfds_record_indices(data_dir, name)
        assert sorted(records) == list(range(len(labels)))
        np.testing.assert_array_equal(split.images, images[records])
        np.testing.assert_array_equal(split.labels, labels[records])


@pytest.mark.tfds
def test_a_prepared_dataset_needs_no_archive(tmp_path, no_network):
    written = prepare_fake_cifar10(tmp_path, n_train_per_batch=10, n_test=10)
    data.load("cifar10", str(tmp_path), verify_checksums=False)
    (tmp_path / "downloads" / "manual" / ARCHIVE_NAME).unlink()
    again = data.load("cifar10", str(tmp_path), image_size=16, val_fraction=0.2)
    assert again.image_shape == (16, 16, 3)
    assert len(again.train) == 40 and len(again.val) == 10  # 0.2 of each class's 5 examples
    assert sorted(again.val.labels) == sorted(set(written.train_labels))


@pytest.mark.tfds
@pytest.mark.slow  # a subprocess
def test_runs_started_together_prepare_the_dataset_once(tmp_path):
    # A sweep starts its runs at once on one data_dir: none may read a half-prepared dataset.
    prepare_fake_cifar10(tmp_path, n_train_per_batch=4, n_test=6)
    load = (
        "import sys; from resnet_jax import data; "
        "d = data.load('cifar10', sys.argv[1], verify_checksums=False); "
        "print(len(d.train), len(d.test), d.class_names[0])"
    )
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", load, str(tmp_path)],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert run.returncode == 0, stderr[-3000:]
        assert stdout.split()[-3:] == ["20", "6", "airplane"]  # after what tfds prints


@pytest.mark.tfds
def test_missing_archive_offline_says_where_to_put_it(tmp_path, no_network):
    with pytest.raises(DataError) as error:
        data.load("cifar10", str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "downloads" / "manual" / ARCHIVE_NAME) in message
    assert CIFAR10_URL in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # it failed before tfds wrote anything


@pytest.mark.tfds
def test_a_data_dir_under_home_is_expanded(tmp_path, no_network, monkeypatch):
    # "--data_dir=~/data": no shell expands a "~" after "=".
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DataError) as error:
        data.load("cifar10", "~/data")
    assert str(tmp_path / "data" / "downloads" / "manual" / ARCHIVE_NAME) in str(error.value)


@pytest.mark.tfds
def test_checksum_of_a_repacked_archive_is_verified(tmp_path, no_network):
    prepare_fake_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"sha256.*verify_checksums=False") as error:
        data.load("cifar10", str(tmp_path))
    assert "\n" not in str(error.value)


@pytest.mark.tfds
def test_a_tfds_dataset_of_one_class_is_refused_before_it_is_prepared(tmp_path):
    import tensorflow_datasets as tfds

    class OneClassImages(tfds.core.GeneratorBasedBuilder):  # registered as one_class_images
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = {"image": tfds.features.Image(shape=(8, 8, 1)),
                        "label": tfds.features.ClassLabel(names=["only"])}  # fmt: skip
            return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            raise AssertionError("the dataset is refused before it is prepared")

        def _generate_examples(self):
            raise AssertionError("the dataset is refused before it is prepared")

    with pytest.raises(DataError, match="one_class_images has 1 class, and a classifier"):
        data.load("one_class_images", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.tfds
def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DataError, match=r"'cifar10'.*folder:"):
        data.load("cifar_ten", str(tmp_path))


# --- image folders ----------------------------------------------------------------------------


def _write_images(class_dir: Path, count: int, size=(8, 8), suffix=".png", seed=0) -> None:
    class_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(class_dir / f"{i}{suffix}")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    for split, count in [("train", 5), ("test", 2)]:
        _write_images(tmp_path / split / "cat", count, suffix=".PNG")
        _write_images(tmp_path / split / "dog", count, suffix=".jpg", seed=1)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    return tmp_path


def test_image_folder(image_folder):
    dataset = data.load(f"folder:{image_folder}")
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.image_shape == (8, 8, 3)
    np.testing.assert_array_equal(dataset.train.labels, [0] * 5 + [1] * 5)
    np.testing.assert_array_equal(dataset.test.labels, [0, 0, 1, 1])
    first = np.asarray(Image.open(image_folder / "train" / "cat" / "0.PNG"))
    np.testing.assert_array_equal(dataset.train.images[0], first)


def _gray_folder(root: Path, mode: str = "L") -> Path:
    """train/ and test/ of two classes of 8x8 single-channel PNGs (`mode` "L" or 16-bit "I;16")
    whose values are 0..255."""
    rng = np.random.default_rng(0)
    for split, count in [("train", 3), ("test", 2)]:
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (8, 8)).astype(np.uint8)
                image = Image.fromarray(pixels)
                image = image.convert("I").convert(mode) if mode != "L" else image
                image.save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("mode", ["L", "I;16"])
def test_a_gray_folder_loads_with_one_channel(tmp_path, mode):
    dataset = data.load(f"folder:{_gray_folder(tmp_path, mode)}")
    assert dataset.image_shape == (8, 8, 1)
    with Image.open(tmp_path / "train" / "cat" / "0.png") as first:
        assert first.mode == mode
        # The values that the RGB conversion put in each of three channels before.
        np.testing.assert_array_equal(
            dataset.train.images[0, ..., 0], np.asarray(first.convert("RGB"))[..., 0]
        )


def test_one_colour_image_makes_a_gray_folder_rgb(tmp_path):
    root = _gray_folder(tmp_path)
    _write_images(root / "test" / "dog", 1, seed=3)  # a colour 0.png replaces a gray one
    dataset = data.load(f"folder:{root}")
    assert dataset.image_shape == (8, 8, 3)
    with Image.open(root / "train" / "cat" / "0.png") as gray:
        np.testing.assert_array_equal(dataset.train.images[0], np.asarray(gray.convert("RGB")))
    assert data.folder_channels(data.list_folder(root)[0]) == 3


def test_a_folder_of_one_class_is_refused(image_folder):
    for split in ("train", "test"):
        for path in (image_folder / split / "dog").iterdir():
            path.unlink()
        (image_folder / split / "dog").rmdir()
    with pytest.raises(DataError) as error:
        data.load(f"folder:{image_folder}")
    message = str(error.value)
    assert f"{image_folder} (cat) has 1 class" in message and "at least two" in message
    assert "Add a subfolder" in message and "\n" not in message


def test_image_folder_resizes_and_uses_its_val_split(image_folder):
    _write_images(image_folder / "val" / "dog", 3, size=(20, 12))
    dataset = data.load(f"folder:{image_folder}", image_size=16, val_fraction=0.5)
    assert dataset.image_shape == (16, 16, 3)
    assert len(dataset.train) == 10  # the folder's val/ is used, not carved from train
    np.testing.assert_array_equal(dataset.val.labels, [1, 1, 1])


def test_image_folder_of_mixed_sizes_needs_image_size(image_folder):
    _write_images(image_folder / "train" / "cat", 1, size=(9, 9), seed=2)
    with pytest.raises(DataError, match="image_size"):
        data.load(f"folder:{image_folder}")


def test_corrupt_image_is_named(image_folder):
    corrupt = image_folder / "train" / "dog" / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError) as error:
        data.load(f"folder:{image_folder}")
    assert str(corrupt) in str(error.value)


def test_test_classes_must_be_train_classes(image_folder):
    _write_images(image_folder / "test" / "bird", 1)
    with pytest.raises(DataError, match="bird"):
        data.load(f"folder:{image_folder}")


@pytest.mark.parametrize("layout", ["nothing", "no class folders", "no images"])
def test_folder_without_images_explains_the_layout(tmp_path, layout):
    if layout == "no class folders":
        (tmp_path / "train").mkdir()
        (tmp_path / "test").mkdir()
    if layout == "no images":
        (tmp_path / "train" / "cat").mkdir(parents=True)
        (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="train/<class>"):
        data.load(f"folder:{tmp_path}")


# --- validation split -------------------------------------------------------------------------


def _ids(images: np.ndarray) -> np.ndarray:
    """The index each test image was made with (all its pixels hold it)."""
    return images[:, 0, 0, 0].astype(int)


def _write_indexed_folder(root: Path, class_sizes: list[int]) -> None:
    """train/c<k>/ gets class_sizes[k] 2x2 images whose pixels are their index; test/ one each."""
    index = 0
    for k, size in enumerate(class_sizes):
        for split, count in [("train", size), ("test", 1)]:
            (root / split / f"c{k}").mkdir(parents=True)
            for _ in range(count):
                pixels = np.full((2, 2, 3), index, dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{k}" / f"{index:03d}.png")
                index += 1


def test_validation_split_is_stratified_seeded_and_disjoint(tmp_path):
    _write_indexed_folder(tmp_path, [50, 25, 5])  # 0.1 of 25 is 2.5, which rounds up to 3

    def load(seed):
        return data.load(f"folder:{tmp_path}", val_fraction=0.1, seed=seed)

    dataset = load(0)
    assert np.bincount(dataset.val.labels).tolist() == [5, 3, 1]
    assert np.bincount(dataset.train.labels).tolist() == [45, 22, 4]
    train_ids, val_ids = _ids(dataset.train.images), _ids(dataset.val.images)
    assert set(train_ids).isdisjoint(val_ids)
    assert len(set(train_ids) | set(val_ids)) == 80
    np.testing.assert_array_equal(_ids(load(0).val.images), val_ids)
    assert not np.array_equal(_ids(load(1).val.images), val_ids)


def test_validation_fraction_out_of_range(tmp_path):
    with pytest.raises(DataError, match="val_fraction"):
        data.load(f"folder:{tmp_path}", val_fraction=1.0)


# --- normalization statistics -------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_channel_stats_are_the_pixels_mean_and_std_per_channel(channels):
    images = np.random.default_rng(channels).integers(0, 256, (50, 6, 5, channels), np.uint8)
    mean, std = data.channel_stats([images])
    scaled = images.astype(np.float64) / 255
    np.testing.assert_allclose(mean, scaled.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std, scaled.std(axis=(0, 1, 2)), rtol=1e-9)
    assert len(mean) == len(std) == channels
    # Batches or single images, in any order: the same figures to the last bit.
    assert data.channel_stats(images[::-1]) == data.channel_stats([images[:7], images[7:]])
    assert data.channel_stats(images[::-1]) == (mean, std)


def test_memory_batches_measure_the_train_split_after_the_validation_carve(tmp_path):
    _write_indexed_folder(tmp_path, [10, 5])  # pixel values are the image indices
    dataset = data.load(f"folder:{tmp_path}", val_fraction=0.2)
    mean, _ = data.MemoryBatches(dataset, 4, 4, seed=0).channel_stats()
    np.testing.assert_allclose(mean, [dataset.train.images.mean() / 255] * 3, rtol=1e-12)
    uncarved = data.load(f"folder:{tmp_path}")
    assert mean != data.MemoryBatches(uncarved, 4, 4, seed=0).channel_stats()[0]


def test_a_constant_channel_has_no_spread_to_normalize_by():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[..., 1] = np.arange(16).reshape(4, 4)
    with pytest.raises(DataError, match=r"channel\(s\) \[0, 2\]"):
        data.channel_stats([images])


# --- batches ----------------------------------------------------------------------------------


def _split(labels) -> data.Split:
    """A split of tiny images, each holding its own index (see `_ids`)."""
    labels = np.asarray(labels, dtype=np.int32)
    images = np.broadcast_to(np.arange(len(labels)).reshape(-1, 1, 1, 1), (len(labels), 2, 2, 1))
    return data.Split(images.astype(np.uint8), labels)


def test_epoch_order_depends_only_on_seed_and_epoch():
    split = _split(np.arange(100) % 10)

    def order(seed, epoch):
        batches = data.train_batches(split, 10, seed=seed, epoch=epoch)
        return np.concatenate([_ids(batch["image"]) for batch in batches])

    np.testing.assert_array_equal(order(0, 3), order(0, 3))
    assert not np.array_equal(order(0, 3), order(0, 4))
    assert not np.array_equal(order(1, 3), order(0, 3))
    assert sorted(order(0, 3)) == list(range(100))


def test_train_batches_drop_the_remainder():
    split = _split(np.zeros(105))
    batches = list(data.train_batches(split, 10, seed=0, epoch=0))
    assert len(batches) == data.steps_per_epoch(105, 10) == 10
    batch = batches[0]
    assert batch["image"].shape == (10, 2, 2, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (10,) and batch["label"].dtype == np.int32


def test_start_step_resumes_the_same_batches():
    split = _split(np.arange(64) % 4)
    full = list(data.train_batches(split, 8, seed=5, epoch=2))
    resumed = list(data.train_batches(split, 8, seed=5, epoch=2, start_step=3))
    assert len(resumed) == len(full) - 3
    for expected, batch in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(batch["image"], expected["image"])
        np.testing.assert_array_equal(batch["label"], expected["label"])


def test_process_slices_reassemble_the_global_batch():
    split = _split(np.arange(64) % 4)
    global_batches = list(data.train_batches(split, 16, seed=0, epoch=0))
    per_process = [
        list(data.train_batches(split, 16, seed=0, epoch=0, process_index=i, process_count=4))
        for i in range(4)
    ]
    for step, global_batch in enumerate(global_batches):
        slices = [batches[step] for batches in per_process]
        assert all(len(s["label"]) == 4 for s in slices)
        reassembled = np.concatenate([s["image"] for s in slices])
        np.testing.assert_array_equal(reassembled, global_batch["image"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
    split = _split(np.arange(23) % 3)
    seen, batch_counts = [], set()
    for process_index in range(process_count):
        batches = list(
            data.eval_batches(split, 10, process_index=process_index, process_count=process_count)
        )
        batch_counts.add(len(batches))
        for batch in batches:
            assert batch["image"].shape[0] == batch["mask"].shape[0] == 10 // process_count
            assert batch["mask"].dtype == np.bool_
            seen += _ids(batch["image"][batch["mask"]]).tolist()
    assert batch_counts == {3}  # every process runs the same number of steps
    assert sorted(seen) == list(range(23))


def test_eval_batches_in_order_with_padding_last():
    split = _split(np.arange(23) % 3)
    batches = list(data.eval_batches(split, 10))
    np.testing.assert_array_equal(_ids(batches[0]["image"]), np.arange(10))
    np.testing.assert_array_equal(batches[-1]["mask"], [True] * 3 + [False] * 7)


def test_the_batch_functions_only_assert_the_arithmetic_the_run_checked():
    # builders.make_plan explains a batch that does not fit (test_parallel.py); below it, a
    # batch that does not divide among the processes or exceeds the data is a bug.
    split = _split(np.zeros(16))
    with pytest.raises(AssertionError):
        data.train_batches(split, 8, seed=0, epoch=0, process_count=3)
    with pytest.raises(AssertionError):
        data.eval_batches(split, 8, process_count=3)
    with pytest.raises(AssertionError):
        data.steps_per_epoch(10, 16)
