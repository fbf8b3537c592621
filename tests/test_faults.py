"""Faults of the second reliability round, injected: a full or unwritable disk for every command
line, what a failed save or a failed start leaves behind, a damaged conversion directory,
TensorBoard after a resume, and a frozen layer that pretrained weights do not cover.

We run as root, so a read-only directory does not stop writes: a full disk is simulated with
RLIMIT_FSIZE in a subprocess (a write past the limit fails with EFBIG, "File too large": Python
ignores SIGXFSZ), an unwritable place with a path under a regular file, and a disk that fills
mid-write by patching the write. The multi-process faults are in test_multihost_faults.py.
"""

from __future__ import annotations

import errno
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from resnet_jax import builders, checkpoint, config_utils, convert, files, models, reporting
from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S, run_module, subprocess_env
from tests.fake_cifar import prepare_fake_cifar10
from tests.test_cli import TOTAL_STEPS
from tests.test_train import assert_explained, train_cli  # noqa: F401 (a fixture)

# Runs a module as `python -m` does, after limiting the size of any file it writes.
_FULL_DISK_LAUNCHER = """
import resource, runpy, sys
_, limit, module, *args = sys.argv
resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_with_a_full_disk(module: str, *args: str, limit_bytes: int) -> subprocess.CompletedProcess:
    """`python -m module args` where no file may grow past `limit_bytes`, as on a full disk."""
    return subprocess.run(
        [sys.executable, "-c", _FULL_DISK_LAUNCHER, str(limit_bytes), module, *args],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )  # fmt: skip


def under_a_file(tmp_path: Path) -> Path:
    """A directory that cannot be created: its parent is a regular file."""
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    return blocker / "sub"


# --- A full disk, an unwritable place --------------------------------------------------------


def test_a_full_disk_at_start_up_is_explained_and_leaves_no_checkpoints_dir(
    trained_run, tiny_overrides, tmp_path
):
    del trained_run  # it prepares the dataset: preparing it needs space, loading it none
    # 64 bytes: the lock file's line and TensorBoard's first event fit, config.json does not.
    done = run_with_a_full_disk(
        "resnet_jax.train", *tiny_overrides, f"--workdir={tmp_path}", limit_bytes=64
    )
    assert_explained(
        done.returncode, done.stderr, f"Cannot write {tmp_path / 'config.json'}",
        "File too large", "Free disk space",
    )  # fmt: skip
    assert not (tmp_path / "checkpoints").exists()


def test_a_disk_that_fills_during_the_first_epoch_is_explained(
    trained_run, tiny_overrides, tmp_path
):
    del trained_run  # the dataset, prepared
    # 3000 bytes: config.json fits; curves.png, at the first epoch's end, does not.
    done = run_with_a_full_disk(
        "resnet_jax.train", *tiny_overrides, f"--workdir={tmp_path}", limit_bytes=3000
    )
    assert_explained(done.returncode, done.stderr, "Cannot write", "File too large")
    assert not list(tmp_path.glob(".tmp-*"))  # no half-written file left beside the whole ones


def test_evaluate_checks_its_output_before_evaluating(trained_run, tmp_path):
    output = under_a_file(tmp_path) / "eval.json"
    done = run_module("resnet_jax.evaluate", f"--workdir={trained_run['workdir']}",
                      f"--output={output}")  # fmt: skip
    assert_explained(done.returncode, done.stderr, "Cannot write to --output's directory",
                     str(output.parent))  # fmt: skip
    assert "accuracy" not in done.stdout  # refused before the evaluation, not after its table


def test_evaluate_on_a_full_disk_keeps_no_partial_output(trained_run, tmp_path):
    output = tmp_path / "eval.json"
    # The check's probe (4 KiB) passes; results.json (about 2 KiB) fits, its PNG does not.
    done = run_with_a_full_disk(
        "resnet_jax.evaluate", f"--workdir={trained_run['workdir']}", f"--output={output}",
        limit_bytes=8192,
    )  # fmt: skip
    assert_explained(done.returncode, done.stderr, "Cannot write", "eval.png", "File too large")
    assert not output.with_suffix(".png").exists()
    assert not list(tmp_path.glob(".tmp-*"))


def test_convert_checks_its_output_before_converting(tmp_path):
    # An input that does not exist: converting first would complain about it instead.
    done = run_module(
        "resnet_jax.convert", "--arch=resnet18", f"--input={tmp_path / 'missing.pth'}",
        f"--output={under_a_file(tmp_path) / 'converted'}",
    )  # fmt: skip
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert "Cannot write to --output's parent directory" in " ".join(done.stderr.split())


def test_a_study_checks_its_out_before_training(tmp_path):
    out = under_a_file(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "experiments.optimizers", "--quick", f"--out={out}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert_explained(done.returncode, done.stderr, f"Cannot write to --out {out}")


def test_a_whole_file_cut_short_by_a_full_disk_is_never_read_back(tmp_path, monkeypatch):
    path = tmp_path / reporting.RESULTS_FILE
    path.write_text('{"test_accuracy": 0.5}\n')
    original = Path.write_text

    def fills_the_disk(self, text, *args, **kwargs):
        original(self, text[:10], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", fills_the_disk)
    with pytest.raises(files.WriteError, match=r"Cannot write .*results.json: No space left"):
        files.write_text(path, '{"test_accuracy": 0.9}\n')
    monkeypatch.undo()
    assert reporting.read_results(tmp_path) == {"test_accuracy": 0.5}  # the old one, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == [reporting.RESULTS_FILE]


# --- What a failed save or start leaves behind --------------------------------------------------


def test_a_failed_saves_leftovers_are_removed_by_the_next_run_only(trained_run, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained_run["workdir"], workdir)
    leftover = workdir / "checkpoints" / f"{TOTAL_STEPS + 9}.orbax-checkpoint-tmp-1234"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "partial").write_bytes(b"\0" * 100)
    # Evaluation reads the directory of a run that may be saving right now: it removes nothing.
    reader = checkpoint.Checkpoints(workdir / "checkpoints", read_only=True)
    reader.close()
    assert leftover.exists()

    args = [a for a in trained_run["args"] if not a.startswith("--workdir")]
    rerun = run_module("resnet_jax.train", *args, f"--workdir={workdir}")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not leftover.exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["18", "9"]


def test_a_run_that_fails_before_its_first_save_leaves_nothing_to_mistake(
    train_cli,  # noqa: F811
    tiny_overrides,
    tmp_path,
):
    # The warmup is checked after the data and the checkpoint directory are opened.
    code, stderr = train_cli(*tiny_overrides, f"--workdir={tmp_path}",
                             "--config.schedule.warmup_epochs=5")  # fmt: skip
    assert_explained(code, stderr, "covers the whole run")
    assert not (tmp_path / "checkpoints").exists()
    # A workdir from before this fix, with an empty checkpoints/: evaluation says what it is.
    (tmp_path / "checkpoints").mkdir()
    done = run_module("resnet_jax.evaluate", f"--workdir={tmp_path}")
    assert_explained(done.returncode, done.stderr, "holds no complete checkpoint",
                     "a run that failed or stopped earlier saved none")  # fmt: skip


# --- A damaged conversion directory -------------------------------------------------------------


def test_a_damaged_conversion_directory_is_one_message_without_tracebacks(tmp_path):
    shapes = models.init_shapes(models.get_model("resnet18", 10), (1, 32, 32, 3))
    rng = np.random.default_rng(0)  # random: zeros compress to files too small to cut short
    variables = {c: jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes[c])
                 for c in ("params", "batch_stats")}  # fmt: skip
    converted = tmp_path / "converted"
    convert._save(variables, converted, "resnet18", tmp_path / "weights.pth")
    assert not list(tmp_path.glob(".converted*"))  # the staging directory was renamed
    data_files = list(converted.glob("ocdbt.process_0/d/*"))
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(10)
    done = run_module("resnet_jax.convert", "--arch=resnet18", f"--input={converted}",
                      f"--output={tmp_path / 'again'}")  # fmt: skip
    assert done.returncode == 1
    for noise in ("Traceback", "Event loop is closed", "exception was never retrieved"):
        assert noise not in done.stderr, done.stderr[-3000:]
    assert f"'{converted}' is damaged: its arrays cannot be read back" in done.stderr
    assert not (tmp_path / "again").exists()


# --- TensorBoard after a resume -----------------------------------------------------------------


def scalar_steps(workdir: Path) -> dict[str, list[int]]:
    """Every TensorBoard scalar's steps, over all event files, in the order they were written."""
    steps: dict[str, list[int]] = {}
    for events in sorted(workdir.glob(reporting.EVENTS_GLOB)):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    def log(reporter: reporting.Reporter, steps: range) -> None:
        for step in steps:
            reporter.write({"record": "step", "step": step, "train_loss": 1.0 / step})

    first = reporting.Reporter(tmp_path)
    log(first, range(1, 7))  # killed after step 6; its last checkpoint is at step 3
    first.close()
    resumed = reporting.Reporter(tmp_path)
    resumed.keep_history_until(3)
    log(resumed, range(4, 9))
    resumed.close()
    assert scalar_steps(tmp_path) == {"train_loss": list(range(1, 9))}
    assert [r["step"] for r in reporting.read_metrics(tmp_path)] == list(range(1, 9))


