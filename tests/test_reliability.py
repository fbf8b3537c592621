"""Faults a long run meets, injected: kill -9 at several points, damaged and half-written
checkpoints, a full disk while saving, and bad input. The promise: no run loses more than the
work since its last checkpoint, a resumed run ends exactly where an uninterrupted one would, and
no bad input produces a traceback or a silently wrong result.

Two runs on one workdir: the second is refused while the first holds `workdir/.lock`.

Covered elsewhere, not repeated here: SIGTERM saves and the rerun resumes bit-identically, a typo
in a config key and a batch that does not split over devices as subprocesses (test_cli.py); a
diverging loss stopping at the last good checkpoint, unknown model/optimizer/schedule/dataset
names, out-of-range values, a missing pretrained file, a missing config file, a crop larger than
the padded image (test_train.py).

Faults are injected from outside, as they happen: the test watches the run's metrics.jsonl and
sends SIGKILL at the point it wants, so the code under test carries no fault hooks.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler
from PIL import Image

from resnet_jax import checkpoint, reporting
from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S, run_module, subprocess_env
from tests.test_cli import TOTAL_STEPS, final_variables, read_jsonl
from tests.test_train import assert_explained, train_cli  # noqa: F401 (a fixture)

# Importing torchvision (triton) in a process that has already trained (TensorFlow loaded, orbax's
# threads running) can segfault; test_train's pretrained test imports it after this module's
# in-process runs, so import it first.
with contextlib.suppress(ImportError):
    import torchvision  # noqa: F401

STEPS_PER_EPOCH = 9


def args_for(trained_run: dict, workdir: Path) -> list[str]:
    """The tiny finished run's command line, on another workdir."""
    return [a for a in trained_run["args"] if not a.startswith("--workdir")] + [
        f"--workdir={workdir}"
    ]


@contextlib.contextmanager
def training_in_background(args: list[str], log: Path, ready: Callable[[], bool]):
    """`python -m resnet_jax.train ARGS` as a subprocess (stderr to `log`), yielded once `ready()`
    holds, and killed with SIGKILL when the block is left."""
    with open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "resnet_jax.train", *args],
            cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
            while not ready():
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            yield process
        finally:
            process.kill()
            process.wait(SUBPROCESS_TIMEOUT_S)


