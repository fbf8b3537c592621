"""Training: `train_and_evaluate(config, workdir)` and its command line.

    python -m resnet_jax.train --config configs/r50.py --workdir workdir/r50 [--config.KEY=VALUE]

A run validates its config, loads the dataset into host memory, builds the model, schedule and
optimizer the config names, compiles the train and eval steps once, then for each epoch trains
(metrics stay on the device until every `log_every_steps`), evaluates on the validation split and
saves a checkpoint. At the end the best checkpoint by validation accuracy is evaluated on the test
split (results.json). Rerunning the same command on the same workdir resumes from the latest
checkpoint exactly (same step, optimizer state, rng and batch order); a finished run only reports.

Exit status: 0 done; 1 a mistake the message explains (bad config, missing data, ...); 130 or 143
stopped by SIGINT or SIGTERM after saving a checkpoint (128 + the signal number, as shells and
schedulers report a signal), so rerun the command to resume.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from resnet_jax import builders, checkpoint, config_utils, data, loop, models, parallel
from resnet_jax import train_state as ts
from resnet_jax.errors import ConfigError
from resnet_jax.reporting import Reporter
from resnet_jax.workdir import (
    check_same_pipeline,
    chosen_weights,
    finished_results,
    log_results,
    prepare_workdir,
    restore,
    workdir_lock,
)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Train per `config` in `workdir`, resuming what is there, and return the test results.

    Raises an errors.UserError (ConfigError, DataError, parallel.ParallelError, ...) for what the
    user can fix, DivergedError if the loss or parameters become NaN/inf, and loop.Interrupted on
    SIGTERM/SIGINT (after saving a checkpoint).
    """
    parallel.check_processes_agree(config, workdir)
    config = config_utils.resolve(config)
    workdir = prepare_workdir(workdir)
    builders.enable_compilation_cache(config.compilation_cache_dir)
    # Signals are caught from here on, so one that arrives while compiling stops at step one.
    with workdir_lock(workdir), loop.StopSignal() as stop:
        checkpoints = checkpoint.Checkpoints(workdir / "checkpoints", keep=config.keep_checkpoints)
        try:
            results = finished_results(config, workdir, checkpoints)
            if results is not None:
                return results
            run, state = setup(config, workdir, checkpoints)
            try:
                state = loop.train(run, state, stop)
                results = loop.final_results(run, state)
                run.reporter.write_results(results)
            finally:
                run.reporter.close()
            log_results(results)
            return results
        finally:
            checkpoints.close()  # waits for saves in flight: a started save is never lost


def setup(
    config: ml_collections.ConfigDict, workdir: Path, checkpoints: checkpoint.Checkpoints
) -> tuple[loop.Run, ts.TrainState]:
    """Data, model, optimizer and compiled steps, and the state: fresh or the latest saved."""
    par = parallel.Parallel(config.parallel)
    try:
        parallel.check_batch_size(config.batch_size, par.num_devices)
        parallel.check_batch_size(config.eval_batch_size, par.num_devices, name="eval_batch_size")
    except parallel.ParallelError as error:
        if checkpoints.latest_step() is None:
            raise
        # A resume cannot take another batch size: it would not continue the same run.
        raise parallel.ParallelError(
            f"{workdir} holds a run with batch_size {config.batch_size} and eval_batch_size "
            f"{config.eval_batch_size}, which do not both divide over the {par.num_devices} "
            "devices here. Resume it on a device count that divides both (or set eval_batch_size "
            "alone), or start a new --workdir with other batch sizes."
        ) from error
    parallel.check_micro_batch_size(
        config.batch_size, config.optimizer.grad_accumulation_steps, par.num_devices
    )
    batches = builders.load_batches(config)
    latest = checkpoints.latest_step()
    saved = {} if latest is None else checkpoints.meta(latest)
    if latest is not None:
        check_same_pipeline(saved, batches.pipeline, workdir)
    plan = builders.make_plan(config, batches.split_sizes["train"])
    log_plan(config, batches, plan, par)

    model = builders.build_model(config, len(batches.class_names), par.axis_name)
    normalization = builders.normalization(config, batches, saved.get("normalization"))
    preprocess, input_shape = builders.build_preprocess(config, batches.image_shape, normalization)
    schedule = builders.build_schedule(config, plan)
    tx = builders.build_optimizer(config, schedule, model.frozen_stages)
    new_state = functools.partial(
        builders.create_state, config, model, tx, schedule, preprocess, input_shape
    )
    if latest is None:
        state, resumed_step = (
            new_state(builders.pretrained_variables(config, model, input_shape)),
            0,
        )
    else:
        # Restoring needs only the state's shapes: eval_shape skips initializing (and compiling).
        state = restore(checkpoints, latest, par.restore_target(jax.eval_shape(new_state)))
        # A damaged latest checkpoint is set aside for the one before: say which one it is.
        resumed_step = int(jax.device_get(state.step))
        logging.info("Resuming from the checkpoint at step %d.", resumed_step)
    logging.info(
        "Model %s: %s parameters, input %s.",
        config.model.name, f"{models.count_params(state.params):,}", input_shape[1:],
    )  # fmt: skip
    state = par.place_state(state)

    reporter = Reporter(workdir, enabled=parallel.is_main_process())
    reporter.write_config(config_utils.to_json(config))
    reporter.keep_history_until(resumed_step)  # later records are trained again
    train_step, eval_step = builders.compile_steps(par, state, config, batches.image_shape)
    run = loop.Run(
        config, workdir, par, batches, plan, schedule, input_shape, normalization, checkpoints,
        reporter, train_step, eval_step,
    )  # fmt: skip
    return run, state


