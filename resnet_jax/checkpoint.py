"""A run's checkpoints: orbax's CheckpointManager keeping the latest few and the best.

Each checkpoint holds two items: `state`, the TrainState's arrays (step, params, opt_state,
batch_stats, rng; its static fields are code, rebuilt from the config), and `meta`, a JSON dict
(epoch, the resolved config, class names, ...) that can be read without touching the arrays.
Saving is asynchronous: `save` returns once the arrays are copied off the devices and the files
are written in the background. Writes are atomic, so a run killed mid-save keeps its earlier
checkpoints (orbax writes into a `STEP.orbax-checkpoint-tmp-*` directory, which it never lists as
a checkpoint, and renames it when complete; a training run's `Checkpoints` removes such leftovers
when it opens the directory, and creates the directory only with its first save, so a run that
fails before that leaves no empty one behind). A complete checkpoint that is later damaged (a
truncated or deleted array file, unreadable metadata) is set aside into `corrupt_checkpoints/`
next to the directory on restore, and the previous one restored instead. A write that fails (a
full disk), in the save call or later in orbax's background threads, raises a CheckpointError
naming the failed step and the last complete one.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from orbax.checkpoint import checkpoint_managers as policies

from resnet_jax.errors import UserError

BEST_METRIC = "val_accuracy"
UNFINISHED_SAVES = "*.orbax-checkpoint-tmp*"  # where orbax writes a save until it is complete


def _best_metric(metrics: dict[str, float]) -> float:
    return metrics[BEST_METRIC]


def _on_one_device(metadata: Any) -> jax.ShapeDtypeStruct:
    # An explicit device: without one orbax restores onto the device layout the checkpoint was
    # saved from, which fails ("topology mismatch") when that had more devices than this process.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(metadata.shape, metadata.dtype, sharding=device)


def _is_abandoned_read(unraisable: Any) -> bool:
    return getattr(unraisable.object, "__name__", "") == "_read_array_index_and_device_put" or (
        isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"
    )


def _not_an_abandoned_task(record: logging.LogRecord) -> bool:
    return not record.getMessage().partition("\n")[0].endswith("exception was never retrieved")


@contextlib.contextmanager
def quiet_abandoned_reads() -> Iterator[None]:
    """Orbax reads a checkpoint's arrays in concurrent tasks on a short-lived event loop. When
    one read fails (a damaged checkpoint), orbax raises that error, and the other failed reads
    are reported as tracebacks: by asyncio's logger ("Task exception was never retrieved") and
    as unraisable exceptions (when a coroutine is collected, or when TensorStore finishes a read
    after the loop closed). Inside this block those reports are dropped; the error orbax raises
    is handled by the caller, and other unraisable exceptions show as before. TensorStore can
    finish a failed restore's reads after the block has ended, so once a read has failed (the
    block raised) the reports stay dropped for the rest of the process."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_reads", False):  # a failed read installed it for good
        yield
        return

    def hook(unraisable: Any) -> None:
        if not _is_abandoned_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_reads = True
    sys.unraisablehook = hook
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addFilter(_not_an_abandoned_task)
    yield  # an exception leaves the hook and the filter installed
    sys.unraisablehook = previous
    asyncio_logger.removeFilter(_not_an_abandoned_task)


def error_reason(error: Exception) -> str:
    """A failed read's error in one short line (TensorStore appends its whole spec)."""
    text = getattr(error, "reason", "") or str(error).split(" See full TensorStore details")[0]
    return " ".join(text.split())[:200]


def _not_missing_metric_warning(record: logging.LogRecord) -> bool:
    # Orbax warns on every save without metrics; ours are deliberate (mid-epoch saves, runs
    # without a validation split), so the warning would only alarm.
    return "did not provide metrics" not in record.getMessage()


def _write_error_without_traceback(record: logging.LogRecord) -> bool:
    # Orbax's background threads log a failed write (a full disk) with its traceback, then the
    # error reaches `Checkpoints`, which explains it in one paragraph: keep orbax's line only.
    if record.exc_info and isinstance(record.exc_info[1], OSError) and "orbax" in record.pathname:
        record.exc_info = record.exc_text = None
    return True


