"""Runs the parallel tests' training in processes of their own, with their own device counts.

The tests start this script through `run_workers`, which sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (JAX reads it once, at import), and compare
what it writes with a single-device run in the test process (`train_single`).

  parallel_worker.py modes OUT [--ema_accumulation]
      trains in jit and pmap mode over every device from one seed -> OUT/modes.npz (with
      EMA_ACCUMULATION's EMA of the weights and gradient accumulation if asked)
  parallel_worker.py mixaug OUT
      trains with RandAugment and mixup/CutMix on uint8 images, in jit mode and in pmap mode with
      bfloat16 compute -> OUT/mixaug.npz
  parallel_worker.py checkpoint OUT --restore CKPT
      restores CKPT (saved on another device count) onto a mesh of every device
      -> OUT/restored.npz, then saves it from there to OUT/ckpt_<device count>, and as a
      training run's checkpoint to OUT/checkpoints_<device count>
  parallel_worker.py multihost OUT --coordinator_address=localhost:PORT --num_processes=2
          --process_id=I
      one process of a multi-process run: trains in jit then in pmap mode, feeding only its own
      slice of each global batch; all processes save OUT/ckpt_<mode> together, and process 0
      writes OUT/multihost.npz
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from resnet_jax import augment, checkpoint, models, parallel, train_state

NUM_CLASSES = 10
IMAGE_SHAPE = (16, 16, 3)
GLOBAL_BATCH = 16
NUM_STEPS = 3
EVAL_VALID = 11  # the eval batch's last GLOBAL_BATCH - EVAL_VALID examples are padding
SEED = 0
# An EMA with warmup, and 2 micro-batches of 8 per step: 2 examples per device on 4 devices.
EMA_ACCUMULATION = {"ema_decay": 0.5, "ema_warmup": True, "grad_accumulation_steps": 2}
# What a test trains: a state (host arrays) and the train and eval steps it goes with.
Setup = tuple[train_state.TrainState, train_state.TrainStep, train_state.EvalStep]


def make_state(
    axis_name: str | None = None, ema: bool = False, dtype: Any = np.float32
) -> train_state.TrainState:
    """The tiny model every test trains (computing in `dtype`), from one seed; host
    (single-device) arrays, with an EMA of the weights if `ema`.

    The variables are drawn with numpy (He-normal kernels, unit BN scales) rather than by
    `model.init`, whose XLA compile alone takes seconds on a loaded CPU; `create` takes them as
    pretrained ones.
    """
    model = models.get_model("resnet20", NUM_CLASSES, width=4, axis_name=axis_name, dtype=dtype)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(SEED), np.zeros((1, *IMAGE_SHAPE)), train=False)
    )
    rng = np.random.default_rng(SEED)

    def draw(path, leaf) -> np.ndarray:
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(leaf.dtype)
        if "scale" in name or "var" in name:
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    variables = jax.tree_util.tree_map_with_path(draw, shapes)
    tx = optax.sgd(0.1, momentum=0.9)
    return train_state.create(
        model, tx, jax.random.key(SEED), (1, *IMAGE_SHAPE), variables=variables, ema=ema
    )


def plain(axis_name: str | None = None, ema_accumulation: bool = False) -> Setup:
    """make_state's network on normalized float images (with EMA_ACCUMULATION if asked)."""
    state = make_state(axis_name, ema=ema_accumulation)
    settings = EMA_ACCUMULATION if ema_accumulation else {}
    train_step = train_state.TrainStep(axis_name=axis_name, **settings)
    return state, train_step, train_state.EvalStep(state.apply_fn, axis_name=axis_name)


def mixaug(axis_name: str | None = None, dtype: Any = np.float32) -> Setup:
    """make_state's network, computing in `dtype`, with RandAugment and mixup/CutMix."""
    state = make_state(axis_name, dtype=dtype)
    preprocess = augment.make_preprocess(
        mean=augment.CIFAR10_MEAN, std=augment.CIFAR10_STD, crop_padding=2, policy="randaugment"
    )
    mix = augment.Mix(mixup_alpha=0.4, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    train_step = train_state.TrainStep(preprocess=preprocess, mix=mix, axis_name=axis_name)
    return state, train_step, train_state.EvalStep(state.apply_fn, preprocess, axis_name)


def uint8_batches() -> list[dict[str, np.ndarray]]:
    """NUM_STEPS global batches of uint8 images, as the data pipeline gives them."""
    rng = np.random.default_rng(SEED)
    return [
        {
            "image": rng.integers(0, 256, (GLOBAL_BATCH, *IMAGE_SHAPE), dtype=np.uint8),
            "label": rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32),
        }
        for _ in range(NUM_STEPS)
    ]


