"""Stream mode end to end, on the ImageNet recipe shrunk to a tiny JPEG folder: a run stopped
mid-epoch and resumed with another worker count ends exactly where an uninterrupted run does,
an unreadable file is counted in metrics.jsonl and results.json, and a worker process that dies
ends the run with a message instead of a hang."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, predict, stream
from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S, run_module, subprocess_env
from tests.test_stream import jpeg_folder

STEPS = 6  # 2 epochs of 3 steps: 13 train images (one unreadable) in batches of 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    jpeg_folder(root, {"train": {"a": 6, "b": 6}, "test": {"a": 2, "b": 2}}, size=(36, 44))
    (root / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def recipe_args(folder: Path, workdir: Path, cache_dir: Path, workers: int, epochs=2) -> list:
    return [
        "--config=configs/r50_imagenet.py", f"--workdir={workdir}",
        f"--config.dataset.name=folder:{folder}", "--config.dataset.image_size=32",
        f"--config.dataset.stream_workers={workers}", "--config.model.width=4",
        "--config.batch_size=4", "--config.eval_batch_size=4", f"--config.num_epochs={epochs}",
        "--config.schedule.warmup_epochs=0.5", "--config.log_every_steps=1",
        f"--config.compilation_cache_dir={cache_dir}",
    ]  # fmt: skip


def final_variables(workdir: Path) -> dict:
    checkpoints = checkpoint.Checkpoints(workdir / "checkpoints")
    try:
        return checkpoints.restore_variables(checkpoints.latest_step())
    finally:
        checkpoints.close()


def step_records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["record"] == "step"]


def start_training(args: list[str], log: Path) -> subprocess.Popen:
    # A session of its own: a test can signal the run's process group as a terminal's Ctrl-C does.
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_jax.train", *args], cwd=REPO_ROOT, env=subprocess_env(),
        stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
    )  # fmt: skip


def wait_for(process: subprocess.Popen, log: Path, ready) -> None:
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not ready():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)


def test_a_stopped_stream_run_resumes_exactly_with_other_workers(folder, cache_dir, tmp_path):
    straight = tmp_path / "straight"
    done = run_module("resnet_jax.train", *recipe_args(folder, straight, cache_dir, workers=0))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Input pipeline: stream (dataset.pipeline = 'stream')" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("broken.jpg: it is not a readable image") == 1  # one warning
    results = json.loads((straight / "results.json").read_text())
    assert results["skipped_files"] == 1 and results["num_test_examples"] == 4
    assert step_records(straight)[-1]["skipped_files"] == 1
    # predict brings a photo to the model's size as this run's evaluation did (not a squash).
    checkpoints = checkpoint.Checkpoints(straight / "checkpoints")
    try:
        meta = checkpoints.meta(checkpoints.latest_step())
        assert (meta["image_fit"], meta["pipeline"]) == ("eval_crop", "stream")
    finally:
        checkpoints.close()
    photo = sorted((folder / "test" / "a").iterdir())[0]
    evaluated = stream.EvalExample(stream.FolderSource([photo], np.zeros(1, np.int32)), 32)
    np.testing.assert_array_equal(
        predict.load_images([str(photo)], (32, 32, 3), "eval_crop")[0],
        evaluated(np.array([0, 1]))["image"],
    )
    assert predict.predict([str(photo)], workdir=str(straight), top_k=1)[0][0][0] in ("a", "b")

    stopped = tmp_path / "stopped"
    log = tmp_path / "stopped.log"
    process = start_training(recipe_args(folder, stopped, cache_dir, workers=1), log)
    try:
        wait_for(process, log, lambda: "Compiled the train and eval steps" in log.read_text())
        process.send_signal(signal.SIGTERM)  # arrives before the first epoch ends
        assert process.wait(SUBPROCESS_TIMEOUT_S) == 128 + signal.SIGTERM, log.read_text()
    finally:
        process.kill()
    at = int(re.search(r"Stopped by SIGTERM at step (\d+)", log.read_text()).group(1))
    assert 0 < at < 3  # mid-epoch
    resumed = run_module("resnet_jax.train", *recipe_args(folder, stopped, cache_dir, workers=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from the checkpoint at step {at}." in resumed.stderr

    # The same batches in the same order: the same losses step by step, the same parameters.
    losses = {r["step"]: r["train_loss"] for r in step_records(stopped)}
    assert [losses[r["step"]] for r in step_records(straight)] == [
        r["train_loss"] for r in step_records(straight)
    ]
    same = jax.tree.map(np.array_equal, final_variables(stopped), final_variables(straight))
    assert all(jax.tree.leaves(same)), "resumed parameters differ from an uninterrupted run's"
    assert json.loads((stopped / "results.json").read_text()) == results


def test_a_worker_that_dies_ends_the_run_with_a_message(folder, cache_dir, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    process = start_training(recipe_args(folder, workdir, cache_dir, workers=1, epochs=50), log)
    try:
        metrics = workdir / "metrics.jsonl"
        wait_for(process, log, lambda: metrics.exists() and metrics.read_text().strip())
        # grain starts the workers of each epoch and evaluation anew: kill each one seen until
        # the run ends (one that had finished its share dies unnoticed, as it should).
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
        while process.poll() is None:
            assert time.monotonic() < deadline, "the run did not end: " + log.read_text()[-3000:]
            for pid in children(process.pid):
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # ended
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        assert process.returncode == 1, log.read_text()[-3000:]
    finally:
        process.kill()
    stderr = log.read_text()
    assert "An input worker process died" in stderr and "rerun the same command" in stderr
    assert "Traceback" not in stderr


def test_ctrl_c_saves_and_stops_the_run_not_its_input_workers(folder, cache_dir, tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "run.log"
    process = start_training(recipe_args(folder, workdir, cache_dir, workers=1, epochs=50), log)
    try:
        metrics = workdir / "metrics.jsonl"
        wait_for(process, log, lambda: metrics.exists() and metrics.read_text().strip())
        wait_for(
            process, log, lambda: any(b"spawn_main" in cmdline(p) for p in children(process.pid))
        )
        os.killpg(process.pid, signal.SIGINT)  # the whole group, workers included
        assert process.wait(SUBPROCESS_TIMEOUT_S) == 128 + signal.SIGINT, log.read_text()[-3000:]
    finally:
        process.kill()
    stderr = log.read_text()
    assert "Stopped by SIGINT at step" in stderr and "input worker process died" not in stderr
    assert "Traceback" not in stderr and any((workdir / "checkpoints").iterdir())


def cmdline(pid: int) -> bytes:
    with contextlib.suppress(FileNotFoundError):  # ended
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    return b""


def children(pid: int) -> list[int]:
    """The child processes of `pid`, whichever of its threads started them."""
    pids = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            pids += [int(p) for p in listing.read_text().split()]
    return pids
