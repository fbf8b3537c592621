"""Data-parallel execution of the one train/eval step: jit over a device mesh, or pmap.

"jit" (default): a 1-D mesh over every device of every process; the global batch is sharded along
it, the state replicated, and XLA inserts the gradient all-reduce (BatchNorm sees the global
batch). "pmap": the same step under `jax.pmap`, where the step itself averages gradients and
BatchNorm statistics over the `axis_name` the model was built with.

Several hosts run one process each (after `initialize_distributed`); every process runs the same
program, feeds only its own slice of each global batch (`shard_batch`), and holds the state as
arrays replicated over the global mesh, which orbax saves collectively and restores onto any mesh.
A process that does not join within the join timeout, processes started with different configs
and a workdir that is not shared end every process with a message (`initialize_distributed`,
`check_processes_agree`) instead of a hang or JAX's abort.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import errors

MODES = ("jit", "pmap")
DATA_AXIS = "data"
PMAP_AXIS = "batch"
DEFAULT_JOIN_TIMEOUT_S = 300  # JAX's own default for jax.distributed.initialize
# JAX aborts the process (no message of ours) this long after our own deadline has passed.
_JAX_ABORT_MARGIN_S = 60
SHARED_WORKDIR_FILE = ".shared_workdir_check"
_AGREEMENT_KEY = "resnet_jax/start_up/process_"
_join_timeout_s = DEFAULT_JOIN_TIMEOUT_S  # set by initialize_distributed


class ParallelError(errors.UserError):
    """A user-fixable problem with how the run is spread over devices."""


def nearest_divisible(batch_size: int, divisor: int) -> tuple[int, int]:
    """The multiples of `divisor` just below and above `batch_size`."""
    below = max(divisor, batch_size // divisor * divisor)
    return below, below + divisor if below < batch_size else below


def is_main_process() -> bool:
    """True on the one process (index 0) that writes logs, plots and reports."""
    return jax.process_index() == 0


@dataclasses.dataclass
class Parallel:
    """How one run places its state and batches and compiles its steps.

    `axis_name` is what the model's BatchNorm must be built with (None outside pmap). `devices`
    (default: every device of every process) are ordered by process, so each process's devices
    hold one contiguous slice of the global batch: the slice it loads itself.
    """

    mode: str = "jit"
    devices: list[Any] = dataclasses.field(default_factory=jax.devices)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParallelError(
                f"Unknown parallel mode {self.mode!r}; valid choices are: {', '.join(MODES)}."
            )
        self.devices = sorted(self.devices, key=lambda d: (d.process_index, d.id))
        self.mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        # What pmap takes and returns on each process: a leading axis over the local devices.
        local_mesh = Mesh(np.asarray(self.local_devices), (PMAP_AXIS,))
        self.pmap_sharding = NamedSharding(local_mesh, P(PMAP_AXIS))

    @property
    def axis_name(self) -> str | None:
        return PMAP_AXIS if self.mode == "pmap" else None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def local_batch_size(self, global_batch_size: int) -> int:
        """This process's share of each global batch (one that divides over the devices)."""
        assert global_batch_size % self.num_devices == 0, (global_batch_size, self.num_devices)
        return global_batch_size // self.num_devices * len(self.local_devices)

    def place_state(self, state: Any) -> Any:
        """Put a state (or any tree of arrays: variables) on the devices, replicated: from
        host/local arrays (the same value on every process), or from `host_state`/a checkpoint
        restored with `restore_target`."""
        if self.mode == "pmap":
            return jax.tree.map(self._replicate_local, state)
        return jax.tree.map(self._replicate, state)

    def _replicate_local(self, x: Any) -> jax.Array:
        # The sharding pmap's own outputs have, so the second step does not compile again.
        x = np.asarray(x)
        copies = np.broadcast_to(x, (len(self.local_devices), *x.shape))
        return jax.device_put(copies, self.pmap_sharding)

    def _replicate(self, x: Any) -> jax.Array:
        if isinstance(x, jax.Array) and x.sharding == self.replicated:
            return x
        if jax.process_count() > 1:
            # Every process holds the whole value (same seed, or a replicated restore): each fills
            # its own devices, with no cross-host traffic (device_put would all-gather to check).
            return jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
        return jax.device_put(x, self.replicated)

    def host_state(self, state: Any) -> Any:
        """The state as one copy: arrays replicated over the mesh (pmap's device axis undone),
        what checkpoints save (collectively, from every process) and `np.asarray` reads."""
        if self.mode == "pmap":
            return jax.tree.map(self._from_pmap, state)
        return state

    def _from_pmap(self, x: jax.Array) -> jax.Array:
        shape = x.shape[1:]
        by_device = {s.device: s.data.reshape(shape) for s in x.addressable_shards}
        arrays = [by_device[d] for d in self.local_devices]
        return jax.make_array_from_single_device_arrays(shape, self.replicated, arrays)

    def restore_target(self, state: Any) -> Any:
        """Shapes, dtypes and shardings to restore a checkpoint of `state` onto this run's mesh,
        whatever device count it was saved from; `place_state` the result."""
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=self.replicated),
            state,
        )

    def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of a global batch -> arrays laid out for the compiled step."""
        if self.mode == "pmap":
            # pmap splits a leading axis of local-device size over the local devices itself.
            n = len(self.local_devices)
            self._check_local_batch(local_batch, n)
            return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in local_batch.items()}
        self._check_local_batch(local_batch, len(self.local_devices))
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in local_batch.items()
        }

    def _check_local_batch(self, local_batch: dict[str, np.ndarray], n: int) -> None:
        size = len(next(iter(local_batch.values())))
        assert size % n == 0, f"a local batch of {size} does not divide over {n} devices"

    def fetch(self, metrics: Any) -> Any:
        """What a compiled step returned (e.g. metrics) -> numpy, on every process.

        pmap outputs are already averaged: one device's copy is taken. Arrays sharded across
        processes are gathered. (A state from `host_state` reads with `jax.device_get` as is.)
        """
        if self.mode == "pmap":
            return jax.tree.map(lambda x: np.asarray(jax.device_get(x)[0]), metrics)
        return jax.tree.map(_to_numpy, metrics)

    def compile_train_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """A train step (`train_state.TrainStep`, built with this run's `axis_name`) compiled for
        this mode, with the state donated."""
        if self.mode == "pmap":
            return jax.pmap(step, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=0)
        return jax.jit(
            step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def compile_eval_step(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """An eval step (`train_state.EvalStep`, built with this run's `axis_name`) compiled for
        this mode: `step(variables, batch)`, the variables placed as `place_state` places them."""
        if self.mode == "pmap":
            return jax.pmap(step, axis_name=PMAP_AXIS, devices=self.devices)
        return jax.jit(
            step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=self.replicated,
        )

    def precompile(self, step: Callable[..., Any], *example_args: Any) -> Callable[..., Any]:
        """`step` (from `compile_train_step`/`compile_eval_step`) compiled now, ahead of time, for
        arguments shaped and placed like `example_args` (e.g. the placed state and a `shard_batch`
        of zeros), so that the first real step does not wait for XLA.

        Under pmap with several processes `step` comes back as it is and compiles at its first
        call: jax 0.10's pmap cannot run an ahead-of-time executable on per-process inputs.
        """
        if self.mode == "pmap" and jax.process_count() > 1:
            return step
        return step.lower(*example_args).compile()


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DEFAULT_JOIN_TIMEOUT_S,
) -> None:
    """Join JAX's multi-process runtime; call once per process before anything touches devices.

    Arguments left None are auto-detected by JAX (TPU pods, SLURM, Open MPI, ...); the explicit
    ones are for other launchers. Afterwards `jax.devices()` lists every process's devices.
    A ParallelError says what is missing or out of range. If not every process has joined after
    `timeout_s` seconds, this process prints which one is missing and what to check, and exits
    with status 1; `check_processes_agree` waits as long.
    """
    global _join_timeout_s
    explicit = "--coordinator_address=host:port --num_processes=N --process_id=i"
    if coordinator_address is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ParallelError(
                f"--coordinator_address={coordinator_address} is not host:port (e.g. "
                "10.0.0.1:12345, process 0's address and a free port)."
            )
        if num_processes is None or process_id is None:
            raise ParallelError(f"A multi-process run by hand needs all three of {explicit}.")
    if num_processes is not None and num_processes < 1:
        raise ParallelError(f"--num_processes={num_processes}: it must be at least 1.")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ParallelError(
            f"--process_id={process_id}: it must be in 0..{num_processes - 1} "
            f"(--num_processes={num_processes}), a different one for each process."
        )
    if timeout_s < 1:
        raise ParallelError(f"--distributed_timeout={timeout_s}: it must be at least 1 second.")
    _join_timeout_s = timeout_s
    # JAX blocks in C++ until every process has joined and then aborts the process: a timer of
    # ours says who is missing first.
    watchdog = threading.Timer(
        timeout_s, _exit_not_joined, (coordinator_address, num_processes, process_id, timeout_s)
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address,
            num_processes,
            process_id,
            initialization_timeout=timeout_s + _JAX_ABORT_MARGIN_S,
        )
    except ValueError as error:  # no cluster detected for what was left out
        raise ParallelError(
            f"Cannot join a multi-process run: {error} Outside a TPU pod or a SLURM/Open MPI "
            f"job, pass {explicit} to every process."
        ) from None
    finally:
        watchdog.cancel()


def not_joined_message(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout_s: int,
) -> str:
    """What a process says when the others have not all joined after `timeout_s` seconds."""
    coordinator = (
        f"the coordinator {coordinator_address}" if coordinator_address else "the coordinator"
    )
    count = f"all {num_processes}" if num_processes else "all"
    if process_id == 0:
        if num_processes == 2:
            others = "process 1 has not joined"
        elif num_processes:
            others = f"not all of processes 1..{num_processes - 1} have joined"
        else:
            others = "not all the other processes have joined"
        missing = f"{others} (this process is {coordinator})"
    elif coordinator_address and not _reachable(coordinator_address):
        missing = f"process 0 ({coordinator}) cannot be reached from this host"
    else:
        missing = (
            f"{coordinator} answers, but not {count} processes joined it (another process is "
            "missing, or the processes were given different process counts)"
        )
    me = f"Process {process_id}" if process_id is not None else "This process"
    return (
        f"{me} waited {timeout_s} s (--distributed_timeout) for the multi-process run to start: "
        f"{missing}. Check that {count} processes were started, each with "
        f"--num_processes={num_processes or 'N'} and its own --process_id; that "
        "--coordinator_address is process 0's host and a free port, the same on every process; "
        "and that no firewall blocks that port between the hosts."
    )


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


def _exit_not_joined(*args: Any) -> None:
    # Runs in the timer's thread while the main thread is blocked in JAX's C++: only os._exit
    # ends the process.
    try:
        errors.print_error(not_joined_message(*args))
    finally:
        os._exit(1)


def check_processes_agree(config_json: str, workdir: str | Path) -> None:
    """Raise the same ParallelError on every process unless all processes of a multi-process run
    were given the same config (`config_json`, as given: compared by a hash) and see one shared
    `workdir`.

    Process 0 writes a random token into `workdir`; every other process must read it back. The
    exchange uses JAX's coordination service, not the devices, so it works before any device is
    used and waits at most the join timeout for a process that stopped before reaching it.
    Nothing happens in a single-process run.
    """
    client = jax_distributed.global_state.client  # what orbax's multihost helpers use too
    count = jax_distributed.global_state.num_processes or 1
    if client is None or count == 1:
        return
    index = jax_distributed.global_state.process_id
    token_file = Path(workdir).expanduser().absolute() / SHARED_WORKDIR_FILE
    mine = {"config": hashlib.sha256(config_json.encode()).hexdigest()}
    if index == 0:
        mine["token"] = secrets.token_hex(16)
        mine["workdir"] = _write_token(token_file, mine["token"])
        client.key_value_set(f"{_AGREEMENT_KEY}0", json.dumps(mine))
        first = mine
    else:
        first = _entry(client, 0)
        mine["workdir"] = _read_token(token_file, first["token"])
        client.key_value_set(f"{_AGREEMENT_KEY}{index}", json.dumps(mine))
    entries = [mine if i == index else first if i == 0 else _entry(client, i) for i in range(count)]
    if index == 0:
        token_file.unlink(missing_ok=True)  # every process has read it
    problems = []
    differ = [str(i) for i, entry in enumerate(entries) if entry["config"] != first["config"]]
    if differ:
        problems.append(
            f"process{'es' if len(differ) > 1 else ''} {', '.join(differ)} run a different config "
            "from process 0's (another config file, other --config.KEY=VALUE overrides, or "
            "another version of the code): start every process with the same command line, "
            "apart from --process_id"
        )
    unseen = [
        f"process {i} {entry['workdir']}" for i, entry in enumerate(entries) if entry["workdir"]
    ]
    if unseen:
        problems.append(
            f"the processes do not share --workdir {token_file.parent} ({'; '.join(unseen)}): "
            "every process must write the same checkpoints, so put the workdir on a filesystem "
            "every host mounts (NFS, a bucket mounted with FUSE) at the same path"
        )
    if problems:
        raise ParallelError(f"This multi-process run cannot start: {'; '.join(problems)}.")


def _write_token(path: Path, token: str) -> str:
    """Write `token` to `path`; "" or what went wrong, in words that follow "process 0"."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(token)
        return ""
    except OSError as error:
        return f"cannot write {path} ({error.strerror or error})"


def _read_token(path: Path, token: str) -> str:
    """ "" if `path` holds `token`, else what this process sees instead."""
    try:
        found = path.read_text()
    except OSError as error:
        return f"cannot read the file process 0 wrote there, {path} ({error.strerror or error})"
    return "" if found == token else f"finds another run's {path}, not the one process 0 wrote"


def _entry(client: Any, index: int) -> dict[str, Any]:
    """Process `index`'s start-up entry, waiting for it at most the join timeout."""
    try:
        return json.loads(
            client.blocking_key_value_get(f"{_AGREEMENT_KEY}{index}", _join_timeout_s * 1000)
        )
    except jax.errors.JaxRuntimeError:
        raise ParallelError(
            f"Process {index} did not reach the start-up checks of the multi-process run within "
            f"{_join_timeout_s} s (--distributed_timeout): it stopped before them (its own output "
            "says why) or is still loading. Fix what it reports and start every process again."
        ) from None