def global_batches() -> list[dict[str, np.ndarray]]:
    """NUM_STEPS global training batches, the same in every process."""
    rng = np.random.default_rng(SEED)
    return [
        {
            "image": rng.normal(size=(GLOBAL_BATCH, *IMAGE_SHAPE)).astype(np.float32),
            "label": rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32),
        }
        for _ in range(NUM_STEPS)
    ]


def eval_batch() -> dict[str, np.ndarray]:
    """One global eval batch padded at the end: mask False and junk in the padding."""
    rng = np.random.default_rng(SEED + 1)
    mask = np.arange(GLOBAL_BATCH) < EVAL_VALID
    image = rng.normal(size=(GLOBAL_BATCH, *IMAGE_SHAPE)).astype(np.float32)
    image[~mask] = 1e3
    label = np.where(mask, rng.integers(0, NUM_CLASSES, GLOBAL_BATCH), 0).astype(np.int32)
    return {"image": image, "label": label, "mask": mask}


def process_slice(batch: dict[str, np.ndarray], p: parallel.Parallel) -> dict[str, np.ndarray]:
    """This process's contiguous share of a global batch, as a data loader would give it."""
    size = p.local_batch_size(GLOBAL_BATCH)
    start = jax.process_index() * size
    return {k: v[start : start + size] for k, v in batch.items()}


@functools.cache
def train_single(
    setup: Callable[..., Setup] = plain, batches: Callable[[], list[dict]] = global_batches
) -> tuple[train_state.TrainState, list[dict], dict]:
    """The reference: plain jit of the one step on one device, on whole global batches."""
    state, train_step, eval_step = setup()
    step = jax.jit(train_step)
    history = []
    for batch in batches():
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
    evals = jax.device_get(jax.jit(eval_step)(state.variables, eval_batch()))
    return state, history, evals


def train_parallel(
    p: parallel.Parallel,
    setup: Callable[..., Setup] = plain,
    batches_fn: Callable[[], list[dict]] = global_batches,
) -> tuple[train_state.TrainState, list[dict], dict]:
    """The same training through `Parallel`, each process feeding only its slice."""
    state, train_step, eval_step = setup(p.axis_name)
    state = p.place_state(state)
    batches = batches_fn()
    first = p.shard_batch(process_slice(batches[0], p))
    step = p.precompile(p.compile_train_step(train_step), state, first)
    history = []
    for batch in batches:
        state, metrics = step(state, p.shard_batch(process_slice(batch, p)))
        history.append(p.fetch(metrics))
    return p.host_state(state), history, evaluate(p, eval_step, state)


def evaluate(
    p: parallel.Parallel, eval_step: train_state.EvalStep, placed: train_state.TrainState
) -> dict:
    batch = p.shard_batch(process_slice(eval_batch(), p))
    return p.fetch(p.compile_eval_step(eval_step)(placed.variables, batch))


def flatten(prefix: str, tree) -> dict[str, np.ndarray]:
    """A pytree -> {"prefix/key/path": numpy array}, for npz files and comparisons."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {f"{prefix}/{jax.tree_util.keystr(k)}": np.asarray(v) for k, v in leaves}


def summarize(name: str, state, history, evals) -> dict[str, np.ndarray]:
    out = flatten(f"{name}/params", state.params)
    out |= flatten(f"{name}/batch_stats", state.batch_stats)
    if isinstance(state, train_state.EmaTrainState):
        out |= flatten(f"{name}/ema_params", state.ema_params)
        out |= flatten(f"{name}/ema_batch_stats", state.ema_batch_stats)
    for key in ("loss", "accuracy"):
        out[f"{name}/train_{key}"] = np.asarray([m[key] for m in history])
    for key in ("loss_sum", "correct", "count", "confusion"):
        out[f"{name}/eval_{key}"] = np.asarray(evals[key])
    return out


def save(path: Path, state) -> None:
    """Save collectively: every process calls this with its global arrays."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(path.resolve(), state)
    ckptr.wait_until_finished()


