"""Training's command line: one run of `loop.train_and_evaluate` (which reads top to bottom).

    python -m resnet_jax.train --config configs/r50.py --workdir workdir/r50 [--config.KEY=VALUE]

Rerunning the same command on the same workdir resumes from the latest checkpoint exactly (same
step, optimizer state, rng and batch order); a finished run only reports.

Exit status: 0 done; 1 a mistake the message explains (bad config, missing data, ...); 130 or 143
stopped by SIGINT or SIGTERM after saving a checkpoint (128 + the signal number, as shells and
schedulers report a signal), so rerun the command to resume.
"""

from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from resnet_jax import config_utils, loop, parallel
from resnet_jax.errors import ConfigError


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
        loop.train_and_evaluate(config, flags.FLAGS.workdir)
    except loop.Interrupted as stopped:
        logging.warning("%s Checkpoint saved; rerun the same command to resume.", stopped)
        return 128 + stopped.signum
    return 0


if __name__ == "__main__":
    from resnet_jax import cli  # only as a program: the library never loads the command line

    define_flags()
    cli.run_cli(main)
