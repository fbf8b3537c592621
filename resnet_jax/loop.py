"""One training run, top to bottom: `train_and_evaluate(config, workdir)`.

Set-up: validate the config, lock the workdir, load the data, plan the run (every check of the
batch arithmetic is there), build the model, preprocessing, schedule, optimizer and steps, then
start from the latest checkpoint or a fresh (or pretrained) state, and compile. Training: epochs of
compiled steps whose metrics stay on the device until every `log_every_steps`; each epoch is
evaluated (validation split, else test) and checkpointed. Results: the checkpoint the run reports
(`workdir.reported_checkpoint`) is tested on the test split into results.json.

Rerunning the same command on the same workdir resumes exactly (same step, optimizer state, rng
and batch order); a finished run only reports. A SIGTERM/SIGINT saves a checkpoint at the next
step boundary and raises Interrupted; a NaN or infinite loss raises DivergedError, whose message
says what to change.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from resnet_jax import (
    builders,
    checkpoint,
    config_utils,
    data,
    evaluation,
    models,
    parallel,
    profiling,
)
from resnet_jax import train_state as ts
from resnet_jax.builders import Plan
from resnet_jax.errors import UserError
from resnet_jax.reporting import Progress, Reporter
from resnet_jax.workdir import (
    check_same_pipeline,
    finished_results,
    log_results,
    prepare_workdir,
    reported_checkpoint,
    restore,
    workdir_lock,
)

# ---------------------------------------------------------------------------------------------
# The run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train per `config` in `workdir`, resuming what is there, and return the test results.

    Raises an errors.UserError (ConfigError, DataError, parallel.ParallelError, ...) for what the
    user can fix, DivergedError if the loss or parameters become NaN/inf, and Interrupted on
    SIGTERM/SIGINT (after saving a checkpoint).
    """
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    parallel.check_processes_agree(json.dumps(given, sort_keys=True, default=repr), workdir)
    config = config_utils.resolve(config)
    workdir = prepare_workdir(workdir)
    builders.enable_compilation_cache(config)
    # Signals are caught from here on, so one that arrives while compiling stops at step one.
    with workdir_lock(workdir), StopSignal() as stop:
        checkpoints = builders.open_checkpoints(config, workdir)
        try:
            results = finished_results(config, workdir, checkpoints)
            if results is not None:
                return results
            run, state, step = set_up(config, workdir, checkpoints)
            try:
                state = train(run, state, step, stop)
                results = final_results(run, state)
                run.reporter.write_results(results)
            finally:
                run.reporter.close()
            log_results(results)
            return results
        finally:
            checkpoints.close()  # waits for saves in flight: a started save is never lost


@dataclasses.dataclass(frozen=True, kw_only=True)
class Run:
    """What the loop reads, built once by `set_up`."""

    plan: Plan
    batches: data.Batches
    par: parallel.Parallel
    train_step: Callable[..., Any]  # compiled: (state, batch) -> (state, metrics)
    eval_step: Callable[..., Any]  # compiled: (variables, batch) -> sums
    checkpoints: checkpoint.Checkpoints
    reporter: Reporter
    # What every checkpoint records beside its step: what evaluate, predict and export read.
    checkpoint_meta: dict[str, Any]

    @property
    def eval_split(self) -> str:
        """Where each epoch is evaluated: "val", or "test" when there is no validation split."""
        return "val" if "val" in self.batches.split_sizes else "test"


