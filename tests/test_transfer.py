"""Transfer learning through the real trainer: pretrained weights, a new head, frozen stages.

The "pretrained" weights are a torchvision ResNet-18 with random weights (and BN statistics moved
off their init values), saved to .pth and converted with `python -m resnet_jax.convert`. Runs use
configs/r34_transfer.py with ResNet-18 on a two-class image folder of 24x24 PNGs, resized on the
device to 32: two steps of batch 8, seconds of compute.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flax import traverse_util

from resnet_jax import builders, checkpoint, config_utils, convert, loop, models
from resnet_jax.errors import ConfigError
from tests.conftest import REPO_ROOT, load_recipe, run_module

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

CLASSES = ("cats", "dogs")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted directory of a 1000-class torchvision ResNet-18 (random weights)."""
    directory = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(0)
    net = torchvision.models.resnet18()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # statistics unlike a fresh init's
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    pth = directory / "resnet18.pth"
    torch.save(net.state_dict(), pth)
    output = directory / "converted"
    done = run_module(
        "resnet_jax.convert", "--arch", "resnet18", "--input", str(pth), "--output", str(output)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(1000 classes)" in done.stdout
    return output


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """folder: dataset root with train/{cats,dogs} (8 each) and test/{cats,dogs} (2 each)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("two_classes")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 2)):
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 128, (28, 28, 3)) + 100 * label  # dogs are brighter
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def transfer_config(pretrained: Path, data: Path, cache_dir: Path, **model: Any):
    """configs/r34_transfer.py at test scale: ResNet-18, 24x24 images resized on device to 32."""
    config = load_recipe("r34_transfer")
    config.model.name = "resnet18"
    config.model.pretrained = str(pretrained)
    config.model.update(model)
    config.dataset.name = f"folder:{data}"
    config.dataset.image_size = 24
    config.dataset.val_fraction = 0.0
    config.augment.crop_padding = 2
    config.augment.resize_to = 32
    config.batch_size = 8
    config.eval_batch_size = 8
    config.num_epochs = 1
    config.log_every_steps = 1
    config.compilation_cache_dir = str(cache_dir)
    return config_utils.resolve(config)


def start_variables(config) -> dict[str, Any]:
    """The variables the trainer starts from: the weights loaded into its fresh init."""
    model = builders.build_model(config, num_classes=len(CLASSES))
    _, input_shape = builders.build_preprocess(
        config, (24, 24, 3), builders.named_normalization("imagenet")
    )
    return builders.pretrained_variables(config, model, input_shape)


def final_variables(workdir: Path) -> dict[str, Any]:
    checkpoints = checkpoint.Checkpoints(workdir / "checkpoints")
    try:
        return checkpoints.restore_variables(checkpoints.latest_step())
    finally:
        checkpoints.close()


def flat(variables: dict[str, Any]) -> dict[tuple[str, ...], np.ndarray]:
    """{("params", "layer1_0", "conv1", "kernel"): array, ...} over params and batch_stats."""
    return {
        path: np.asarray(value)
        for path, value in traverse_util.flatten_dict(
            {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        ).items()
    }


def stage(path: tuple[str, ...]) -> int | None:
    return models.stage_of(path[1:])


def test_a_frozen_backbone_with_a_new_head_runs_end_to_end(
    pretrained, two_classes, cache_dir, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="absl")  # absl may sit at WARNING
    config = transfer_config(pretrained, two_classes, cache_dir)
    assert config.model.freeze == "backbone" and config.optimizer.name == "adam"

    results = loop.train_and_evaluate(config, tmp_path)

    assert (tmp_path / "results.json").exists()
    assert json.loads((tmp_path / "results.json").read_text())["class_names"] == list(CLASSES)
    assert results["num_test_examples"] == 4
    # The log says what was loaded and what is new: the 1000-class head does not fit 2 classes.
    converted = flat(convert.torchvision_to_flax(pretrained, "resnet18"))
    start, final = flat(start_variables(config)), flat(final_variables(tmp_path))
    loaded = f"Loaded {len(final) - 2}/{len(final)} variables from {pretrained}"
    assert f"{loaded}; kept fresh: fc/" in caplog.text, caplog.text
    assert "input (32, 32, 3)" in caplog.text  # resized on the device
    assert start.keys() == final.keys()
    assert final["params", "fc", "kernel"].shape == (512, 2)
    assert converted["params", "fc", "kernel"].shape == (512, 1000)
    for path, value in final.items():
        if stage(path) is None:  # the head: fresh, then trained
            assert np.any(value != start[path]), path
        else:  # the backbone: loaded, and bit-identical after training (BN statistics too)
            np.testing.assert_array_equal(start[path], converted[path], err_msg=str(path))
            np.testing.assert_array_equal(value, converted[path], err_msg=str(path))


def test_rgb_weights_start_a_gray_run_with_the_stem_summed_over_rgb(
    pretrained, two_classes, cache_dir, caplog
):
    caplog.set_level(logging.INFO, logger="absl")
    config = transfer_config(pretrained, two_classes, cache_dir)
    assert config.augment.normalization == "imagenet"  # the recipe's: RGB, refused for gray
    with pytest.raises(ConfigError, match=r"augment\.normalization to 'dataset'"):
        builders.normalization_name(config, channels=1)
    gray = {"name": "dataset", "mean": [0.5], "std": [0.25]}
    _, input_shape = builders.build_preprocess(config, (24, 24, 1), gray)
    model = builders.build_model(config, num_classes=len(CLASSES))

    variables = flat(builders.pretrained_variables(config, model, input_shape))

    assert "conv1/kernel summed over RGB for gray images" in caplog.text
    converted = flat(convert.torchvision_to_flax(pretrained, "resnet18"))
    stem = ("params", "conv1", "kernel")
    np.testing.assert_allclose(variables[stem], converted[stem].sum(axis=2, keepdims=True))
    np.testing.assert_array_equal(
        variables["params", "bn1", "scale"], converted["params", "bn1", "scale"]
    )


def test_freezing_the_first_stage_keeps_the_stem_and_stage_1_and_trains_the_rest(
    pretrained, two_classes, cache_dir, tmp_path
):
    config = transfer_config(pretrained, two_classes, cache_dir, freeze="1")
    config.optimizer.learning_rate = 1e-2  # every trained leaf moves visibly in two steps
    loop.train_and_evaluate(config, tmp_path)

    start, final = flat(start_variables(config)), flat(final_variables(tmp_path))
    moved_by_stage: dict[Any, list[bool]] = {}
    for path, value in final.items():
        if stage(path) is not None and stage(path) <= 1:
            np.testing.assert_array_equal(value, start[path], err_msg=str(path))
        moved_by_stage.setdefault((path[0], stage(path)), []).append(
            bool(np.any(value != start[path]))
        )
    for collection in ("params", "batch_stats"):
        for trained in (2, 3, 4):  # every later stage's weights and BN statistics move
            assert all(moved_by_stage[collection, trained]), (collection, trained)
    assert all(moved_by_stage["params", None])  # the head


def test_the_transfer_configs_resolve_and_wire_pretrained_inputs():
    transfer = config_utils.resolve(load_recipe("r34_transfer"))
    assert (transfer.model.name, transfer.model.stem, transfer.model.freeze) == (
        "resnet34",
        "imagenet",
        "backbone",
    )
    assert (transfer.optimizer.name, transfer.schedule.name, transfer.num_epochs) == (
        "adam",
        "cosine",
        20,
    )
    assert builders.build_model(transfer, num_classes=2).frozen_stages == 4  # all four stages
    assert builders.normalization_name(transfer, channels=3) == "imagenet"

    finetune = config_utils.resolve(load_recipe("r50_finetune"))
    assert (finetune.model.name, finetune.model.stem, finetune.model.freeze) == (
        "resnet50",
        "imagenet",
        "none",
    )
    assert builders.normalization_name(finetune, channels=3) == "imagenet"
    _, input_shape = builders.build_preprocess(
        finetune, (32, 32, 3), builders.named_normalization("imagenet")
    )
    assert input_shape == (1, 224, 224, 3)  # CIFAR-10 resized on the device
    for name in ("r34_transfer", "r50_finetune"):
        assert "resnet_jax.convert" in (REPO_ROOT / "configs" / f"{name}.py").read_text()
