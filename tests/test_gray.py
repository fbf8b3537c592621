"""Gray data end to end. A fake Fashion-MNIST (its idx files, prepared by tfds offline from the
manual directory) trains ResNet-20 through the command line with augment.normalization "auto",
which is the train split's own statistics for one channel; evaluate, predict and export reuse the
figures the checkpoint records; photos are brought to the model's channels (colour to gray, gray
to RGB); a gray image folder trains in stream mode. The real Fashion-MNIST files, where the
Debian package has installed them, check the fake's format."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import builders, checkpoint, data, evaluate, export, predict
from tests.conftest import run_module
from tests.fake_mnist import (
    CLASS_NAMES,
    DEBIAN_FASHION_MNIST,
    needs_debian_files,
    prepare_fake_fashion_mnist,
    write_fake_fashion_mnist,
)
from tests.test_stream import jpeg_folder


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    """A data_dir with the fake Fashion-MNIST prepared: 60 train, 20 test images."""
    data_dir = tmp_path_factory.mktemp("fashion_tfds")
    prepare_fake_fashion_mnist(data_dir, n_train=60, n_test=20)
    return data_dir


@pytest.fixture(scope="module")
def gray_run(fashion_dir, cache_dir, tmp_path_factory) -> dict:
    """ResNet-20 at width 4 for 10 steps of 10 on the fake, 10 of its 60 images held out."""
    workdir = tmp_path_factory.mktemp("gray_run") / "run"
    done = run_module(
        "resnet_jax.train", "--config=configs/resnet20.py", f"--workdir={workdir}",
        "--config.dataset.name=fashion_mnist", f"--config.dataset.data_dir={fashion_dir}",
        "--config.dataset.verify_checksums=False", "--config.dataset.val_fraction=0.1",
        "--config.model.width=4", "--config.batch_size=10", "--config.eval_batch_size=10",
        "--config.num_steps=10", "--config.log_every_steps=5",
        f"--config.compilation_cache_dir={cache_dir}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"workdir": workdir, "stderr": done.stderr}


def saved_meta(workdir: Path) -> dict:
    checkpoints = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    try:
        return checkpoints.meta(checkpoints.latest_step())
    finally:
        checkpoints.close()


def save_photos(directory: Path) -> dict[str, str]:
    """A colour photo of another size, and its gray (PIL L) conversion."""
    pixels = np.random.default_rng(0).integers(0, 256, (40, 36, 3), np.uint8)
    colour = Image.fromarray(pixels)
    paths = {"colour": directory / "colour.png", "gray": directory / "gray.png"}
    colour.save(paths["colour"])
    colour.convert("L").save(paths["gray"])
    return {name: str(path) for name, path in paths.items()}


@pytest.mark.tfds
def test_fashion_mnist_trains_with_its_train_splits_statistics(gray_run, fashion_dir):
    workdir, log = gray_run["workdir"], gray_run["stderr"]
    assert "Traceback" not in log
    assert "50 train / 10 val / 20 test examples, 10 classes, images 28x28x1" in log
    assert "Normalization: the train split's own per-channel mean" in log
    results = json.loads((workdir / "results.json").read_text())
    assert results["num_test_examples"] == 20 and results["class_names"] == list(CLASS_NAMES)
    meta = saved_meta(workdir)
    assert meta["image_shape"] == [28, 28, 1]
    # The statistics of the 50 images the run trained on (after the validation carve).
    train = data.load("fashion_mnist", str(fashion_dir), val_fraction=0.1).train
    assert len(train) == 50
    pixels = train.images.astype(np.float64) / 255
    assert meta["normalization"]["name"] == "dataset"
    np.testing.assert_allclose(meta["normalization"]["mean"], [pixels.mean()], rtol=1e-12)
    np.testing.assert_allclose(meta["normalization"]["std"], [pixels.std()], rtol=1e-9)


@pytest.mark.tfds
def test_evaluate_reuses_the_recorded_statistics(gray_run, monkeypatch):
    def measure(self):
        raise AssertionError("evaluate measured the data instead of reading the checkpoint")

    monkeypatch.setattr(data.MemoryBatches, "channel_stats", measure)
    results = json.loads((gray_run["workdir"] / "results.json").read_text())
    again = evaluate.evaluate_checkpoint(workdir=str(gray_run["workdir"]))
    assert again["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    assert again["confusion_matrix"] == results["confusion_matrix"]


def recorded_probabilities(workdir: Path, images: np.ndarray) -> np.ndarray:
    """The checkpoint's class probabilities of uint8 images, normalized by hand with the figures
    its meta records (no preprocessing code of the project's)."""
    run = evaluate.load_saved_run(str(workdir), None)
    stats = run.meta["normalization"]
    normalized = (images / 255 - np.array(stats["mean"])) / np.array(stats["std"])
    model = builders.build_model(run.config, len(CLASS_NAMES))
    logits = model.apply(run.variables, normalized.astype(np.float32), train=False)
    return np.asarray(jax.nn.softmax(logits))


def by_class(predictions: list[list[tuple[str, float]]]) -> np.ndarray:
    """predict's (name, probability) pairs as rows of probabilities in CLASS_NAMES order."""
    return np.array([[dict(top)[name] for name in CLASS_NAMES] for top in predictions])


@pytest.mark.tfds
def test_predict_and_export_use_the_recorded_statistics_on_any_photo(gray_run, tmp_path):
    workdir = gray_run["workdir"]
    photos = save_photos(tmp_path)
    paths = [photos["colour"], photos["gray"]]
    from_checkpoint = by_class(predict.predict(paths, workdir=str(workdir), top_k=10))
    # A colour photo is classified as its gray conversion, each resized to the run's 28x28.
    with Image.open(photos["gray"]) as gray:
        resized = np.asarray(gray.resize((28, 28), Image.Resampling.BILINEAR))[None, ..., None]
    expected = recorded_probabilities(workdir, resized)[0]
    np.testing.assert_allclose(from_checkpoint, [expected, expected], rtol=1e-4, atol=1e-6)

    output = tmp_path / "exported"
    manifest = export.export_checkpoint(output, workdir=str(workdir), platforms=["cpu"])
    assert manifest["input"]["shape"] == [None, 28, 28, 1]
    assert manifest["input"]["layout"] == "NHWC gray 0-255"
    assert manifest["normalization"] == saved_meta(workdir)["normalization"]
    from_export = by_class(predict.predict_exported(paths, str(output), top_k=10))
    np.testing.assert_allclose(from_export, from_checkpoint, rtol=1e-4, atol=1e-6)


def test_a_gray_photo_is_classified_as_rgb_by_an_rgb_model(trained_run, tmp_path):
    photos = save_photos(tmp_path)
    as_rgb = tmp_path / "gray_as_rgb.png"
    Image.open(photos["gray"]).convert("RGB").save(as_rgb)
    paths = [photos["gray"], str(as_rgb)]
    gray, rgb = predict.predict(paths, workdir=str(trained_run["workdir"]), top_k=10)
    assert gray == rgb


def test_a_gray_folder_trains_in_stream_mode(cache_dir, tmp_path):
    root = jpeg_folder(tmp_path / "images", {"train": {"a": 4, "b": 4}, "test": {"a": 2, "b": 2}})
    for path in root.glob("*/*/*.jpg"):
        Image.open(path).convert("L").save(path)
    workdir = tmp_path / "run"
    done = run_module(
        "resnet_jax.train", "--config=configs/resnet20.py", f"--workdir={workdir}",
        f"--config.dataset.name=folder:{root}", "--config.dataset.pipeline=stream",
        "--config.dataset.image_size=16", "--config.dataset.stream_workers=0",
        "--config.model.width=4", "--config.batch_size=4", "--config.eval_batch_size=4",
        "--config.num_epochs=1", "--config.log_every_steps=1",
        f"--config.compilation_cache_dir={cache_dir}",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Input pipeline: stream" in done.stderr and "images 16x16x1" in done.stderr
    meta = saved_meta(workdir)
    assert meta["image_shape"] == [16, 16, 1] and meta["normalization"]["name"] == "dataset"
    assert json.loads((workdir / "results.json").read_text())["num_test_examples"] == 4
    photos = save_photos(tmp_path)
    top = predict.predict([photos["colour"]], workdir=str(workdir), top_k=2)[0]
    assert sorted(name for name, _ in top) == ["a", "b"]


@needs_debian_files
def test_the_fake_files_have_the_real_fashion_mnist_layout(tmp_path):
    write_fake_fashion_mnist(tmp_path, n_train=30, n_test=10)
    for fake in sorted(tmp_path.iterdir()):
        real = gzip.decompress((DEBIAN_FASHION_MNIST / fake.name).read_bytes())
        fake_bytes = gzip.decompress(fake.read_bytes())
        dims = 3 if "images" in fake.name else 1
        header = struct.Struct(f">{1 + dims}I")
        real_header, fake_header = header.unpack_from(real), header.unpack_from(fake_bytes)
        assert fake_header[0] == real_header[0]  # the magic number: type and dimensions
        assert fake_header[2:] == real_header[2:]  # 28 x 28
        for content, (_, count, *shape) in ((real, real_header), (fake_bytes, fake_header)):
            assert len(content) == header.size + count * int(np.prod(shape))
