"""The command lines end to end, as a user runs them: train, rerun, SIGTERM and resume, evaluate,
predict, and what a mistake looks like. Each runs in a subprocess on the tiny fake run."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import checkpoint, reporting
from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S, run_module, subprocess_env
from tests.fake_cifar import CIFAR10_CLASS_NAMES

STEPS_PER_EPOCH = 9  # 90 train examples // batch 10
TOTAL_STEPS = 2 * STEPS_PER_EPOCH


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def final_variables(workdir: Path) -> dict:
    checkpoints = checkpoint.Checkpoints(workdir / "checkpoints")
    try:
        assert checkpoints.latest_step() == TOTAL_STEPS
        return checkpoints.restore_variables(TOTAL_STEPS)
    finally:
        checkpoints.close()


def epoch_metrics(workdir: Path) -> list[dict]:
    """The numbers of each epoch record."""
    records = read_jsonl(workdir / "metrics.jsonl")
    return [
        {k: v for k, v in r.items() if k != "record"} for r in records if r["record"] == "epoch"
    ]


def test_training_writes_every_output(trained_run):
    workdir, log = trained_run["workdir"], trained_run["stderr"]
    assert "Traceback" not in log
    # The start of the log states the run in the reports' terms.
    assert "90 train / 10 val / 20 test examples" in log
    assert re.search(r"batch size 10 .* 9 steps per epoch .* 2 epochs, 18 steps in all", log)
    assert "Learning rate: peak 0.0078" in log  # 0.1 per 128 images, scaled to a batch of 10

    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "resnet20" and config["optimizer"]["nesterov"] is True

    records = read_jsonl(workdir / "metrics.jsonl")
    steps = [r for r in records if r["record"] == "step"]
    epochs = [r for r in records if r["record"] == "epoch"]
    assert [r["step"] for r in steps] == [4, 8, 9, 12, 16, 18]  # every 4 steps, and epoch ends
    for r in steps:
        assert {
            "epoch",
            "train_loss",
            "train_accuracy",
            "learning_rate",
            "images_per_second",
        } <= r.keys()
    assert [(r["epoch"], r["step"]) for r in epochs] == [(1, 9), (2, 18)]
    for r in epochs:
        assert {
            "train_loss",
            "train_accuracy",
            "val_loss",
            "val_accuracy",
            "learning_rate",
        } <= r.keys()
        assert np.isfinite(r["train_loss"]) and 0 <= r["val_accuracy"] <= 1

    assert list(workdir.glob("events.out.tfevents.*"))
    for picture in ("curves.png", "confusion_matrix.png"):
        assert (workdir / picture).stat().st_size > 10_000

    results = json.loads((workdir / "results.json").read_text())
    confusion = np.array(results["confusion_matrix"])
    assert results["num_test_examples"] == confusion.sum() == 20
    assert results["test_accuracy"] == pytest.approx(np.trace(confusion) / 20)
    assert results["class_names"] == list(CIFAR10_CLASS_NAMES)
    assert set(results["per_class"]) == set(CIFAR10_CLASS_NAMES)
    assert {"test_loss", "precision", "recall", "f1"} <= results.keys()
    assert results["checkpoint_selection"] == "best validation accuracy"
    best = max(epochs, key=lambda r: (r["val_accuracy"], r["step"]))
    assert (results["checkpoint_epoch"], results["checkpoint_step"]) == (
        best["epoch"],
        best["step"],
    )


def test_a_log_file_gets_one_line_per_logged_step_and_no_progress_bar(trained_run):
    # The run's stderr went to a pipe, as `nohup ... > log` sends it to a file.
    log = trained_run["stderr"]
    lines = re.findall(r"Step (\d+)/18 \(epoch \d/2\): train loss [\d.]+, accuracy", log)
    assert [int(step) for step in lines] == [4, 8, 9, 12, 16, 18]
    assert "\r" not in log and "step/s" not in log


def test_on_a_terminal_the_steps_show_on_a_progress_bar_instead(monkeypatch, capsys, caplog):
    record = {"step": 4, "train_loss": 1.5, "train_accuracy": 0.25, "learning_rate": 0.1}
    record["images_per_second"] = 100.0

    def show_four_steps() -> None:
        progress = reporting.Progress(total_steps=10, first_step=0)
        progress.start_epoch(0, 1)
        for _ in range(4):
            progress.step()
        progress.show(record)
        progress.close()

    with caplog.at_level(logging.INFO, logger="absl"):
        show_four_steps()  # not a terminal: a log line
        assert "Step 4/10 (epoch 1/1): train loss 1.5000, accuracy 25.00%" in caplog.text
        caplog.clear()
        capsys.readouterr()
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
        show_four_steps()

    assert "Step 4/10" not in caplog.text
    assert re.search(r"epoch 1/1: .*4/10.*loss=1\.5000", capsys.readouterr().err)


def test_rerunning_a_finished_run_only_reports(trained_run):
    workdir = trained_run["workdir"]
    before = {name: (workdir / name).read_bytes() for name in ("results.json", "metrics.jsonl")}
    done = run_module("resnet_jax.train", *trained_run["args"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "is finished (step 18 of 18); nothing to train" in done.stderr
    assert "Compiled" not in done.stderr and "Dataset" not in done.stderr  # no data, no compiling
    assert {name: (workdir / name).read_bytes() for name in before} == before


def test_sigterm_saves_and_the_rerun_resumes_bit_identically(trained_run, tmp_path):
    workdir = tmp_path / "interrupted"
    args = [a for a in trained_run["args"] if not a.startswith("--workdir")]
    args.append(f"--workdir={workdir}")
    log = tmp_path / "first.log"
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "resnet_jax.train", *args],
            cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while "Compiled the train and eval steps" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)  # arrives during the first epoch's steps
        assert process.wait(SUBPROCESS_TIMEOUT_S) == 128 + signal.SIGTERM, log.read_text()
    first = log.read_text()
    assert "Traceback" not in first
    stopped = int(re.search(r"Stopped by SIGTERM at step (\d+)", first).group(1))
    assert 0 < stopped < TOTAL_STEPS
    assert not (workdir / "results.json").exists()

    resumed = run_module("resnet_jax.train", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming from the checkpoint at step {stopped}." in resumed.stderr

    interrupted, uninterrupted = final_variables(workdir), final_variables(trained_run["workdir"])
    same = jax.tree.map(np.array_equal, interrupted, uninterrupted)
    assert all(jax.tree.leaves(same)), "resumed parameters differ from an uninterrupted run's"
    # Epoch means include the steps before the interruption (saved with the checkpoint).
    for resumed_epoch, epoch in zip(
        epoch_metrics(workdir), epoch_metrics(trained_run["workdir"]), strict=True
    ):
        assert resumed_epoch == pytest.approx(epoch, rel=1e-12)
    results = json.loads((workdir / "results.json").read_text())
    assert results == json.loads((trained_run["workdir"] / "results.json").read_text())


def test_evaluate_recomputes_the_results(trained_run, tmp_path):
    workdir = trained_run["workdir"]
    output = tmp_path / "evaluation.json"
    done = run_module("resnet_jax.evaluate", f"--workdir={workdir}", f"--output={output}")
    assert done.returncode == 0, done.stderr[-2000:]
    saved = json.loads((workdir / "results.json").read_text())
    again = json.loads(output.read_text())
    assert again["checkpoint_step"] == saved["checkpoint_step"]
    assert again["confusion_matrix"] == saved["confusion_matrix"]
    assert again["test_loss"] == pytest.approx(saved["test_loss"], rel=1e-5)
    assert f"accuracy {saved['test_accuracy']:.2%}" in done.stdout
    assert "confusion matrix" in done.stdout and output.with_suffix(".png").exists()


def test_predict_prints_top_k_classes(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    paths = [tmp_path / "big.png", tmp_path / "gray.jpg"]
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (32, 32), np.uint8)).save(paths[1])
    done = run_module(
        "resnet_jax.predict", f"--workdir={trained_run['workdir']}", "--top_k=3", *map(str, paths)
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [str(p) for p in paths]
    for line in lines:
        ranked = re.findall(r"(\w+) (0\.\d{3}|1\.000)", line.split(": ", 1)[1])
        assert len(ranked) == 3 and {name for name, _ in ranked} <= set(CIFAR10_CLASS_NAMES)
        probabilities = [float(p) for _, p in ranked]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.001


def test_a_typo_in_a_config_key_is_explained(tiny_overrides, tmp_path):
    done = run_module(
        "resnet_jax.train",
        *tiny_overrides,
        f"--workdir={tmp_path}",
        "--config.optimizer.nestrov=True",
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "Unknown config key optimizer.nestrov (did you mean optimizer.nesterov?)" in done.stderr


def test_a_batch_that_does_not_split_over_devices_is_explained(tiny_overrides, tmp_path):
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    done = run_module(
        "resnet_jax.train", *tiny_overrides, f"--workdir={tmp_path}", "--config.batch_size=9",
        env=two_devices,
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "batch size 9 does not divide evenly across the 2 devices" in done.stderr
    assert "--config.batch_size=8" in done.stderr
