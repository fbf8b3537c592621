"""A run's workdir: its lock, its run identity, its finished results, and restoring from it.

A workdir holds one run: a rerun of the same command resumes it, a config that would make another
run is refused, and a second process on it is refused while the first holds the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
from absl import logging

from resnet_jax import checkpoint, config_utils, parallel
from resnet_jax import train_state as ts
from resnet_jax.builders import make_plan
from resnet_jax.errors import ConfigError
from resnet_jax.reporting import RESULTS_FILE, read_results

# Config keys that make a run what it is: a workdir's checkpoints only resume a run that agrees.
RUN_IDENTITY_KEYS = ("model.", "dataset.name", "dataset.image_size", "dataset.val_fraction",
                     "batch_size", "seed")  # fmt: skip
# Except: where the starting weights came from, and the kernels (the same variables either way).
NOT_RUN_IDENTITY_KEYS = ("model.pretrained", "model.kernels")

LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold `workdir/.lock` for the run, so that a second run on the workdir is refused rather
    than interleaving its checkpoints and metrics with this one's. It is an flock: the kernel
    releases it when the process dies, so even a kill -9 leaves no stale lock. (With several
    processes only the main one locks: they share the workdir.)"""
    if not parallel.is_main_process():
        yield
        return
    path = workdir / LOCK_FILE
    try:
        lock = open(path, "a+")  # noqa: SIM115 (held until the run ends)
    except OSError as error:
        raise ConfigError(
            f"Cannot write to --workdir {workdir}: {error.strerror or error}. Pass a directory "
            "that can be written to."
        ) from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise ConfigError(
                f"Another run is using --workdir {workdir} ({holder} holds {path}). Two runs on "
                "one workdir would overwrite each other's checkpoints: wait for that run to end "
                "(or stop it; its checkpoints are kept), or use another --workdir."
            ) from None
        try:
            lock.truncate(0)
            lock.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            lock.flush()
        except OSError as error:  # a full disk shows first here
            raise ConfigError(
                f"Cannot write to --workdir {workdir}: {error.strerror or error}. Free disk space "
                "or pass another --workdir."
            ) from None
        yield


def prepare_workdir(workdir: str | Path) -> Path:
    """`workdir` as an absolute path, created; a ConfigError if it cannot be."""
    path = Path(workdir).expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(
            f"Cannot use --workdir {path}: {error.strerror or error}. Pass a directory that can "
            "be created and written to (it need not exist)."
        ) from None
    return path


def check_run_identity(
    saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict, workdir: Path
) -> None:
    """Refuse to resume a workdir's run with a config that makes a different run."""
    old, new = config_utils.flatten(saved), config_utils.flatten(config)
    differ = [
        key
        for key in new
        if key.startswith(RUN_IDENTITY_KEYS)
        and key not in NOT_RUN_IDENTITY_KEYS
        and old.get(key) != new[key]
    ]
    if differ:
        changes = ", ".join(f"{k} {old.get(k)!r} -> {new[k]!r}" for k in differ)
        raise ConfigError(
            f"The workdir {workdir} holds a run of {saved.model.name} on {saved.dataset.name} "
            f"that this config would not continue ({changes}). Use a new --workdir for the new "
            "run, or rerun with the workdir's own settings (its config.json) to resume it."
        )
    changed = [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]
    if changed:
        logging.warning("Resuming with changed settings: %s.", "; ".join(changed))


def check_same_pipeline(meta: dict[str, Any], pipeline: str, workdir: Path) -> None:
    """Refuse to resume a run in the other input pipeline: stream mode crops on the host, so its
    batches differ from memory mode's and the run would not continue as it started."""
    saved = meta.get("pipeline", "memory")  # checkpoints from before stream mode
    if saved != pipeline:
        raise ConfigError(
            f"The workdir {workdir} holds a run that read its data in {saved} mode, and this "
            f"config reads it in {pipeline} mode (dataset.pipeline), whose batches differ. Add "
            f"--config.dataset.pipeline={saved} to resume it, or use a new --workdir."
        )


def finished_results(
    config: ml_collections.ConfigDict, workdir: Path, checkpoints: checkpoint.Checkpoints
) -> dict[str, Any] | None:
    """The results of the workdir's run if it is finished (its config agreeing), else None."""
    newest = checkpoints.latest_meta()
    if newest is None:
        return None
    latest, meta = newest
    check_run_identity(config_utils.resolve(meta["config"]), config, workdir)
    total_steps = make_plan(config, meta["num_train_examples"]).total_steps
    results = read_results(workdir)
    if latest < total_steps or results is None:
        return None
    logging.info(
        "The run in %s is finished (step %d of %d); nothing to train. Its results (%s):",
        workdir, latest, total_steps, workdir / RESULTS_FILE,
    )  # fmt: skip
    log_results(results)
    return results


def log_results(results: dict[str, Any]) -> None:
    """The headline test figures."""
    logging.info(
        "Test (checkpoint step %s, epoch %s): loss %.4f, accuracy %.2f%%, macro precision %.4f, "
        "recall %.4f, F1 %.4f over %d examples.",
        results["checkpoint_step"], results["checkpoint_epoch"], results["test_loss"],
        100 * results["test_accuracy"], results["precision"], results["recall"], results["f1"],
        results["num_test_examples"],
    )  # fmt: skip


def reported_checkpoint(checkpoints: checkpoint.Checkpoints, selection: str) -> tuple[int, str]:
    """The checkpoint a run reports (results.json; evaluate, predict and export), per its
    results_checkpoint `selection`: "final" is the latest; "best_val" the best by validation
    accuracy, or (without a validation split) the latest, since picking by test accuracy would
    overstate it. Returns (step, why)."""
    if selection == "final":
        return checkpoints.latest_step(), "final (results_checkpoint = final)"
    best = checkpoints.best_step()
    if best is not None:
        return best, "best validation accuracy"
    return checkpoints.latest_step(), "latest (no validation split to pick the best)"


def restore(checkpoints: checkpoint.Checkpoints, step: int, target: Any) -> ts.TrainState:
    """The checkpoint at `step` (or the newest earlier one if it is damaged), or a ConfigError if
    its arrays do not fit this config's state."""
    try:
        return checkpoints.restore(step, target)
    except checkpoint.CheckpointError:
        raise  # damaged, with no earlier checkpoint: it explains itself
    except (ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise ConfigError(
            f"The checkpoint at step {step} in {checkpoints.directory} does not fit the state "
            f"this config builds ({reason}). Settings that shape the optimizer state "
            "(optimizer.name, optimizer.momentum 0 or not, weight_decay 0 or not, grad_clip_norm, "
            "model.freeze, ema.decay 0 or not) must match the run's config.json; or use a new "
            "--workdir."
        ) from None