def restore(path: Path, p: parallel.Parallel, like):
    """Restore onto p's mesh whatever device count the checkpoint was written from."""
    return ocp.StandardCheckpointer().restore(path.resolve(), p.restore_target(like))


def run_modes(out: Path, ema_accumulation: bool) -> None:
    setup = functools.partial(plain, ema_accumulation=ema_accumulation)
    results: dict[str, np.ndarray] = {"num_devices": np.asarray(jax.device_count())}
    for mode in parallel.MODES:
        results |= summarize(mode, *train_parallel(parallel.Parallel(mode), setup))
    np.savez(out / "modes.npz", **results)


def run_mixaug(out: Path) -> None:
    results: dict[str, np.ndarray] = {"num_devices": np.asarray(jax.device_count())}
    results |= summarize("jit", *train_parallel(parallel.Parallel("jit"), mixaug, uint8_batches))
    bfloat16 = functools.partial(mixaug, dtype=jnp.bfloat16)
    results |= summarize(
        "pmap_bf16", *train_parallel(parallel.Parallel("pmap"), bfloat16, uint8_batches)
    )
    np.savez(out / "mixaug.npz", **results)


def run_checkpoint(out: Path, restore_from: Path) -> None:
    p = parallel.Parallel("jit")
    restored = restore(restore_from, p, make_state())
    leaves = jax.tree.leaves(restored)
    results = flatten("params", restored.params) | {
        "step": np.asarray(restored.step),
        "num_devices": np.asarray(len(leaves[0].devices())),
        "replicated": np.asarray(all(x.sharding == p.replicated for x in leaves)),
    }
    np.savez(out / "restored.npz", **results)
    save(out / f"ckpt_{jax.device_count()}", p.place_state(restored))
    checkpoints = checkpoint.Checkpoints(out / f"checkpoints_{jax.device_count()}")
    checkpoints.save(p.host_state(p.place_state(restored)), meta={"epoch": 1})
    checkpoints.close()


def run_multihost(out: Path, args: argparse.Namespace) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    results: dict[str, np.ndarray] = {}
    for mode in parallel.MODES:
        p = parallel.Parallel(mode)
        state, history, evals = train_parallel(p)
        save(out / f"ckpt_{mode}", state)
        results |= summarize(mode, state, history, evals)
        # Resuming: the checkpoint all processes wrote, restored and placed for this mode.
        like, _, eval_step = plain(p.axis_name)
        resumed = p.place_state(restore(out / f"ckpt_{mode}", p, like))
        results[f"{mode}/resumed_eval_loss_sum"] = evaluate(p, eval_step, resumed)["loss_sum"]
    results["num_devices"] = np.asarray(jax.device_count())
    results["num_processes"] = np.asarray(jax.process_count())
    results["local_batch_size"] = np.asarray(p.local_batch_size(GLOBAL_BATCH))
    if parallel.is_main_process():
        np.savez(out / "multihost.npz", **results)
    jax.distributed.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(jobs: list[list[str]], num_devices: int, log_dir: Path, timeout: float = 120.0):
    """Run this script once per argument list, each process with `num_devices` CPU devices, and
    wait for all of them. A failure, or anything still running after `timeout` seconds (a hang
    in a collective), kills the rest and fails the test with the logs."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"])
    procs, logs = [], []
    for i, job in enumerate(jobs):
        logs.append(log_dir / f"worker{i}.log")
        with open(logs[-1], "w") as log:
            cmd = [sys.executable, __file__, *job]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    if any(p.returncode for p in procs):
        report = "\n".join(
            f"--- worker {i} (exit {p.returncode}) ---\n" + _tail(logs[i])
            for i, p in enumerate(procs)
        )
        raise AssertionError(f"parallel_worker failed or timed out after {timeout:.0f}s:\n{report}")


def _tail(path: Path, lines: int = 40) -> str:
    kept = [ln for ln in path.read_text().splitlines() if not ln.startswith(("W0", "I0"))]
    return "\n".join(kept[-lines:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=("modes", "mixaug", "checkpoint", "multihost"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--restore", type=Path)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    parser.add_argument("--ema_accumulation", action="store_true")
    args = parser.parse_args()
    if args.job == "modes":
        run_modes(args.out, args.ema_accumulation)
    elif args.job == "mixaug":
        run_mixaug(args.out)
    elif args.job == "checkpoint":
        run_checkpoint(args.out, args.restore)
    else:
        run_multihost(args.out, args)


if __name__ == "__main__":
    main()
