"""The training loop: epochs of compiled steps, their metrics, signals, divergence, evaluation
over a split and checkpoints.

`train(run, state, stop)` runs the epochs still to do; a SIGTERM/SIGINT saves a checkpoint at the
next step boundary and raises Interrupted; a NaN or infinite loss raises DivergedError with a
message that says what to change.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from resnet_jax import checkpoint, data, metrics, optim, parallel, profiling
from resnet_jax import train_state as ts
from resnet_jax.builders import REFERENCE_BATCH_SIZE, Plan, peak_learning_rate
from resnet_jax.errors import UserError
from resnet_jax.reporting import Progress, Reporter
from resnet_jax.workdir import chosen_checkpoint, chosen_weights


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}.")
        self.signum = signum
        self.step = step


class DivergedError(UserError):
    """The training loss or the parameters became NaN or infinite (in `epoch`, 1-based)."""

    def __init__(self, message: str, epoch: int | None = None):
        super().__init__(message)
        self.epoch = epoch


class StopSignal:
    """Turns SIGTERM/SIGINT into a request to save at the next step boundary and exit.

    A second signal gets the default behaviour back (exit at once; checkpoints on disk are never
    half-written). With several processes, they agree on stopping only at `sync` points (log
    steps and epoch ends), where all of them are.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # else Python cannot catch them
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        self.signum = signum
        self.__exit__()
        logging.warning(
            "Got %s: saving a checkpoint at the next step boundary, then exiting (send it "
            "again to exit at once).",
            signal.Signals(signum).name,
        )

    def requested(self, sync: bool) -> bool:
        """Whether to stop now; `sync` marks points every process reaches together."""
        if jax.process_count() == 1:
            return self.signum is not None
        if not sync:
            return False
        signums = multihost_utils.process_allgather(np.int32(self.signum or 0))
        self.signum = self.signum or int(np.max(signums)) or None
        return self.signum is not None


class LossNotFinite(Exception):
    """The `what` (the training loss, or the variables) was `value` (NaN or inf) at `step`."""

    def __init__(self, what: str, value: float, step: int):
        super().__init__(what, value, step)
        self.what, self.value, self.step = what, value, step


