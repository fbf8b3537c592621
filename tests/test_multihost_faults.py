"""Multi-process runs that cannot work end on every process with a message, within seconds or
the join timeout, instead of hanging or aborting in JAX's C++: a workdir the processes do not
share, processes started with different configs, and a process that never joins.

Each test starts `python -m resnet_jax.train` processes on localhost (one CPU device each), as
test_multihost does with its worker; they stop at start-up, before loading any data.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO_ROOT, subprocess_env
from tests.parallel_worker import free_port

STARTUP_TIMEOUT_S = 120  # a hang fails the test instead of blocking the suite


def start_processes(
    commands: list[list[str]], log_dir: Path
) -> list[tuple[subprocess.Popen, Path]]:
    env = subprocess_env({"JAX_PLATFORMS": "cpu"})
    started = []
    for i, args in enumerate(commands):
        log = log_dir / f"process{i}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "resnet_jax.train", *args],
                cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        started.append((process, log))
    return started


def wait_for_all(started: list[tuple[subprocess.Popen, Path]]) -> list[tuple[int, str]]:
    """(exit status, output) of each process; any still running after the timeout is killed."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    results = []
    for process, log in started:
        try:
            process.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            output = log.read_text()
            raise AssertionError(f"still running after {STARTUP_TIMEOUT_S} s:\n{output}") from None
        results.append((process.returncode, log.read_text()))
    return results


def assert_explained(code: int, output: str, *fragments: str) -> None:
    assert code == 1, output[-3000:]
    assert "Traceback" not in output and "Check failure" not in output, output[-3000:]
    text = " ".join(output.split())
    for fragment in fragments:
        assert fragment in text, text[-3000:]


def distributed_args(tiny_overrides: list[str], port: int, process_id: int) -> list[str]:
    return [
        *tiny_overrides,
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={process_id}",
        "--distributed_timeout=60",
    ]


def test_a_workdir_the_processes_do_not_share_stops_every_process(tiny_overrides, tmp_path):
    # Two hosts with local disks at the same path look, to the check, like two paths.
    port = free_port()
    commands = [
        [*distributed_args(tiny_overrides, port, i), f"--workdir={tmp_path / f'host{i}'}"]
        for i in range(2)
    ]
    for code, output in wait_for_all(start_processes(commands, tmp_path)):
        assert_explained(
            code, output, "This multi-process run cannot start", "do not share --workdir",
            "process 1 cannot read the file process 0 wrote there", "a filesystem every host",
        )  # fmt: skip
    assert not (tmp_path / "host0" / ".shared_workdir_check").exists()


def test_processes_given_different_configs_stop_at_start_up(tiny_overrides, tmp_path):
    port = free_port()
    workdir = f"--workdir={tmp_path / 'run'}"
    commands = [
        [*distributed_args(tiny_overrides, port, 0), workdir],
        [*distributed_args(tiny_overrides, port, 1), workdir, "--config.batch_size=20"],
    ]
    for code, output in wait_for_all(start_processes(commands, tmp_path)):
        assert_explained(
            code, output, "process 1 run a different config from process 0's",
            "start every process with the same command line",
        )  # fmt: skip


def test_a_process_that_never_joins_is_named_by_the_ones_waiting(tiny_overrides, tmp_path):
    # Process 0 alone waits for process 1; process 1 alone (another port) finds no coordinator.
    commands = [
        [*distributed_args(tiny_overrides, free_port(), i), f"--workdir={tmp_path / 'run'}",
         "--distributed_timeout=3"]
        for i in range(2)
    ]  # fmt: skip
    start = time.monotonic()
    (code0, output0), (code1, output1) = wait_for_all(start_processes(commands, tmp_path))
    assert time.monotonic() - start < STARTUP_TIMEOUT_S / 2  # 3 s, not JAX's 5 minutes
    assert_explained(
        code0, output0, "Process 0 waited 3 s (--distributed_timeout)", "process 1 has not joined",
        "--num_processes=2", "firewall",
    )  # fmt: skip
    assert_explained(
        code1, output1, "Process 1 waited 3 s", "process 0 (the coordinator localhost:",
        "cannot be reached from this host", "--coordinator_address is process 0's host",
    )  # fmt: skip


def test_a_batch_size_that_does_not_divide_over_the_processes_stops_every_process(
    tiny_overrides, tmp_path
):
    port = free_port()
    commands = [
        [*distributed_args(tiny_overrides, port, i), f"--workdir={tmp_path / 'run'}",
         "--config.batch_size=3"]
        for i in range(2)
    ]  # fmt: skip
    for code, output in wait_for_all(start_processes(commands, tmp_path)):
        assert_explained(code, output, "The batch size 3 does not divide evenly across the 2 "
                         "devices", "--config.batch_size=2")  # fmt: skip