class CheckpointError(UserError):
    """No usable checkpoint could be restored; the message says what was found and what to do."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason  # for a damaged checkpoint: what did not read back, in a few words


class Checkpoints:
    """The checkpoints in `directory`: the latest `keep`, plus the best by validation accuracy.

    One manager with two preservation rules (a checkpoint survives if either keeps it) rather than
    a second manager for "best": the best state is written once, and which step is best lives in
    orbax's own per-checkpoint metrics, so it survives restarts without bookkeeping of ours.
    Checkpoints saved without a validation accuracy (mid-epoch, or runs without a validation
    split) are kept only while they are among the latest.

    `read_only` (evaluation, prediction) saves nothing and leaves the directory as it is, even
    an unfinished save that a live run is still writing; otherwise the directory is the run's.
    """

    def __init__(self, directory: str | Path, keep: int = 2, *, read_only: bool = False):
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep),
                policies.BestN(
                    get_metric_fn=_best_metric, n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            best_fn=_best_metric,  # makes the manager record metrics and rank by them
            best_mode="max",
            preservation_policy=preservation,
            enable_async_checkpointing=True,
            read_only=read_only,
            create=False,  # the first save creates it: a run that fails before leaves none
        )
        absl_logging.get_absl_logger().addFilter(_not_missing_metric_warning)
        absl_logging.get_absl_logger().addFilter(_write_error_without_traceback)
        self.directory = Path(directory).absolute()
        if not read_only and jax.process_index() == 0:
            self._remove_unfinished_saves()
        self._last_started: int | None = None  # the newest save, which may still be writing
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def _remove_unfinished_saves(self) -> None:
        """Delete what a killed or failed save left (STEP.orbax-checkpoint-tmp-*): orbax never
        lists it, and nothing else would ever remove it. (orbax's cleanup_tmp_directories option
        does this in a background thread, which a run that fails at once interrupts with a
        traceback at exit.)"""
        for leftover in self.directory.glob(UNFINISHED_SAVES):
            shutil.rmtree(leftover, ignore_errors=True)
            absl_logging.info("Removed %s, left by a save that did not finish.", leftover)

    def latest_step(self) -> int | None:
        """The newest checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest validation accuracy, or None if no checkpoint has one."""
        return self._manager.best_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: Any, meta: dict[str, Any], val_accuracy: float | None = None) -> None:
        """Start saving `state` (host layout: `Parallel.host_state`) at its step, in the background.

        Every process must call this (orbax writes collectively). A step already saved is skipped.
        """
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        metrics = None if val_accuracy is None else {BEST_METRIC: float(val_accuracy)}
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                metrics=metrics,
                force=True,  # the training loop decides when to save, not orbax's interval
            )
        except OSError as error:  # a full disk, a read-only or vanished directory
            raise self._save_error(self._failed_step(step), error) from None
        self._last_started = step

    def _failed_step(self, step: int) -> int:
        """Which save an OSError belongs to: orbax raises a background write's error at the next
        save or wait, so it is the previous save's if that one never completed on disk."""
        previous = self._last_started
        if previous is not None and not (self.directory / str(previous)).is_dir():
            return previous
        return step

    def _save_error(self, step: int, error: OSError) -> CheckpointError:
        complete = [
            s for s in self._manager.all_steps() if s < step and (self.directory / str(s)).is_dir()
        ]
        kept = (
            f"the latest complete checkpoint (step {max(complete)}) is intact and the rerun "
            "resumes from it"
            if complete
            else "no earlier checkpoint exists, so the rerun starts over"
        )
        return CheckpointError(
            f"Cannot save the checkpoint at step {step} in {self.directory}: "
            f"{error.strerror or error}. Free disk space or make the directory writable, then "
            f"rerun the same command: {kept}."
        )

    def meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata saved with `step`; a CheckpointError if it does not read back."""
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            return dict(restored.meta)
        except Exception as error:
            raise self._damaged(step, "metadata", error) from None

    def latest_meta(self) -> tuple[int, dict[str, Any]] | None:
        """(step, metadata) of the newest checkpoint, or None when there is none. A checkpoint
        whose metadata does not read is set aside as in `restore`, and the one before tried."""
        step = self.latest_step()
        while step is not None:
            try:
                return step, self.meta(step)
            except CheckpointError as error:
                step = self._set_aside(step, error)
        return None

    def restore(self, step: int, target: Any) -> Any:
        """The state saved at `step`, laid out as `target` says (abstract arrays with shardings,
        e.g. `Parallel.restore_target`), whatever device count it was saved from.

        If the checkpoint at `step` is damaged (its own arrays or its metadata cannot be read
        back), it is set aside with an error in the log and the newest earlier checkpoint is
        restored instead: the returned state's `step` says which. A checkpoint that is intact but
        does not fit `target` raises the restore's own error (ValueError/KeyError), as before.
        """
        while True:
            try:
                with quiet_abandoned_reads():
                    state = self._restore_state(step, target)
                self.meta(step)  # resuming needs it too: a checkpoint is usable only whole
                return state
            except Exception as error:
                if self._readable(step):
                    raise  # intact: `target` does not fit it
                step = self._set_aside(step, error)

    def _restore_state(self, step: int, target: Any) -> Any:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
        return restored.state

    def _readable(self, step: int) -> bool:
        """Whether `step`'s arrays read back as saved (onto one device), and its metadata."""
        try:
            with quiet_abandoned_reads():
                self._restore_as_saved(step)
            self.meta(step)
            return True
        except Exception:
            return False

    def _restore_as_saved(self, step: int) -> dict[str, Any]:
        """`step`'s arrays with the structure, shapes and dtypes they were saved with, on this
        process's first device, whatever device count saved them."""
        saved = self._manager.item_metadata(step).state
        return self._restore_state(step, jax.tree.map(_on_one_device, dict(saved)))

    def _damaged(self, step: int, what: str, error: Exception) -> CheckpointError:
        reason = f"its {what} cannot be read back ({error_reason(error)})"
        return CheckpointError(
            f"The checkpoint at step {step} in {self.directory} is damaged: {reason}. Use an "
            f"earlier checkpoint (ls {self.directory} lists them; pass --checkpoint "
            f"{self.directory}/STEP). If the run is unfinished, rerunning its training command "
            "sets the damaged checkpoint aside and resumes from the one before.",
            reason,
        )

    def _set_aside(self, step: int, error: Exception) -> int:
        """Move the damaged checkpoint `step` out of the manager's sight; the step to try next."""
        aside = self.directory.parent / "corrupt_checkpoints" / f"{step}-{int(time.time())}"
        aside.parent.mkdir(parents=True, exist_ok=True)
        (self.directory / str(step)).rename(aside)
        self._manager.reload()
        earlier = [s for s in self._manager.all_steps() if s < step]
        reason = error_reason(error)
        if not earlier:
            raise CheckpointError(
                f"The checkpoint at step {step} in {self.directory} is damaged ({reason}) and "
                f"there is no earlier one; it was moved to {aside}. Rerun to start the run over, "
                "or restore the checkpoint from a backup."
            ) from None
        absl_logging.error(
            "The checkpoint at step %d in %s is damaged and cannot be restored (%s). Moved it to "
            "%s; falling back to the previous checkpoint, at step %d.",
            step, self.directory, reason, aside, max(earlier),
        )  # fmt: skip
        return max(earlier)

    def restore_variables(self, step: int, *, ema: bool = False) -> dict[str, Any]:
        """{"params", "batch_stats"} of `step` as host numpy arrays, with no state to restore
        into: for evaluation and prediction, which need neither the optimizer nor a mesh. With
        `ema`, the moving average of the weights that an EMA run saves beside them."""
        try:
            with quiet_abandoned_reads():
                state = self._restore_as_saved(step)
        except Exception as error:
            raise self._damaged(step, "arrays", error) from None
        prefix = "ema_" if ema else ""
        return {
            "params": jax.tree.map(np.asarray, state[f"{prefix}params"]),
            "batch_stats": jax.tree.map(np.asarray, state.get(f"{prefix}batch_stats") or {}),
        }

    def wait(self) -> None:
        """Block until every save started so far is on disk; a CheckpointError if one failed."""
        try:
            self._manager.wait_until_finished()
        except OSError as error:
            raise self._save_error(self._last_started, error) from None

    def close(self) -> None:
        """Finish pending saves and release the manager's threads."""
        try:
            self._manager.close()
        except OSError as error:
            raise self._save_error(self._last_started, error) from None
