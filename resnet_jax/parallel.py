"""Data-parallel execution of the one train/eval step: jit over a device mesh, or pmap.

"jit" (default): a 1-D mesh over every device of every process; the global batch is sharded along
it, the state replicated, and XLA inserts the gradient all-reduce (BatchNorm sees the global
batch). "pmap": the same step under `jax.pmap`, where the step itself averages gradients and
BatchNorm statistics over the `axis_name` the model was built with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import jax_utils
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


def check_batch_size(global_batch_size: int, num_devices: int) -> None:
    """Raise ParallelError unless the global batch splits evenly over the devices."""
    if global_batch_size <= 0 or global_batch_size % num_devices:
        below, above = nearest_divisible(max(global_batch_size, 1), num_devices)
        sizes = f"{below} or {above}" if below != above else f"{below}"
        raise ParallelError(
            f"The batch size {global_batch_size} does not divide evenly across the "
            f"{num_devices} devices of this run. Set batch_size to a multiple of {num_devices}, "
            f"for example {sizes} (--config.batch_size={below})."
        )


@dataclasses.dataclass
class Parallel:
    """How one run places its state and batches and compiles its steps.

    `axis_name` is what the model's BatchNorm must be built with (None outside pmap).
    """

    mode: str = "jit"
    devices: list[Any] = dataclasses.field(default_factory=jax.devices)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ParallelError(
                f"Unknown parallel mode {self.mode!r}; valid choices are: {', '.join(MODES)}."
            )
        self.mesh = Mesh(np.asarray(self.devices), (DATA_AXIS,))
        self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]

    @property
    def axis_name(self) -> str | None:
        return PMAP_AXIS if self.mode == "pmap" else None

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def place_state(self, state: ts.TrainState) -> ts.TrainState:
        """Put a host-side state on the devices (replicated)."""
        if self.mode == "pmap":
            return jax_utils.replicate(state, self.local_devices)
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def host_state(self, state: ts.TrainState) -> ts.TrainState:
        """The state as one copy (undoes pmap's device axis), e.g. for checkpoints and reports."""
        return jax_utils.unreplicate(state) if self.mode == "pmap" else state

    def shard_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's share of a global batch -> arrays laid out for the compiled step."""
        if self.mode == "pmap":
            # pmap splits a leading axis of local-device size over the local devices itself.
            n = len(self.local_devices)
            return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in local_batch.items()}
        sharding = NamedSharding(self.mesh, P(DATA_AXIS))
        return {
            k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()
        }

    def fetch(self, metrics: dict[str, jax.Array]) -> dict[str, np.ndarray]:
        """Device metrics -> numpy (pmap metrics are already averaged: take one device's copy)."""
        metrics = jax.device_get(metrics)
        return jax.tree.map(lambda x: x[0], metrics) if self.mode == "pmap" else metrics

    def compile_train_step(self) -> Callable[..., Any]:
        """`train_step` compiled for this mode, with the state donated."""
        if self.mode == "pmap":
            return jax.pmap(ts.train_step, axis_name=PMAP_AXIS, donate_argnums=0)
        replicated, sharded = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(DATA_AXIS))
        return jax.jit(
            ts.train_step,
            in_shardings=(replicated, sharded),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )

    def compile_eval_step(self) -> Callable[..., Any]:
        """`eval_step` compiled for this mode."""
        if self.mode == "pmap":
            return jax.pmap(ts.eval_step, axis_name=PMAP_AXIS)
        replicated, sharded = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(DATA_AXIS))
        return jax.jit(ts.eval_step, in_shardings=(replicated, sharded), out_shardings=replicated)


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join JAX's multi-process runtime; call once per process before anything touches devices.

    Arguments left None are auto-detected by JAX (TPU pods, SLURM, Open MPI, ...); the explicit
    ones are for other launchers. Afterwards `jax.devices()` lists every process's devices.
    """
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