def set_up(
    config: ml_collections.ConfigDict, workdir: Path, checkpoints: checkpoint.Checkpoints
) -> tuple[Run, ts.TrainState, int]:
    """The run's data, plan, model, steps and state (fresh or the latest saved), placed on the
    devices; and the step it starts from."""
    par = builders.build_parallel(config)
    batches = builders.load_batches(config)
    latest = checkpoints.latest_step()
    saved = {} if latest is None else checkpoints.meta(latest)
    if latest is not None:
        check_same_pipeline(saved, batches.pipeline, workdir)
    plan = builders.make_plan(
        config, batches.split_sizes["train"], par.num_devices, resuming=latest is not None
    )
    builders.log_plan(config, batches, plan, par.num_devices)

    model = builders.build_model(config, len(batches.class_names), par.axis_name)
    normalization = builders.normalization(config, batches, saved.get("normalization"))
    preprocess, input_shape = builders.build_preprocess(config, batches.image_shape, normalization)
    schedule = builders.build_schedule(config, plan)
    tx = builders.build_optimizer(config, schedule, model.frozen_stages)
    new_state = functools.partial(builders.create_state, config, model, tx, input_shape)
    if latest is None:
        state = new_state(builders.pretrained_variables(config, model, input_shape))
    else:
        # Restoring needs only the state's shapes: eval_shape skips initializing (and compiling).
        state = restore(checkpoints, latest, par.restore_target(jax.eval_shape(new_state)))
    step = int(jax.device_get(state.step))  # an earlier one if the latest was damaged
    if step:
        logging.info("Resuming from the checkpoint at step %d.", step)
    logging.info(
        "Model %s: %s parameters, input %s.",
        plan.model, f"{models.count_params(state.params):,}", input_shape[1:],
    )  # fmt: skip
    state = par.place_state(state)

    reporter = Reporter(workdir, enabled=parallel.is_main_process())
    reporter.write_config(config_utils.to_json(config))
    reporter.keep_history_until(step)  # later records are trained again
    train_step = builders.build_train_step(config, preprocess, schedule, par.axis_name)
    eval_step = ts.EvalStep(model.apply, preprocess, par.axis_name)
    compiled_train, compiled_eval = builders.compile_steps(
        par, state, train_step, eval_step, plan, batches.image_shape
    )
    checkpoint_meta = {
        "config": config.to_dict(),
        "num_train_examples": plan.num_train_examples,
        "class_names": batches.class_names,
        "image_shape": list(batches.image_shape),  # (H, W, C): C = 1 for gray data
        "image_fit": batches.image_fit,
        "normalization": normalization,
        "pipeline": batches.pipeline,
    }
    run = Run(
        plan=plan, batches=batches, par=par, train_step=compiled_train,
        eval_step=compiled_eval, checkpoints=checkpoints, reporter=reporter,
        checkpoint_meta=checkpoint_meta,
    )  # fmt: skip
    return run, state, step


# ---------------------------------------------------------------------------------------------
# Training