def records(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    try:
        return read_jsonl(path) if path.exists() else []
    except json.JSONDecodeError:  # a line being written
        return []


def assert_same_as_uninterrupted(workdir: Path, trained_run: dict) -> None:
    resumed, uninterrupted = final_variables(workdir), final_variables(trained_run["workdir"])
    same = jax.tree.map(np.array_equal, resumed, uninterrupted)
    assert all(jax.tree.leaves(same)), "resumed parameters differ from an uninterrupted run's"
    results = json.loads((workdir / "results.json").read_text())
    assert results == json.loads((trained_run["workdir"] / "results.json").read_text())


# --- kill -9 ------------------------------------------------------------------------------------

# Where to kill: a test of the run's metrics.jsonl records and its workdir.
KILL_POINTS = {
    # epoch 2's training steps, once the epoch-1 checkpoint is complete on disk
    "during_a_step": lambda rs, workdir: (
        (workdir / "checkpoints" / str(STEPS_PER_EPOCH)).is_dir()
        and any(r["record"] == "step" and r["step"] > STEPS_PER_EPOCH for r in rs)
    ),
    # the epoch-1 record is written just before its checkpoint's asynchronous save starts
    "during_an_async_save": lambda rs, workdir: any(
        r["record"] == "epoch" and r["step"] == STEPS_PER_EPOCH for r in rs
    ),
    # the last step's record is flushed just before the final evaluation
    "during_evaluation": lambda rs, workdir: any(
        r["record"] == "step" and r["step"] == TOTAL_STEPS for r in rs
    ),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_kill_9_loses_only_the_work_since_the_last_checkpoint(trained_run, tmp_path, point):
    workdir = tmp_path / "killed"
    args = args_for(trained_run, workdir)
    at_the_point = lambda: KILL_POINTS[point](records(workdir), workdir)  # noqa: E731
    with training_in_background(args, tmp_path / "killed.log", at_the_point):
        pass  # leaving the block is the kill -9
    assert not (workdir / "results.json").exists()
    # Whatever orbax left (a *.orbax-checkpoint-tmp-* directory), only complete steps are listed.
    checkpoints = checkpoint.Checkpoints(workdir / "checkpoints")
    try:
        complete = checkpoints.all_steps()
    finally:
        checkpoints.close()
    assert set(complete) <= {STEPS_PER_EPOCH, TOTAL_STEPS}

    rerun = run_module("resnet_jax.train", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    if complete:
        assert f"Resuming from the checkpoint at step {max(complete)}." in rerun.stderr
    if point == "during_a_step":
        assert STEPS_PER_EPOCH in complete
    assert_same_as_uninterrupted(workdir, trained_run)


# --- Damaged and half-written checkpoints --------------------------------------------------------


def copy_of(trained_run: dict, tmp_path: Path) -> Path:
    workdir = tmp_path / "copy"
    shutil.copytree(trained_run["workdir"], workdir)
    return workdir


def test_a_half_written_checkpoint_is_never_listed(trained_run, tmp_path):
    # What a kill -9 during a save leaves: the step's files in orbax's temporary directory,
    # without the commit marker.
    directory = copy_of(trained_run, tmp_path) / "checkpoints"
    (directory / str(TOTAL_STEPS)).rename(directory / f"{TOTAL_STEPS}.orbax-checkpoint-tmp-1234")
    for marker in directory.glob(f"{TOTAL_STEPS}.*/**/commit_success.txt"):
        marker.unlink()
    checkpoints = checkpoint.Checkpoints(directory)
    try:
        assert checkpoints.all_steps() == [STEPS_PER_EPOCH]
        assert checkpoints.latest_step() == STEPS_PER_EPOCH
    finally:
        checkpoints.close()


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(trained_run, tmp_path):
    workdir = copy_of(trained_run, tmp_path)
    (workdir / "results.json").unlink()  # not finished: the rerun must restore the latest
    data_files = list((workdir / "checkpoints" / str(TOTAL_STEPS) / "state").glob("ocdbt*/d/*"))
    assert data_files
    for path in data_files:  # a disk that lost the ends of the array files
        with open(path, "r+b") as f:
            f.truncate(10)

    rerun = run_module("resnet_jax.train", *args_for(trained_run, workdir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    log = " ".join(rerun.stderr.split())
    assert f"The checkpoint at step {TOTAL_STEPS} in {workdir / 'checkpoints'} is damaged" in log
    assert f"falling back to the previous checkpoint, at step {STEPS_PER_EPOCH}" in log
    assert f"Resuming from the checkpoint at step {STEPS_PER_EPOCH}." in log
    assert list((workdir / "corrupt_checkpoints").iterdir())  # set aside, not deleted
    assert_same_as_uninterrupted(workdir, trained_run)


@pytest.mark.parametrize("finished", [False, True], ids=["unfinished", "finished"])
def test_damaged_metadata_falls_back_to_the_previous_checkpoint(trained_run, tmp_path, finished):
    # The latest checkpoint's JSON item cut short; finished, the rerun must not just report.
    workdir = copy_of(trained_run, tmp_path)
    if not finished:
        (workdir / "results.json").unlink()
    metadata = workdir / "checkpoints" / str(TOTAL_STEPS) / "meta" / "metadata"
    metadata.write_text(metadata.read_text()[:20])

    rerun = run_module("resnet_jax.train", *args_for(trained_run, workdir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Traceback" not in rerun.stderr
    log = " ".join(rerun.stderr.split())
    assert f"The checkpoint at step {TOTAL_STEPS} in {workdir / 'checkpoints'} is damaged" in log
    assert "its metadata" in log
    assert f"Resuming from the checkpoint at step {STEPS_PER_EPOCH}." in log
    assert_same_as_uninterrupted(workdir, trained_run)


def test_evaluating_a_damaged_checkpoint_is_explained(trained_run, tmp_path):
    checkpoints = copy_of(trained_run, tmp_path) / "checkpoints"
    metadata = checkpoints / str(TOTAL_STEPS) / "meta" / "metadata"
    metadata.write_text("{")
    done = run_module("resnet_jax.evaluate", f"--checkpoint={checkpoints / str(TOTAL_STEPS)}")
    assert_explained(
        done.returncode, done.stderr, f"The checkpoint at step {TOTAL_STEPS}", "is damaged"
    )
    assert metadata.exists()  # evaluation reads; it moves nothing


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_only_checkpoint_is_explained(trained_run, tmp_path):
    directory = copy_of(trained_run, tmp_path) / "checkpoints"
    shutil.rmtree(directory / str(STEPS_PER_EPOCH))
    checkpoints = checkpoint.Checkpoints(directory)
    try:
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
            dict(checkpoints._manager.item_metadata(TOTAL_STEPS).state),
        )
        (directory / str(TOTAL_STEPS) / "state" / "manifest.ocdbt").unlink()
        with pytest.raises(checkpoint.CheckpointError, match=r"is damaged .* no earlier one"):
            checkpoints.restore(TOTAL_STEPS, target)
        assert checkpoints.latest_step() is None
    finally:
        checkpoints.close()


# --- A full disk --------------------------------------------------------------------------------


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(
    train_cli,  # noqa: F811
    tiny_overrides,
    tmp_path,
    monkeypatch,
):
    # As root, a read-only directory does not stop writes: fail the second save as a full disk.
    original = ocp.CheckpointManager.save
    saves = []

    def save(self, step, *args, **kwargs):
        saves.append(step)
        if len(saves) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    code, stderr = train_cli(*tiny_overrides, f"--workdir={tmp_path}")
    assert_explained(code, stderr, "No space left on device", f"step {TOTAL_STEPS}")
    checkpoints = checkpoint.Checkpoints(tmp_path / "checkpoints")
    try:
        assert checkpoints.all_steps() == [STEPS_PER_EPOCH]
        params = checkpoints.restore_variables(STEPS_PER_EPOCH)["params"]
    finally:
        checkpoints.close()
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    assert not (tmp_path / "results.json").exists()


def test_a_full_disk_in_the_background_write_keeps_the_previous_checkpoint(
    train_cli,  # noqa: F811
    trained_run,
    tiny_overrides,
    tmp_path,
    monkeypatch,
    caplog,
):
    # The save call returns and the disk fills while orbax's threads write: step 18's JSON items
    # fail, and the error surfaces at the next wait, with orbax's own tracebacks in its threads.
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn

    async def save_fn(self, item, directory):
        if f"/{TOTAL_STEPS}.orbax-checkpoint-tmp" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device")
        return await original(self, item, directory)

    with monkeypatch.context() as patch:
        patch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", save_fn)
        code, stderr = train_cli(*tiny_overrides, f"--workdir={tmp_path}")
    assert_explained(
        code,
        stderr,
        f"Cannot save the checkpoint at step {TOTAL_STEPS}",
        "No space left on device",
        f"(step {STEPS_PER_EPOCH}) is intact",
    )
    assert not (tmp_path / "results.json").exists()

    # Space freed: the rerun resumes and ends as an uninterrupted run.
    caplog.clear()
    code, stderr = train_cli(*tiny_overrides, f"--workdir={tmp_path}", "--verbosity=0")
    assert code == 0, stderr[-3000:]
    assert f"Resuming from the checkpoint at step {STEPS_PER_EPOCH}." in caplog.text
    assert f"Step 4/{TOTAL_STEPS} " not in caplog.text  # the first epoch is not trained again
    assert_same_as_uninterrupted(tmp_path, trained_run)


# --- Bad input ----------------------------------------------------------------------------------


def image_folder(root: Path, layout: dict[str, dict[str, int]]) -> Path:
    """`root` with layout {split: {class: number of 8x8 PNGs}}."""
    rng = np.random.default_rng(0)
    for split, classes in layout.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = rng.integers(0, 256, (8, 8, 3), np.uint8)
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize(
    ("problem", "fragments"),
    [
        (
            "no_classes",
            ["needs train/ and test/ subfolders: path/train/<class>/", "one subfolder per class"],
        ),
        ("no_images", ["holds no .png/.jpg/.jpeg images in class subfolders"]),
        ("unreadable_image", ["Cannot read the image", "bad.png", "replace it with a valid"]),
    ],
)
def test_bad_image_folders_are_explained(train_cli, tmp_path, problem, fragments):  # noqa: F811
    root = tmp_path / "images"
    if problem == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "test").mkdir()
    elif problem == "no_images":
        image_folder(root, {"train": {"a": 2, "b": 2}, "test": {"a": 1}})
        (root / "train" / "c").mkdir()
        for path in (root / "train").glob("*/*.png"):
            path.unlink()
    else:
        image_folder(root, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
        (root / "train" / "a" / "bad.png").write_bytes(b"not a png")
    code, stderr = train_cli(
        "--config=configs/r50.py", f"--workdir={tmp_path / 'run'}",
        f"--config.dataset.name=folder:{root}",
    )  # fmt: skip
    assert_explained(code, stderr, *fragments)


@pytest.mark.parametrize(
    ("model", "fragments"),
    [
        # a family without published weights
        ("resnet20", ["Cannot convert weights for arch 'resnet20'", "resnet18, resnet34"]),
        # a file that is not weights at all
        (
            "resnet18",
            ["Could not read", "weights.safetensors", "damaged or not safetensors"],
        ),
    ],
)
def test_a_mismatched_pretrained_file_is_explained(
    train_cli,  # noqa: F811
    tiny_overrides,
    tmp_path,
    model,
    fragments,
):
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"this is not a safetensors file")
    code, stderr = train_cli(
        *tiny_overrides, f"--workdir={tmp_path / 'run'}", f"--config.model.name={model}",
        "--config.model.width=0", f"--config.model.pretrained={weights}",
    )  # fmt: skip
    assert_explained(code, stderr, *fragments)
    assert not list((tmp_path / "run").glob("checkpoints/*"))


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ("--config.augment.crop_padding=-4", ["augment.crop_padding = -4 must be >= 0"]),
        ("--config.dataset.val_fraction=1.0", ["dataset.val_fraction = 1.0 must be in [0, 1)"]),
        ("--config.model.widht=4", ["did you mean model.width?"]),
    ],
)
def test_more_config_mistakes_are_explained(train_cli, tmp_path, override, fragments):  # noqa: F811
    code, stderr = train_cli("--config=configs/r50.py", f"--workdir={tmp_path}", override)
    assert_explained(code, stderr, *fragments)


def test_a_config_file_of_the_wrong_types_is_explained(train_cli, tmp_path):  # noqa: F811
    config = tmp_path / "mine.py"
    config.write_text(
        "from resnet_jax import base_config\n\n\ndef get_config():\n"
        "    config = base_config.get_config()\n    config.batch_size = '128'\n    return config\n"
    )
    code, stderr = train_cli(f"--config={config}", f"--workdir={tmp_path / 'run'}")
    assert_explained(
        code, stderr, "The config file sets a key to a value of the wrong type",
        "'batch_size'", "Fix the value in the config file",
    )  # fmt: skip


def test_a_missing_config_file_is_explained_without_a_traceback(tmp_path):
    done = run_module("resnet_jax.train", "--config=/no/such/config.py", f"--workdir={tmp_path}")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "Cannot load the config file" in " ".join(done.stderr.split())


def test_a_config_file_with_a_syntax_error_is_one_paragraph_naming_the_file_and_line(tmp_path):
    recipe = tmp_path / "bad.py"
    recipe.write_text("from resnet_jax import base_config\n\n\ndef get_config(:\n    pass\n")
    done = run_module("resnet_jax.train", f"--config={recipe}", f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (paragraph,) = done.stderr.strip().split("\n\n")  # nothing else on stderr
    text = " ".join(paragraph.split())
    assert text.startswith("Error: Cannot load the config file: a Python syntax error in")
    assert f"{recipe} at line 4 (`def get_config(:`)" in text


# --- Two runs on one workdir --------------------------------------------------------------------


def test_a_second_run_on_the_same_workdir_is_refused(
    train_cli,  # noqa: F811
    trained_run,
    tmp_path,
):
    workdir = tmp_path / "shared"
    args = args_for(trained_run, workdir)
    log = tmp_path / "first.log"
    # Once the first run loads data, it holds the lock.
    with training_in_background(args, log, lambda: "Dataset cifar10" in log.read_text()) as first:
        code, stderr_text = train_cli(*args)
        assert_explained(
            code, stderr_text, f"Another run is using --workdir {workdir}",
            f"process {first.pid} on", "or use another --workdir",
        )  # fmt: skip
    # The kernel released the dead run's lock: nothing stale stops the rerun.
    with open(workdir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_metrics_line_cut_short_is_dropped_on_resume(tmp_path):
    # A full disk or kill -9 in the middle of a write leaves part of a line (or NULs) at the end.
    records = [{"record": "step", "step": s, "train_loss": 1.0 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / reporting.METRICS_FILE).write_text(text + '{"record": "step", "step": 4, "tra\0\0')
    assert reporting.read_metrics(tmp_path) == records
    reporting.Reporter(tmp_path).keep_history_until(2)
    assert (tmp_path / reporting.METRICS_FILE).read_text() == "".join(
        json.dumps(r) + "\n" for r in records[:2]
    )
