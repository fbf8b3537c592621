"""Data-parallel execution of the one train/eval step: jit over a device mesh, or pmap.

"jit" (default): a 1-D mesh over every device of every process; the global batch is sharded along
it, the state replicated, and XLA inserts the gradient all-reduce (BatchNorm sees the global
batch). "pmap": the same step under `jax.pmap`, where the step itself averages gradients and
BatchNorm statistics over the `axis_name` the model was built with.

Several hosts run one process each (after `initialize_distributed`); every process runs the same
program, feeds only its own slice of each global batch (`shard_batch`), and holds the state as
arrays replicated over the global mesh, which orbax saves collectively and restores onto any mesh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import train_state as ts

MODES = ("jit", "pmap")
DATA_AXIS = "data"
PMAP_AXIS = "batch"


class ParallelError(ValueError):
    """A user-fixable problem with how the run is spread over devices."""


def nearest_divisible(batch_size: int, divisor: int) -> tuple[int, int]:
    """The multiples of `divisor` just below and above `batch_size`."""
    below = max(divisor, batch_size // divisor * divisor)
    return below, below + divisor if below < batch_size else below


def check_batch_size(global_batch_size: int, num_devices: int, name: str = "batch_size") -> None:
    """Raise ParallelError unless the global batch splits evenly over the devices.

    `name` is the config key the message tells the user to change (e.g. "eval_batch_size").
    """
    if global_batch_size <= 0 or global_batch_size % num_devices:
        below, above = nearest_divisible(max(global_batch_size, 1), num_devices)
        sizes = f"{below} or {above}" if below != above else f"{below}"
        raise ParallelError(
            f"The {name.replace('_', ' ')} {global_batch_size} does not divide evenly across the "
            f"{num_devices} devices of this run. Set {name} to a multiple of {num_devices}, "
            f"for example {sizes} (--config.{name}={below})."
        )


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
        """This process's share of each global batch (checks that the global batch divides)."""
        check_batch_size(global_batch_size, self.num_devices)
        return global_batch_size // self.num_devices * len(self.local_devices)

    def place_state(self, state: ts.TrainState) -> ts.TrainState:
        """Put a state on the devices, replicated: from host/local arrays (the same value on every
        process), or from `host_state`/a checkpoint restored with `restore_target`."""
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

    def host_state(self, state: ts.TrainState) -> ts.TrainState:
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

    def restore_target(self, state: ts.TrainState) -> ts.TrainState:
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
        if size % n:
            below, above = nearest_divisible(size, n)
            raise ParallelError(
                f"This process's share of the batch has {size} examples, which does not divide "
                f"evenly across its {n} devices; feed {below} or {above} per process (the global "
                f"batch size must be a multiple of the {self.num_devices} devices)."
            )

    def fetch(self, metrics: Any) -> Any:
        """What a compiled step returned (e.g. metrics) -> numpy, on every process.

        pmap outputs are already averaged: one device's copy is taken. Arrays sharded across
        processes are gathered. (A state from `host_state` reads with `jax.device_get` as is.)
        """
        if self.mode == "pmap":
            return jax.tree.map(lambda x: np.asarray(jax.device_get(x)[0]), metrics)
        return jax.tree.map(_to_numpy, metrics)

    def compile_train_step(self) -> Callable[..., Any]:
        """`train_step` compiled for this mode, with the state donated."""
        if self.mode == "pmap":
            return jax.pmap(
                ts.train_step, axis_name=PMAP_AXIS, devices=self.devices, donate_argnums=0
            )
        return jax.jit(
            ts.train_step,
            in_shardings=(self.replicated, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def compile_eval_step(self) -> Callable[..., Any]:
        """`eval_step` compiled for this mode."""
        if self.mode == "pmap":
            return jax.pmap(ts.eval_step, axis_name=PMAP_AXIS, devices=self.devices)
        return jax.jit(
            ts.eval_step,
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
) -> None:
    """Join JAX's multi-process runtime; call once per process before anything touches devices.

    Arguments left None are auto-detected by JAX (TPU pods, SLURM, Open MPI, ...); the explicit
    ones are for other launchers. Afterwards `jax.devices()` lists every process's devices.
    A ParallelError says what is missing or out of range.
    """
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
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except ValueError as error:  # no cluster detected for what was left out
        raise ParallelError(
            f"Cannot join a multi-process run: {error} Outside a TPU pod or a SLURM/Open MPI "
            f"job, pass {explicit} to every process."
        ) from None