def log_plan(
    config: ml_collections.ConfigDict,
    batches: data.Batches,
    plan: builders.Plan,
    par: parallel.Parallel,
) -> None:
    """State the run's data, length and learning rate in the terms the reports use."""
    sizes = batches.split_sizes
    val = f"{sizes['val']} val / " if "val" in sizes else ""
    logging.info(
        "Dataset %s: %d train / %s%d test examples, %d classes, images %s.",
        config.dataset.name, sizes["train"], val, sizes["test"], len(batches.class_names),
        "x".join(map(str, batches.image_shape)),
    )  # fmt: skip
    if "val" not in sizes and config.results_checkpoint == "best_val":
        logging.warning(
            "No validation split (dataset.val_fraction = 0): each epoch is evaluated on the test "
            "split, and the final results come from the last checkpoint, not the best."
        )
    accumulation = config.optimizer.grad_accumulation_steps
    micro_batch_size = plan.batch_size // accumulation
    per_device = micro_batch_size // par.num_devices
    dropped = plan.num_train_examples - plan.steps_per_epoch * plan.batch_size
    length = (
        f"{config.num_steps} steps (num_steps; the last epoch cut short)"
        if config.num_steps
        else f"{config.num_epochs} epochs"
    )
    logging.info(
        "Training on %d examples, batch size %d (%d per device on %d %s device(s)): %d steps per "
        "epoch (%d examples dropped per epoch), %d epochs, %d steps in all (%s).",
        plan.num_train_examples, plan.batch_size, per_device, par.num_devices,
        jax.default_backend(), plan.steps_per_epoch, dropped, plan.num_epochs, plan.total_steps,
        length,
    )  # fmt: skip
    if accumulation > 1:
        logging.info(
            "Gradient accumulation: %d optimizer updates of %d images, each the mean gradient of "
            "%d micro-batches of %d (%d per device); steps, epochs and the schedule count updates.",
            plan.total_steps, plan.batch_size, accumulation, micro_batch_size, per_device,
        )  # fmt: skip
    if config.ema.decay:
        logging.info(
            "EMA of the weights: decay %g%s; the %s weights pick the best checkpoint and give the "
            "results.",
            config.ema.decay, " with warmup" if config.ema.warmup else "",
            chosen_weights(config),
        )  # fmt: skip
    logging.info(
        "Learning rate: peak %.4g (optimizer.learning_rate %.4g per %d images x batch %d), %s "
        "schedule, %g warmup epochs.",
        builders.peak_learning_rate(config), config.optimizer.learning_rate,
        builders.REFERENCE_BATCH_SIZE, config.batch_size, config.schedule.name,
        config.schedule.warmup_epochs,
    )  # fmt: skip


# --- Command line -----------------------------------------------------------------------------


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so importing this module is free)."""
    config_flags.DEFINE_config_file(
        "config", None, "Config file, e.g. configs/r50.py; override keys as --config.KEY=VALUE.",
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go; rerun to resume.")
    flags.DEFINE_bool(
        "distributed", False, "Join a multi-process run, detecting the cluster (TPU pod, SLURM)."
    )
    flags.DEFINE_string("coordinator_address", None, "Multi-process: host:port of process 0.")
    flags.DEFINE_integer("num_processes", None, "Multi-process: how many processes in all.")
    flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
    flags.DEFINE_integer(
        "distributed_timeout", parallel.DEFAULT_JOIN_TIMEOUT_S,
        "Multi-process: seconds to wait for every process to join, then say which is missing.",
    )  # fmt: skip
    flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> int:
    """The CLI: train, then return the exit status (128 + signal when stopped by one)."""
    if len(argv) > 1:
        raise ConfigError(
            f"Unexpected arguments: {' '.join(argv[1:])}; set config keys as --config.KEY=VALUE."
        )
    by_hand = (flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    if flags.FLAGS.distributed or any(value is not None for value in by_hand):
        parallel.initialize_distributed(
            flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id,
            timeout_s=flags.FLAGS.distributed_timeout,
        )  # fmt: skip
    config = flags.FLAGS.config
    given = config_flags.get_override_values(flags.FLAGS["config"])
    config_utils.epochs_replace_steps(config, given)
    try:
        train_and_evaluate(config, flags.FLAGS.workdir)
    except loop.Interrupted as stopped:
        logging.warning("%s Checkpoint saved; rerun the same command to resume.", stopped)
        return 128 + stopped.signum
    return 0


if __name__ == "__main__":
    from resnet_jax import cli  # only as a program: the library never loads the command line

    define_flags()
    cli.run_cli(main)
