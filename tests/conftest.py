"""Shared fixtures for the training tests: a fake CIFAR-10, and one tiny finished run.

The run is ResNet-20 at width 4 on 100 fake images (90 train / 10 val / 20 test), batch 10, for 2
epochs of 9 steps: real code paths, seconds of compute. Expensive fixtures are built once per
test session even under pytest-xdist: the first worker builds them under a file lock in the
directory all workers share, the others reuse them. Subprocesses get XLA on one thread (2 CPU
cores are shared by the test workers) and a compilation cache shared by the whole session.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import runpy
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# torchvision imported after TensorFlow segfaults (in triton's native library, which torch's
# compiler stack loads); tests use both in one process, so torchvision is loaded first.
with contextlib.suppress(ImportError):
    import torchvision  # noqa: F401

from tests.fake_cifar import prepare_fake_cifar10

REPO_ROOT = Path(__file__).resolve().parents[1]
# The fast tier (`make test-fast`: pytest -m "not slow") runs no subprocess and no training loop.
# These modules do so throughout, and tests that ask for these fixtures train a tiny run.
END_TO_END_MODULES = {
    "test_benchmark", "test_cli", "test_experiments", "test_faults", "test_gray", "test_imports",
    "test_multihost", "test_multihost_faults", "test_parallel", "test_reliability",
    "test_stream_training", "test_tools_cli", "test_transfer", "test_wheel",
}  # fmt: skip
TRAINING_FIXTURES = {"trained_run", "tiny_overrides"}
# Where tensorflow_datasets is not installed (the GPU machine's image), tests that prepare a dataset
# through it skip: those marked `tfds` and those asking for the fake CIFAR-10 data_dir.
HAS_TFDS = importlib.util.find_spec("tensorflow_datasets") is not None
TFDS_FIXTURES = {"data_dir", *TRAINING_FIXTURES}
SUBPROCESS_TIMEOUT_S = 300


def load_recipe(name: str) -> Any:
    """configs/<name>.py's `get_config()`, loaded by path as the command line loads it."""
    return runpy.run_path(str(REPO_ROOT / "configs" / f"{name}.py"))["get_config"]()


@contextlib.contextmanager
def _session_lock(shared_dir: Path, name: str) -> Iterator[None]:
    with open(shared_dir / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this session sees (the base temp dir when serial)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session", autouse=True)
def session_tempdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """TMPDIR for this worker and its subprocesses, inside pytest's base temp dir: tfds makes an
    empty temp directory on every dataset preparation and never removes it."""
    path = tmp_path_factory.mktemp("tmpdir")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(path))
        patch.setattr(tempfile, "tempdir", None)  # read TMPDIR again
        yield path


@pytest.fixture(scope="session")
def data_dir(shared_dir: Path) -> Path:
    """A tfds data_dir with a fake CIFAR-10 archive (load with verify_checksums=False)."""
    path = shared_dir / "fake_cifar10"
    with _session_lock(shared_dir, "fake_cifar10"):
        if not path.exists():
            prepare_fake_cifar10(path, n_train_per_batch=20, n_test=20)
    return path


@pytest.fixture(scope="session")
def cache_dir(shared_dir: Path) -> Path:
    """The session's JAX compilation cache: each distinct step compiles once."""
    return shared_dir / "jax_cache"


@pytest.fixture(scope="session")
def tiny_overrides(data_dir: Path, cache_dir: Path) -> list[str]:
    """Command-line overrides that make configs/r50.py a seconds-long run on the fake data."""
    return [
        "--config=configs/r50.py",
        "--config.model.name=resnet20",
        "--config.model.width=4",
        f"--config.dataset.data_dir={data_dir}",
        "--config.dataset.verify_checksums=False",
        "--config.batch_size=10",
        "--config.eval_batch_size=10",
        "--config.num_epochs=2",
        "--config.schedule.warmup_epochs=0.5",
        "--config.log_every_steps=4",
        f"--config.compilation_cache_dir={cache_dir}",
    ]


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m module args` from the repository root; stdout and stderr captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        env=subprocess_env(env),
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for CLI subprocesses: XLA on one thread, TensorFlow quiet."""
    threads = "--xla_cpu_multi_thread_eigen=false"
    env = {**os.environ, "XLA_FLAGS": threads, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if extra:
        env.update({k: f"{env[k]} {v}" if k == "XLA_FLAGS" else v for k, v in extra.items()})
    return env


@pytest.fixture(scope="session")
def trained_run(shared_dir: Path, tiny_overrides: list[str]) -> dict:
    """One finished tiny run: {"workdir", "args", "stderr"} (trained once per session)."""
    workdir = shared_dir / "trained_run"
    record = shared_dir / "trained_run.json"
    with _session_lock(shared_dir, "trained_run"):
        if not record.exists():
            args = [*tiny_overrides, f"--workdir={workdir}"]
            done = run_module("resnet_jax.train", *args)
            assert done.returncode == 0, done.stderr[-3000:]
            record.write_text(
                json.dumps({"workdir": str(workdir), "args": args, "stderr": done.stderr})
            )
    run = json.loads(record.read_text())
    run["workdir"] = Path(run["workdir"])
    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the end-to-end tests slow, so that `-m "not slow"` is the fast tier; skip the tests
    that need tensorflow_datasets where it is not installed."""
    no_tfds = pytest.mark.skip(reason="tensorflow_datasets is not installed")
    for item in items:
        module = item.module.__name__.rpartition(".")[2]
        if module in END_TO_END_MODULES or TRAINING_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
        needs_tfds = item.get_closest_marker("tfds") or TFDS_FIXTURES & set(item.fixturenames)
        if needs_tfds and not HAS_TFDS:
            item.add_marker(no_tfds)