def train(run: Run, state: ts.TrainState, step: int, stop: StopSignal) -> ts.TrainState:
    """The epochs still to do, from `step` (the state's, on the host): train, evaluate,
    checkpoint. Returns the final state."""
    plan = run.plan
    resumed = run.checkpoints.meta(step) if step else {}
    run.batches.skipped_files.update(resumed.get("skipped_files") or {})
    progress = Progress(plan.total_steps, step, enabled=parallel.is_main_process())
    train_metrics = TrainMetrics(
        run.par.fetch, run.reporter, plan, progress, run.batches.skipped_files
    )
    trace = profiling.StepTrace.in_workdir(run.reporter.workdir, *plan.profile_steps)
    try:
        for epoch in range(step // plan.steps_per_epoch, plan.num_epochs):
            epoch_end = min((epoch + 1) * plan.steps_per_epoch, plan.total_steps)
            if step == epoch_end:
                continue  # finished (and evaluated) before a restart
            mid_epoch = step > epoch * plan.steps_per_epoch
            train_metrics.start_epoch(resumed.get("epoch_train_sums") if mid_epoch else None)
            progress.start_epoch(epoch, plan.num_epochs)
            batches = run.batches.train_batches(epoch, step - epoch * plan.steps_per_epoch)
            for batch in evaluation.on_devices(batches, run.par):
                trace.before(step, state)
                state, step_metrics = run.train_step(state, batch)
                trace.after(step, state)
                train_metrics.add(step, step_metrics)
                step += 1
                progress.step()
                log_now = step % plan.log_every_steps == 0
                if log_now:
                    train_metrics.flush()
                if step < epoch_end and stop.requested(sync=log_now):
                    train_metrics.flush()
                    save(run, state, step, epoch, epoch_train_sums=train_metrics.epoch_sums)
                    raise Interrupted(stop.signum, step)
            train_metrics.flush()
            end_epoch(run, state, step, epoch, train_metrics.epoch_means(), stop, progress)
    except LossNotFinite as bad:
        run.checkpoints.wait()
        message = diverged_message(bad, plan, run.checkpoints.latest_step())
        raise DivergedError(message, epoch=diverged_epoch(bad, plan)) from None
    finally:
        trace.close()
        progress.close()
    return state


def end_epoch(
    run: Run,
    state: ts.TrainState,
    step: int,
    epoch: int,
    train_means: dict[str, float],
    stop: StopSignal,
    progress: Progress,
) -> None:
    """After `epoch` (0-based), at `step`: evaluate (the EMA weights too, if any), record and log
    the epoch; checkpoint it when due (or stopping, or last)."""
    split = run.eval_split
    evaluations = evaluate_weights(run, state, split)
    raw = evaluations["raw"]
    record = {
        "record": "epoch",
        "step": step,
        "epoch": epoch + 1,
        "steps_per_epoch": run.plan.steps_per_epoch,  # the last epoch may be cut short
        **train_means,
        f"{split}_loss": raw["loss"],
        f"{split}_accuracy": raw["accuracy"],
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
    if last or stopping or (epoch + 1) % run.plan.checkpoint_every_epochs == 0:
        # The best checkpoint is the best of the weights the run reports.
        reported = evaluations[run.plan.reported_weights]
        val_accuracy = reported["accuracy"] if split == "val" else None
        save(run, state, step, epoch + 1, val_accuracy=val_accuracy)
    if stopping and not last:
        raise Interrupted(stop.signum, step)


def save(
    run: Run,
    state: ts.TrainState,
    step: int,
    epoch: int,
    *,
    val_accuracy: float | None = None,
    epoch_train_sums: dict[str, float] | None = None,
) -> None:
    """Start saving `state` at `step` (never a NaN one) with what evaluation and prediction need.

    `epoch`: the epochs completed; `epoch_train_sums`: a mid-epoch save's partial train sums,
    so that a resumed epoch reports the same means as an uninterrupted one.
    """
    if not bool(_all_finite(state.variables)):
        raise LossNotFinite("parameters or BatchNorm statistics", math.nan, step)
    meta = {
        **run.checkpoint_meta,
        "epoch": epoch,
        "step": step,
        "epoch_train_sums": epoch_train_sums,
        # With the step, all a resumed input needs: its order follows from (seed, epoch, step).
        "skipped_files": dict(run.batches.skipped_files),
    }
    run.checkpoints.save(run.par.host_state(state), meta, val_accuracy)


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def evaluate_weights(run: Run, state: ts.TrainState, split: str) -> dict[str, Any]:
    """`evaluation.evaluate_split` on `split` ("val" or "test") of the trained weights ("raw")
    and, for an EMA run, of their average ("ema")."""
    weights = {"raw": state.variables}
    if isinstance(state, ts.EmaTrainState):
        weights["ema"] = state.ema_variables
    return {
        name: evaluation.evaluate_split(
            run.eval_step, variables, run.batches.eval_batches(split), run.par
        )
        for name, variables in weights.items()
    }


# ---------------------------------------------------------------------------------------------
# Results


def final_results(run: Run, state: ts.TrainState) -> dict[str, Any]:
    """results.json: the reported checkpoint's figures on the test split, from the reported
    weights ("weights": "ema" or "raw"); an EMA run also reports both weights' test loss and
    accuracy."""
    run.checkpoints.wait()
    step, why = reported_checkpoint(run.checkpoints, run.plan.results_checkpoint)
    host = run.checkpoints.restore(step, run.par.restore_target(run.par.host_state(state)))
    step = int(jax.device_get(host.step))  # an earlier one if it was damaged
    state = run.par.place_state(host)
    epoch = run.checkpoints.meta(step)["epoch"]
    weights = run.plan.reported_weights
    logging.info(
        "Testing the checkpoint at step %d (epoch %d, %s), %s weights.", step, epoch, why, weights
    )
    evaluations = evaluate_weights(run, state, "test")
    both = {
        f"{name}_test_{key}": figures[key]
        for name, figures in evaluations.items()
        for key in ("loss", "accuracy")
        if len(evaluations) > 1
    }
    return {
        **evaluation.summarize_test(evaluations[weights], run.batches.class_names),
        "weights": weights,
        **both,
        "checkpoint_step": step,
        "checkpoint_epoch": epoch,
        "checkpoint_selection": why,
        "model": run.plan.model,
        "dataset": run.plan.dataset,
        "skipped_files": len(run.batches.skipped_files),
    }


# ---------------------------------------------------------------------------------------------
# Metrics, signals and divergence


class TrainMetrics:
    """Training metrics of the steps since the last log, left on the device until `flush`."""

    def __init__(
        self,
        fetch: Callable[[Any], Any],
        reporter: Reporter,
        plan: Plan,
        progress: Progress,
        skipped_files: dict[str, str],
    ):
        self._fetch, self._reporter, self._plan, self._progress = fetch, reporter, plan, progress
        self._skipped_files = skipped_files  # the input's, growing as it meets unreadable files
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []
        self.epoch_sums = {"loss": 0.0, "accuracy": 0.0, "steps": 0}
        self.learning_rate = math.nan  # of the last step flushed
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
        self.learning_rate = float(rows[-1]["learning_rate"])
        record = {
            "record": "step",
            "step": done,
            "epoch": done / self._plan.steps_per_epoch,
            "train_loss": float(losses.mean()),
            "train_accuracy": accuracy / len(rows),
            "learning_rate": self.learning_rate,
            "images_per_second": images_per_second,
            "skipped_files": len(self._skipped_files),
        }
        self._reporter.write(record)
        self._progress.show(record)

    def epoch_means(self) -> dict[str, float]:
        """The epoch's mean train loss and accuracy, and the rate its last step trained at."""
        steps = max(self.epoch_sums["steps"], 1)
        return {
            "train_loss": self.epoch_sums["loss"] / steps,
            "train_accuracy": self.epoch_sums["accuracy"] / steps,
            "learning_rate": self.learning_rate,
        }


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint at `step`."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"Stopped by {signal.Signals(signum).name} at step {step}.")
        self.signum = signum
        self.step = step


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


class DivergedError(UserError):
    """The training loss or the parameters became NaN or infinite (in `epoch`, 1-based)."""

    def __init__(self, message: str, epoch: int | None = None):
        super().__init__(message)
        self.epoch = epoch


def diverged_epoch(bad: LossNotFinite, plan: Plan) -> int:
    """The (1-based) epoch of the step at which training diverged."""
    return (bad.step - 1) // plan.steps_per_epoch + 1


def diverged_message(bad: LossNotFinite, plan: Plan, latest: int | None) -> str:
    """One paragraph: where training diverged, what was kept, and what to change."""
    kept = (
        f"The last good checkpoint (step {latest}) stays the latest"
        if latest is not None
        else "No checkpoint had been saved yet"
    )
    return (
        f"Training diverged: the {bad.what} became {bad.value} at step {bad.step} (epoch "
        f"{diverged_epoch(bad, plan)}). {kept}, and no results.json was written. "
        f"Lower optimizer.learning_rate (now {plan.learning_rate:g} per "
        f"{builders.REFERENCE_BATCH_SIZE} images, a peak of {plan.peak_learning_rate:g}), "
        "lengthen schedule.warmup_epochs, set "
        "optimizer.grad_clip_norm (e.g. 1.0) or turn off half_precision, then rerun: the same "
        "--workdir resumes from the last good checkpoint."
    )