def test_tensorboard_events_are_written_without_importing_tensorflow(tmp_path):
    # tensorboard's own writer imports TensorFlow (seconds, ~600 MB) where it is installed.
    write = (
        "import sys; from resnet_jax import reporting; "
        f"reporter = reporting.Reporter({str(tmp_path)!r}); "
        "reporter.write({'record': 'step', 'step': 5, 'train_loss': 0.25}); reporter.close(); "
        "print('tensorflow' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", write], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=SUBPROCESS_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-3000:]
    (events,) = tmp_path.glob(reporting.EVENTS_GLOB)
    values = [(e.step, v.tag, float(tensor_util.make_ndarray(v.tensor)))
              for e in EventFileLoader(str(events)).Load() for v in e.summary.value]  # fmt: skip
    assert values == [(5, "train_loss", 0.25)]


# --- A frozen layer that the pretrained weights do not cover --------------------------------------


@pytest.fixture(scope="module")
def imagenet_resnet18_weights(tmp_path_factory) -> Path:
    """resnet18's torchvision keys and shapes (zeros), as a .safetensors file."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    expected = convert._expected_torch_shapes("resnet18", num_classes=1000)
    safetensors.numpy.save_file(
        {key: np.zeros(shape, np.float32) for key, (_, shape) in expected.items()}, str(path)
    )
    return path


@pytest.mark.parametrize(
    ("stem", "freeze", "allowed", "refused"),
    [
        ("cifar", "backbone", False, True),  # the stem's 3x3 conv1 would stay random and frozen
        ("cifar", "1", False, True),
        ("cifar", "backbone", True, False),  # model.freeze_random_layers: what the user wants
        ("cifar", "none", False, False),  # it trains: nothing random is frozen
        ("imagenet", "backbone", False, False),  # every frozen layer is loaded
    ],
)
def test_freezing_a_layer_the_pretrained_weights_do_not_cover_is_refused(
    imagenet_resnet18_weights, stem, freeze, allowed, refused
):
    config = config_utils.resolve(
        {"model": {"name": "resnet18", "stem": stem, "freeze": freeze,
                   "freeze_random_layers": allowed,
                   "pretrained": str(imagenet_resnet18_weights)}}
    )  # fmt: skip
    model = builders.build_model(config, num_classes=10)
    if refused:
        with pytest.raises(convert.ConversionError, match=r"would stay random: conv1/kernel\."):
            builders.pretrained_variables(config, model, (1, 32, 32, 3))
    else:
        assert builders.pretrained_variables(config, model, (1, 32, 32, 3)) is not None


def test_a_full_disk_while_preparing_the_dataset_is_explained(tiny_overrides, tmp_path):
    # A first run extracts the archive into data_dir: 10 KB is too little for it.
    data_dir = tmp_path / "data"
    prepare_fake_cifar10(data_dir, n_train_per_batch=20, n_test=20)
    args = [a for a in tiny_overrides if "data_dir" not in a]
    done = run_with_a_full_disk(
        "resnet_jax.train", *args, f"--config.dataset.data_dir={data_dir}",
        f"--workdir={tmp_path / 'run'}", limit_bytes=10_000,
    )  # fmt: skip
    assert_explained(done.returncode, done.stderr, f"Cannot write {data_dir}", "File too large")
