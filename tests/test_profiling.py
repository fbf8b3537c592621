"""The profiler trace of chosen steps (profile.start_step, profile.num_steps)."""

from __future__ import annotations

import collections
import gzip
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from resnet_jax import config_utils, profiling


def traced_executions(directory: Path) -> dict[str, int]:
    """How many times the trace in `directory` saw each compiled module run, by module name."""
    (trace_file,) = directory.rglob("*.trace.json.gz")
    runs = collections.defaultdict(set)
    for event in json.loads(gzip.decompress(trace_file.read_bytes()))["traceEvents"]:
        args = event.get("args", {})
        if "hlo_module" in args:
            runs[args["hlo_module"]].add(args["run_id"])
    return {module: len(run_ids) for module, run_ids in runs.items()}


def run_steps(trace: profiling.StepTrace, num_steps: int) -> None:
    def step_for_the_trace_test(x):
        return x @ x / x.shape[0]

    step = jax.jit(step_for_the_trace_test)
    state = jnp.ones((32, 32))
    try:
        for index in range(num_steps):
            trace.before(index, state)
            state = step(state)
            trace.after(index, state)
    finally:
        jax.block_until_ready(state)  # as the loop's evaluation at the end of a run does
        trace.close()


def test_the_trace_holds_exactly_the_chosen_steps(tmp_path):
    run_steps(profiling.StepTrace(tmp_path / "profile", start_step=2, num_steps=3), num_steps=7)

    assert list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert list((tmp_path / "profile").rglob("perfetto_trace.json.gz"))
    assert traced_executions(tmp_path / "profile") == {"jit_step_for_the_trace_test": 3}


def test_a_run_that_ends_inside_the_window_still_writes_its_trace(tmp_path):
    run_steps(profiling.StepTrace(tmp_path / "profile", start_step=1, num_steps=10), num_steps=3)

    assert traced_executions(tmp_path / "profile")["jit_step_for_the_trace_test"] >= 1


def test_off_by_default_and_nothing_is_written(tmp_path):
    config = config_utils.default_config()
    trace = profiling.StepTrace.in_workdir(
        tmp_path, config.profile.start_step, config.profile.num_steps
    )

    run_steps(trace, num_steps=3)

    assert config.profile.num_steps == 0
    assert not (tmp_path / "profile").exists()