class TrainMetrics:
    """Training metrics of the steps since the last log, left on the device until `flush`."""

    def __init__(
        self,
        fetch: Any,
        reporter: Reporter,
        plan: Plan,
        progress: Progress,
        skipped_files: dict[str, str],
    ):
        self._fetch, self._reporter, self._plan, self._progress = fetch, reporter, plan, progress
        self._skipped_files = skipped_files  # the input's, growing as it meets unreadable files
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        self._clock = time.perf_counter()

    def start_epoch(self, sums: dict[str, float] | None = None) -> None:
        """Begin an epoch's means (from a checkpoint's partial sums when resuming mid-epoch)."""
        self.epoch_sums = dict(sums) if sums else {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        self._clock = time.perf_counter()  # evaluation time is not training throughput

    def add(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
        """Keep the metrics of step `step` (0-based) without waiting for the device."""
        self._pending.append((step, step_metrics))

    def flush(self) -> None:
        """Fetch the pending metrics (one device sync), check them, log a step record."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        rows = self._fetch([m for _, m in self._pending])
        self._pending = []
        losses = np.array([row["loss"] for row in rows], dtype=np.float64)
        not_finite = np.flatnonzero(~np.isfinite(losses))
        if not_finite.size:
            first = not_finite[0]
            raise LossNotFinite("training loss", float(losses[first]), steps[first] + 1)
        accuracy = float(np.sum([row["accuracy"] for row in rows]))
        self.epoch_sums["loss"] += float(losses.sum())
        self.epoch_sums["accuracy"] += accuracy
        self.epoch_sums["steps"] += len(rows)
        now = time.perf_counter()
        images_per_second = len(rows) * self._plan.batch_size / max(now - self._clock, 1e-9)
        self._clock = now
        done = steps[-1] + 1
        record = {
            "record": "step",
            "step": done,
            "epoch": done / self._plan.steps_per_epoch,
            "train_loss": float(losses.mean()),
            "train_accuracy": accuracy / len(rows),
            "learning_rate": float(rows[-1]["learning_rate"]),
            "images_per_second": images_per_second,
            "skipped_files": len(self._skipped_files),
        }
        self._reporter.write(record)
        self._progress.show(record)

    def epoch_means(self) -> dict[str, float]:
        steps = max(self.epoch_sums["steps"], 1)
        return {
            "train_loss": self.epoch_sums["loss"] / steps,
            "train_accuracy": self.epoch_sums["accuracy"] / steps,
        }


@dataclasses.dataclass
class Run:
    """What one training run is made of, built once from its config."""

    config: ml_collections.ConfigDict
    workdir: Path
    par: parallel.Parallel
    batches: data.Batches
    plan: Plan
    schedule: optim.Schedule
    input_shape: tuple[int, ...]
    normalization: dict[str, Any]  # builders.normalization's record: evaluation must reuse it
    checkpoints: checkpoint.Checkpoints
    reporter: Reporter
    train_step: Any  # compiled
    eval_step: Any  # compiled

    @property
    def eval_split_name(self) -> str:
        """Where each epoch is evaluated: "val", or "test" when there is no validation split."""
        return "val" if "val" in self.batches.split_sizes else "test"


def train(run: Run, state: ts.TrainState, stop: StopSignal) -> ts.TrainState:
    """The epochs still to do: train, evaluate, checkpoint. Returns the final state."""
    plan = run.plan
    first_step = int(jax.device_get(run.par.host_state(state).step))
    resumed = run.checkpoints.meta(first_step) if first_step else {}
    resumed_sums = resumed.get("epoch_train_sums")
    run.batches.skipped_files.update(resumed.get("skipped_files") or {})
    progress = Progress(plan.total_steps, first_step, enabled=parallel.is_main_process())
    train_metrics = TrainMetrics(
        run.par.fetch, run.reporter, plan, progress, run.batches.skipped_files
    )
    trace = profiling.StepTrace.for_run(run.config, run.workdir)
    try:
        for epoch in range(first_step // plan.steps_per_epoch, plan.num_epochs):
            epoch_start = epoch * plan.steps_per_epoch
            steps = range(
                max(first_step, epoch_start),
                min(epoch_start + plan.steps_per_epoch, plan.total_steps),
            )
            if not steps:
                continue  # finished (and evaluated) before a restart
            mid_epoch = steps.start > epoch_start
            train_metrics.start_epoch(resumed_sums if mid_epoch else None)
            progress.start_epoch(epoch, plan.num_epochs)
            state, stopped_at = train_epoch(
                run, state, epoch, steps, train_metrics, progress, stop, trace
            )
            if stopped_at is not None:
                save(run, state, epoch, epoch_train_sums=train_metrics.epoch_sums)
                raise Interrupted(stop.signum, stopped_at)
            end_epoch(run, state, epoch, train_metrics.epoch_means(), stop, progress)
    except LossNotFinite as bad:
        run.checkpoints.wait()
        message = diverged_message(bad, run.config, run.checkpoints.latest_step(), plan)
        raise DivergedError(message, epoch=diverged_epoch(bad, plan)) from None
    finally:
        trace.close()
        progress.close()
    return state


def train_epoch(
    run: Run,
    state: ts.TrainState,
    epoch: int,
    steps: range,
    train_metrics: TrainMetrics,
    progress: Progress,
    stop: StopSignal,
    trace: profiling.StepTrace,
) -> tuple[ts.TrainState, int | None]:
    """Run `steps` (0-based) of `epoch`, `trace` profiling those it was asked to. Returns the
    state, and the step count it stopped at if a signal asked it to (else None). The epoch's last
    step never stops: the epoch is evaluated first, so a checkpoint at an epoch's end always
    carries its validation accuracy."""
    batches = run.batches.train_batches(epoch, steps.start - epoch * run.plan.steps_per_epoch)
    for step, batch in zip(steps, on_devices(batches, run.par), strict=False):
        trace.before(step, state)
        state, step_metrics = run.train_step(state, batch)
        trace.after(step, state)
        train_metrics.add(step, step_metrics)
        progress.step()
        log_now = (step + 1) % run.config.log_every_steps == 0
        if log_now:
            train_metrics.flush()
        if step + 1 < steps.stop and stop.requested(sync=log_now):
            train_metrics.flush()
            return state, step + 1
    train_metrics.flush()
    return state, None


def end_epoch(
    run: Run,
    state: ts.TrainState,
    epoch: int,
    train_means: dict[str, float],
    stop: StopSignal,
    progress: Progress,
) -> None:
    """Evaluate (the EMA weights too, if any), record and log the epoch; checkpoint it when due
    (or stopping, or last)."""
    split = run.eval_split_name
    evaluations = evaluate_weights(run, state, split)
    raw = evaluations["raw"]
    step = int(jax.device_get(run.par.host_state(state).step))
    record = {
        "record": "epoch",
        "step": step,
        "epoch": epoch + 1,
        "steps_per_epoch": run.plan.steps_per_epoch,  # the last epoch may be cut short
        **train_means,
        f"{split}_loss": raw["loss"],
        f"{split}_accuracy": raw["accuracy"],
        "learning_rate": float(run.schedule(step - 1)),
        "skipped_files": len(run.batches.skipped_files),
    }
    if "ema" in evaluations:
        record[f"ema_{split}_loss"] = evaluations["ema"]["loss"]
        record[f"ema_{split}_accuracy"] = evaluations["ema"]["accuracy"]
    run.reporter.write(record)
    run.reporter.plot_curves()
    with progress.external_write():
        logging.info(
            "Epoch %d/%d (step %d): train loss %.4f, accuracy %.2f%%; %s loss %.4f, accuracy "
            "%.2f%%.",
            epoch + 1, run.plan.num_epochs, step, train_means["train_loss"],
            100 * train_means["train_accuracy"], split, raw["loss"], 100 * raw["accuracy"],
        )  # fmt: skip
        if "ema" in evaluations:
            logging.info(
                "Epoch %d EMA weights: %s loss %.4f, accuracy %.2f%%.",
                epoch + 1, split, evaluations["ema"]["loss"], 100 * evaluations["ema"]["accuracy"],
            )  # fmt: skip
    last = step == run.plan.total_steps
    stopping = stop.requested(sync=True)
    if last or stopping or (epoch + 1) % run.config.checkpoint_every_epochs == 0:
        # The best checkpoint is the best of the weights the run reports.
        chosen = evaluations[chosen_weights(run.config)]
        val_accuracy = chosen["accuracy"] if split == "val" else None
        save(run, state, epoch + 1, val_accuracy=val_accuracy)
    if stopping and not last:
        raise Interrupted(stop.signum, step)


def save(
    run: Run,
    state: ts.TrainState,
    epoch: int,
    *,
    val_accuracy: float | None = None,
    epoch_train_sums: dict[str, float] | None = None,
) -> None:
    """Start saving `state` (never a NaN one) with what evaluation and prediction need to know.

    `epoch`: the epochs completed; `epoch_train_sums`: a mid-epoch save's partial train sums,
    so that a resumed epoch reports the same means as an uninterrupted one.
    """
    step = int(jax.device_get(run.par.host_state(state).step))
    if not bool(_all_finite(state.variables)):
        raise LossNotFinite("parameters or BatchNorm statistics", math.nan, step)
    meta = {
        "epoch": epoch,
        "step": step,
        "config": run.config.to_dict(),
        "num_train_examples": run.plan.num_train_examples,
        "class_names": run.batches.class_names,
        "image_shape": list(run.batches.image_shape),  # (H, W, C): C = 1 for gray data
        "image_fit": run.batches.image_fit,
        "normalization": run.normalization,
        "pipeline": run.batches.pipeline,
        "epoch_train_sums": epoch_train_sums,
        # With the step, all a resumed input needs: its order follows from (seed, epoch, step).
        "skipped_files": dict(run.batches.skipped_files),
    }
    run.checkpoints.save(run.par.host_state(state), meta, val_accuracy)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def on_devices(batches: Iterable[data.Batch], par: parallel.Parallel) -> Iterator[dict[str, Any]]:
    """`batches` placed with the run's batch sharding, one ahead: the next batch's copy to the
    devices starts while the current step runs."""
    ahead = None
    for batch in batches:
        placed = par.shard_batch(batch)
        if ahead is not None:
            yield ahead
        ahead = placed
    if ahead is not None:
        yield ahead


def evaluate_split(
    eval_step: Any, state: ts.TrainState, batches: Iterable[data.Batch], par: parallel.Parallel
) -> dict[str, Any]:
    """Exact loss, accuracy and confusion matrix over a split's padded, masked `batches` (from
    `Batches.eval_batches`; the sums stay on the device)."""
    totals = None
    for batch in on_devices(batches, par):
        out = eval_step(state, batch)
        sums = {key: out[key] for key in ("loss_sum", "correct", "count", "confusion")}
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = par.fetch(totals)
    count = float(totals["count"])
    return {
        "loss": float(totals["loss_sum"]) / count,
        "accuracy": float(totals["correct"]) / count,
        "confusion": np.asarray(totals["confusion"], np.int64),
        "count": int(count),
    }


def evaluate_weights(run: Run, state: ts.TrainState, split: str) -> dict[str, Any]:
    """`evaluate_split` on `split` ("val" or "test") of the trained weights ("raw") and, for an
    EMA run, of their average ("ema")."""

    def on(weights: ts.TrainState) -> dict[str, Any]:
        return evaluate_split(run.eval_step, weights, run.batches.eval_batches(split), run.par)

    evaluations = {"raw": on(state)}
    if isinstance(state, ts.EmaTrainState):
        evaluations["ema"] = on(state.with_ema_weights())
    return evaluations


def summarize_test(evaluation: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """results.json's figures from `evaluate` on the test split."""
    report = metrics.classification_report(evaluation["confusion"], class_names)
    return {
        "test_loss": evaluation["loss"],
        "test_accuracy": report.pop("accuracy"),
        "num_test_examples": report.pop("num_examples"),
        **report,
    }


def final_results(run: Run, state: ts.TrainState) -> dict[str, Any]:
    """results.json: the chosen checkpoint's figures on the test split, from the chosen weights
    ("weights": "ema" or "raw"); an EMA run also reports both weights' test loss and accuracy."""
    run.checkpoints.wait()
    step, why = chosen_checkpoint(run.checkpoints, run.config.results_checkpoint)
    state = run.par.place_state(
        run.checkpoints.restore(step, run.par.restore_target(run.par.host_state(state)))
    )
    step = int(jax.device_get(run.par.host_state(state).step))  # an earlier one if it was damaged
    epoch = run.checkpoints.meta(step)["epoch"]
    weights = chosen_weights(run.config)
    logging.info(
        "Testing the checkpoint at step %d (epoch %d, %s), %s weights.", step, epoch, why, weights
    )
    evaluations = evaluate_weights(run, state, "test")
    both = {
        f"{name}_test_{key}": evaluation[key]
        for name, evaluation in evaluations.items()
        for key in ("loss", "accuracy")
        if len(evaluations) > 1
    }
    return {
        **summarize_test(evaluations[weights], run.batches.class_names),
        "weights": weights,
        **both,
        "checkpoint_step": step,
        "checkpoint_epoch": epoch,
        "checkpoint_selection": why,
        "model": run.config.model.name,
        "dataset": run.config.dataset.name,
        "skipped_files": len(run.batches.skipped_files),
    }


def diverged_epoch(bad: LossNotFinite, plan: Plan) -> int:
    """The (1-based) epoch of the step at which training diverged."""
    return (bad.step - 1) // plan.steps_per_epoch + 1


def diverged_message(
    bad: LossNotFinite, config: ml_collections.ConfigDict, latest: int | None, plan: Plan
) -> str:
    """One paragraph: where training diverged, what was kept, and what to change."""
    kept = (
        f"The last good checkpoint (step {latest}) stays the latest"
        if latest is not None
        else "No checkpoint had been saved yet"
    )
    return (
        f"Training diverged: the {bad.what} became {bad.value} at step {bad.step} (epoch "
        f"{diverged_epoch(bad, plan)}). {kept}, and no results.json was written. "
        f"Lower optimizer.learning_rate (now {config.optimizer.learning_rate:g} per "
        f"{REFERENCE_BATCH_SIZE} images, a peak of {peak_learning_rate(config):g}), lengthen "
        "schedule.warmup_epochs, set optimizer.grad_clip_norm (e.g. 1.0) or turn off "
        "half_precision, then rerun: the same --workdir resumes from the last good checkpoint."
    )
