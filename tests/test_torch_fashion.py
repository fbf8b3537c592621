"""experiments/torch_fashion.py, the plain PyTorch baseline: its parts in-process (option A
shortcut, crop + flip, random erasing, idx reading, statistics, schedule) and one `--quick` run in
a subprocess on a fake Fashion-MNIST written in the real idx .gz format."""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from experiments import torch_fashion as tf
from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S
from tests.fake_mnist import write_fake_fashion_mnist


def test_idx_files_read_back_and_channel_stats(tmp_path):
    fake = write_fake_fashion_mnist(tmp_path, n_train=5, n_test=3)

    images = tf.read_idx(tmp_path / tf.FILES["train"][0])
    np.testing.assert_array_equal(images, fake.train_images[..., 0])
    np.testing.assert_array_equal(tf.read_idx(tmp_path / tf.FILES["test"][1]), fake.test_labels)
    mean, std = tf.channel_stats(torch.from_numpy(images.copy()).unsqueeze(1))
    assert mean[0] == pytest.approx(images.mean() / 255)
    assert std[0] == pytest.approx(images.std() / 255)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    out = tf.shortcut_a(x, 2, 32)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, :16], x[:, :, ::2, ::2])
    assert not out[:, 16:].any()
    assert tf.shortcut_a(x, 1, 16) is x


def test_resnet20_shape_and_size():
    # He et al.'s 0.27M: stem, 3 stages of 6 convs (16, 32, 64 channels), BN scales and shifts,
    # the head; option A's shortcuts add none.
    convs = 3 * 16 * 9 + 6 * 16 * 16 * 9 + (16 + 5 * 32) * 32 * 9 + (32 + 5 * 64) * 64 * 9
    norms = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
    expected = convs + norms + 64 * 10 + 10
    assert expected == 269_722
    assert sum(p.numel() for p in tf.CifarResNet(20, in_channels=3).parameters()) == expected
    model = tf.CifarResNet(32, in_channels=1).eval()
    assert len(model.blocks) == 15
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(ValueError, match="6n"):
        tf.CifarResNet(21)


def test_crop_flip_is_a_shifted_or_mirrored_copy_with_zero_borders():
    size, padding, batch = 6, 2, 200
    image = torch.arange(1, size * size + 1, dtype=torch.uint8).view(1, 1, size, size)
    images = image.repeat(batch, 1, 1, 1)
    out = tf.crop_flip(images, padding, True, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(image[0, 0], (padding,) * 4)
    candidates = {}
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[top : top + size, left : left + size]
            candidates[(top, left, False)] = crop
            candidates[(top, left, True)] = crop.flip(1)
    seen = set()
    for crop in out[:, 0]:
        matches = [key for key, candidate in candidates.items() if torch.equal(crop, candidate)]
        assert len(matches) == 1, crop  # pixel values kept, only moved; borders are zeros
        seen.add(matches[0])
    assert {flip for *_, flip in seen} == {False, True}
    assert len(seen) > 20  # the offsets and flips vary per image
    same = tf.crop_flip(images, 0, False, torch.Generator())
    assert torch.equal(same, images)


def test_random_erasing_zeroes_one_box_per_image():
    images = torch.ones(64, 1, 28, 28)
    out = tf.random_erasing(images.clone(), 1.0, torch.Generator().manual_seed(0))
    for image in out[:, 0]:
        zero = image == 0
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert h and w
        assert zero.sum() == h * w  # one rectangle
        assert rows.max() - rows.min() + 1 == h and cols.max() - cols.min() + 1 == w
        assert 0.02 * 784 * 0.8 < h * w < 0.4 * 784 * 1.2  # the area range, up to rounding
        assert 0.3 * 0.5 < h / w < 1 / 0.3 * 2  # the aspect range, up to rounding
    kept = tf.random_erasing(images.clone(), 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept, images)


def test_stratified_split_and_schedules():
    labels = torch.arange(100) % 10
    train, val = tf.stratified_split(labels, 0.2, seed=0)
    assert len(val) == 20 and set(labels[val].tolist()) == set(range(10))
    assert np.bincount(labels[val].numpy()).tolist() == [2] * 10
    assert not set(train) & set(val) and len(train) + len(val) == 100
    assert tf.lr_at(5, 0.1, 100, 10, "cosine", []) == pytest.approx(0.05)
    assert tf.lr_at(55, 0.1, 100, 10, "cosine", []) == pytest.approx(0.05)
    assert tf.lr_at(99, 0.1, 100, 0, "cosine", []) == pytest.approx(
        0.05 * (1 + math.cos(0.99 * math.pi))
    )
    bounds = [(50, 0.1), (75, 0.1)]
    lrs = [tf.lr_at(s, 0.1, 100, 0, "step", bounds) for s in (49, 50, 74, 75)]
    assert lrs == pytest.approx([0.1, 0.01, 0.01, 0.001])


@pytest.mark.slow  # a subprocess that trains
def test_quick_run_on_fake_data(tmp_path):
    data_dir = tmp_path / "fashion"
    write_fake_fashion_mnist(data_dir, n_train=600, n_test=300)
    summary_path = tmp_path / "summary.json"
    command = [
        sys.executable, "-m", "experiments.torch_fashion", "--quick", f"--data_dir={data_dir}",
        f"--json={summary_path}", "--threads=1", "--val_fraction=0.1", "--eval_every_epoch",
        "--tta_flip", "--random_erasing=0.5", "--schedule=cosine", "--warmup_epochs=0.5",
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(
        r"^epoch 1/1  train_loss \S+  train_acc \S+  val_acc \S+  test_acc ", done.stdout, re.M
    )
    summary = json.loads(summary_path.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == summary
    for key in ("wall_s", "wall_from_process_start_s", "startup_s", "train_s", "eval_s", "tta_s"):
        assert summary[key] > 0, key
    assert summary["startup_s"] + summary["train_s"] + summary["eval_s"] <= summary["wall_s"]
    assert summary["wall_s"] <= summary["wall_from_process_start_s"]
    assert 0 <= summary["test_accuracy"] <= 1 and 0 <= summary["test_accuracy_tta_flip"] <= 1
    assert summary["num_train"] + summary["num_val"] == 512 and summary["num_test"] == 256
    assert 40 <= summary["num_val"] <= 60
    assert summary["steps"] == 3 and len(summary["history"]) == 1
    assert summary["args"]["quick"] and summary["args"]["schedule"] == "cosine"
    assert summary["threads"] == 1 and summary["torch_version"] == torch.__version__
    for key in ("cpu_model", "loadavg_1min_start", "loadavg_1min_end", "mean", "std"):
        assert key in summary
