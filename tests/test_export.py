"""Export (python -m resnet_jax.export): the artifact computes what the checkpoint does, at any
batch size, from uint8 images; a damaged or foreign directory is explained."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from resnet_jax import augment, builders, evaluate, export, predict
from tests.fake_cifar import CIFAR10_CLASS_NAMES


@pytest.fixture(scope="module")
def exported_dir(trained_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "r20"
    export.export_checkpoint(output, workdir=str(trained_run["workdir"]))
    return output


def checkpoint_logits(workdir, images: np.ndarray) -> np.ndarray:
    """The logits of the checkpoint evaluate reports, computed from the model's code."""
    run = evaluate.load_saved_run(str(workdir), None)
    model = builders.build_model(run.config, num_classes=10)
    image_shape = tuple(run.meta["image_shape"])
    preprocess, _ = builders.build_preprocess(run.config, image_shape, run.meta["normalization"])
    return np.asarray(model.apply(run.variables, preprocess(images, None), train=False))


@pytest.mark.parametrize("batch_size", [1, 5])
def test_the_export_computes_the_checkpoints_logits_from_uint8_images(
    trained_run, exported_dir, batch_size
):
    images = np.random.default_rng(batch_size).integers(0, 256, (batch_size, 32, 32, 3), np.uint8)
    exported, _ = export.load_exported(exported_dir)

    logits = np.asarray(exported.call(images))

    assert logits.shape == (batch_size, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, checkpoint_logits(trained_run["workdir"], images), atol=1e-5)


def test_the_manifest_describes_the_artifact(trained_run, exported_dir):
    manifest = json.loads((exported_dir / export.MANIFEST_FILE).read_text())
    results = json.loads((trained_run["workdir"] / "results.json").read_text())
    exported, _ = export.load_exported(exported_dir)

    assert manifest["format"] == export.FORMAT and manifest["format_version"] == 1
    assert manifest["input"] == {
        "shape": [None, 32, 32, 3], "dtype": "uint8", "layout": "NHWC RGB 0-255",
        "fit": "resize",  # a memory-mode run: photos are resized, not centre-cropped
    }  # fmt: skip
    assert manifest["normalization"] == {
        "name": "cifar10", "mean": list(augment.CIFAR10_MEAN), "std": list(augment.CIFAR10_STD)
    }  # fmt: skip
    assert manifest["jax_version"] == jax.__version__
    assert manifest["class_names"] == list(CIFAR10_CLASS_NAMES)
    assert manifest["platforms"] == ["cpu", "cuda"] == list(exported.platforms)
    assert manifest["checkpoint_step"] == results["checkpoint_step"]  # evaluate's selection
    assert str(exported.in_avals[0].shape[0]) == "batch"  # symbolic


def test_predict_from_the_export_equals_predict_from_the_checkpoint(trained_run, exported_dir):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), np.uint8) for _ in range(3)]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(exported_dir.parent / f"{index}.png"))
        predict.Image.fromarray(image).save(paths[-1])

    from_export = predict.predict_exported(paths, str(exported_dir), top_k=3)
    from_checkpoint = predict.predict(paths, workdir=str(trained_run["workdir"]), top_k=3)

    for exported_top, checkpoint_top in zip(from_export, from_checkpoint, strict=True):
        assert [name for name, _ in exported_top] == [name for name, _ in checkpoint_top]
        assert [p for _, p in exported_top] == pytest.approx([p for _, p in checkpoint_top])


def test_a_checkpoint_from_before_the_normalization_record_predicts_as_before(
    trained_run, tmp_path
):
    old = tmp_path / "old_run"
    shutil.copytree(trained_run["workdir"], old)
    for meta_file in old.glob("checkpoints/*/meta/metadata"):  # as a run saved them before
        meta = json.loads(meta_file.read_text())
        assert meta.pop("normalization")["name"] == "cifar10"
        meta_file.write_text(json.dumps(meta))
    # Its config's "auto" on RGB CIFAR-10 from scratch: CIFAR-10's statistics, as it trained with.
    assert evaluate.load_saved_run(str(old), None).normalization["name"] == "cifar10"
    test_loss = json.loads((old / "results.json").read_text())["test_loss"]
    assert evaluate.evaluate_checkpoint(str(old))["test_loss"] == pytest.approx(test_loss)
    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    predict.Image.fromarray(pixels).save(photo)
    from_old = predict.predict([str(photo)], workdir=str(old), top_k=10)
    assert from_old == predict.predict([str(photo)], workdir=str(trained_run["workdir"]), top_k=10)


def damage(directory, how: str) -> None:
    artifact, manifest = directory / export.ARTIFACT_FILE, directory / export.MANIFEST_FILE
    if how == "truncated":
        artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])
    elif how == "random bytes":
        artifact.write_bytes(np.random.default_rng(0).bytes(artifact.stat().st_size))
    elif how == "no manifest":
        manifest.unlink()
    elif how == "foreign manifest":
        manifest.write_text(json.dumps({"format": "something else"}))


@pytest.mark.parametrize(
    ("how", "explained"),
    [
        ("truncated", "is damaged: its contents"),
        ("random bytes", "is damaged: its contents"),
        ("no manifest", r"holds no manifest\.json, so it is not an export"),
        ("foreign manifest", "is not the manifest of a resnet_jax export"),
    ],
)
def test_a_damaged_or_foreign_export_is_explained(exported_dir, tmp_path, how, explained):
    copy = tmp_path / "copy"
    shutil.copytree(exported_dir, copy)
    damage(copy, how)

    with pytest.raises(export.ExportError, match=explained):
        export.load_exported(copy)


def test_a_workdir_is_not_an_export_and_an_export_never_overwrites(trained_run, exported_dir):
    with pytest.raises(export.ExportError, match="is a training run's workdir, not an export"):
        export.load_exported(trained_run["workdir"])
    with pytest.raises(export.ExportError, match="already exists"):
        export.export_checkpoint(exported_dir, workdir=str(trained_run["workdir"]))
