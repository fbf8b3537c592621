"""A `jax.profiler` trace of a few chosen train steps, written into the run's workdir.

With `profile.num_steps` > 0, the train steps `profile.start_step + 1` to `profile.start_step +
profile.num_steps` (counted from 1, as metrics.jsonl's `step`) are traced into
`<workdir>/profile/plugins/profile/<time>/<host>.xplane.pb`, which TensorBoard's profile plugin
shows (`pip install tensorboard-plugin-profile`, then `tensorboard --logdir <workdir>/profile`),
and `perfetto_trace.json.gz` beside it, which ui.perfetto.dev opens. The device is drained
before the first traced step and after the last, so the trace holds those steps whole and not
the asynchronous work before them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
from absl import logging

PROFILE_DIR = "profile"


class StepTrace:
    """Starts a trace before step `start_step` (0-based) and stops it after `num_steps` steps.

    Call `before(step, state)` and `after(step, state)` around each step, and `close()` at the
    end in any case (a run that ends or fails inside the window still writes what it traced).
    """

    def __init__(self, directory: Path, start_step: int, num_steps: int):
        self.directory = directory
        self.start_step = start_step
        self.stop_step = start_step + num_steps
        self.tracing = False

    @classmethod
    def in_workdir(cls, workdir: Path, start_step: int, num_steps: int) -> StepTrace:
        """The trace of a run in `workdir` (one that never starts when `num_steps` is 0), in its
        profile/ directory (per process when there are several)."""
        directory = workdir / PROFILE_DIR
        if jax.process_count() > 1:  # processes on one host would write the same file name
            directory = directory / f"process_{jax.process_index()}"
        return cls(directory, start_step, num_steps)

    def before(self, step: int, state: Any) -> None:
        """Start tracing if `step` (0-based, about to run) is the first traced one."""
        if step == self.start_step < self.stop_step:
            jax.block_until_ready(state)  # earlier steps still running stay out of the trace
            jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
            self.tracing = True
            logging.info("Tracing steps %d-%d into %s.", step + 1, self.stop_step, self.directory)

    def after(self, step: int, state: Any) -> None:
        """Stop tracing once `step` (0-based, just dispatched) was the last traced one."""
        if self.tracing and step + 1 == self.stop_step:
            jax.block_until_ready(state)  # the traced steps finish inside the trace
            self.close()

    def close(self) -> None:
        """Stop the trace if one is running, which writes it."""
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
            logging.info(
                "Wrote the profiler trace to %s (tensorboard --logdir %s).",
                self.directory, self.directory,
            )  # fmt: skip
