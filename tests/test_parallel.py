"""The one train step on many devices: jit sharding, pmap and one device agree; checkpoints move
between device counts; batch sizes that do not split say what to use instead.

Multi-device cases run `tests/parallel_worker.py` in a subprocess with 4 fake CPU devices and are
compared with a single-device run here. Tolerance: parameters and BatchNorm statistics within
1e-5 absolute after 3 SGD steps (measured on CPU: at most 5e-7 for parameters, 7e-7 for BatchNorm
statistics; all-reduces sum in a different order than one device does), losses within 1e-5
relative; eval counts, correct counts and confusion matrices exactly.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from resnet_jax import builders, checkpoint, config_utils, parallel, train_state
from resnet_jax.errors import DataError
from tests import parallel_worker as pw

ATOL = 1e-5


def assert_trees_close(ref: dict, ref_prefix: str, out: dict, prefix: str, atol: float) -> None:
    keys = [k for k in ref if k.startswith(ref_prefix)]
    assert keys
    for key in keys:
        np.testing.assert_allclose(
            out[prefix + key[len(ref_prefix) :]], ref[key], rtol=0, atol=atol, err_msg=key
        )


def plan(devices: int, **config):
    """The run's plan for 1000 train examples on `devices` devices."""
    return builders.make_plan(config_utils.resolve(config), 1000, devices)


def test_batch_size_must_divide_over_devices():
    assert plan(8, batch_size=128, eval_batch_size=64).batch_size == 128
    with pytest.raises(parallel.ParallelError) as info:
        plan(8, batch_size=100, eval_batch_size=64)
    message = str(info.value)
    assert "100" in message and "8 devices" in message
    assert "96 or 104" in message and "--config.batch_size=96" in message
    with pytest.raises(parallel.ParallelError, match="for example 8 "):
        plan(8, batch_size=4, eval_batch_size=64)  # smaller than the device count: one suggestion
    with pytest.raises(parallel.ParallelError, match=r"eval batch size 500 .*eval_batch_size=496"):
        plan(16, batch_size=128, eval_batch_size=500)
    with pytest.raises(parallel.ParallelError, match=r"Resume it on a device count"):
        builders.make_plan(config_utils.resolve({"batch_size": 100}), 1000, 8, resuming=True)
    with pytest.raises(DataError, match=r"larger than the 1000 training examples"):
        plan(1, batch_size=1024)
    assert parallel.nearest_divisible(130, 32) == (128, 160)
    assert parallel.nearest_divisible(128, 32) == (128, 128)


def test_parallel_rejects_unknown_mode():
    with pytest.raises(parallel.ParallelError, match="jit, pmap"):
        parallel.Parallel("spmd")


def test_one_device_local_batch():
    p = parallel.Parallel("jit", jax.devices()[:1])
    assert p.local_batch_size(6) == 6 and p.axis_name is None
    assert parallel.Parallel("pmap", jax.devices()[:1]).axis_name == parallel.PMAP_AXIS


@pytest.mark.parametrize("ema_accumulation", [False, True])
def test_jit_pmap_and_one_device_train_alike(tmp_path, ema_accumulation):
    # With EMA_ACCUMULATION the EMA of the weights and accumulation over micro-batches spread
    # over every device (BatchNorm on each micro-batch's 8 examples) agree as well.
    setup = functools.partial(pw.plain, ema_accumulation=ema_accumulation)
    ref = pw.summarize("single", *pw.train_single(setup))
    job = ["modes", str(tmp_path), *(["--ema_accumulation"] if ema_accumulation else [])]
    pw.run_workers([job], num_devices=4, log_dir=tmp_path)
    out = dict(np.load(tmp_path / "modes.npz"))
    assert out["num_devices"] == 4
    parts = ["params", "batch_stats", *(["ema_params", "ema_batch_stats"] * ema_accumulation)]
    for mode in parallel.MODES:
        for part in parts:
            assert_trees_close(ref, f"single/{part}", out, f"{mode}/{part}", ATOL)
        for key in ("train_loss", "train_accuracy", "eval_loss_sum"):
            np.testing.assert_allclose(out[f"{mode}/{key}"], ref[f"single/{key}"], rtol=1e-5)
        # Eval over a padded batch: the padding counts nowhere, in any mode.
        assert out[f"{mode}/eval_count"] == ref["single/eval_count"] == pw.EVAL_VALID
        for key in ("eval_correct", "eval_confusion"):
            np.testing.assert_array_equal(out[f"{mode}/{key}"], ref[f"single/{key}"], err_msg=key)


def test_mixing_and_randaugment_on_a_mesh_and_under_pmap_in_bfloat16(tmp_path):
    ref = pw.summarize("single", *pw.train_single(pw.mixaug, pw.uint8_batches))
    # The policy ops take XLA a while to compile (twice in the worker) on a shared CPU.
    pw.run_workers([["mixaug", str(tmp_path)]], num_devices=4, log_dir=tmp_path, timeout=300)
    out = dict(np.load(tmp_path / "mixaug.npz"))
    assert out["num_devices"] == 4
    # jit: the global batch is mixed as on one device (one lam, pairs across devices), and each
    # example draws the same ops: the same training.
    assert_trees_close(ref, "single/params", out, "jit/params", ATOL)
    assert_trees_close(ref, "single/batch_stats", out, "jit/batch_stats", ATOL)
    np.testing.assert_allclose(out["jit/train_loss"], ref["single/train_loss"], rtol=1e-5)
    # pmap: each device mixes its own shard with its own lam and draws its own ops; in bf16.
    assert np.all(np.isfinite(out["pmap_bf16/train_loss"]))
    assert out["pmap_bf16/eval_count"] == pw.EVAL_VALID
    initial = pw.flatten("pmap_bf16/params", pw.make_state().params)
    assert any(not np.allclose(out[key], value) for key, value in initial.items())  # it trained


def saved_and_restored_on(num_devices: int, tmp_path) -> train_state.TrainState:
    """A state saved here on one device, then restored by a worker onto its `num_devices`-device
    mesh and saved from there (`parallel_worker.py checkpoint`). Not a fresh state (restore must
    not just echo the target): shifted values, a later step."""
    state = pw.make_state()
    state = state.replace(step=state.step + 7, params=jax.tree.map(lambda x: x + 1, state.params))
    pw.save(tmp_path / "ckpt_1", state)
    pw.run_workers(
        [["checkpoint", str(tmp_path), "--restore", str(tmp_path / "ckpt_1")]],
        num_devices=num_devices,
        log_dir=tmp_path,
    )
    return state


def test_checkpoint_restores_onto_other_device_counts(tmp_path):
    state = saved_and_restored_on(4, tmp_path)  # 1 -> 4
    ref = pw.flatten("params", state.params)
    on_four = dict(np.load(tmp_path / "restored.npz"))
    assert on_four["num_devices"] == 4 and on_four["replicated"]
    assert on_four["step"] == 7
    assert_trees_close(ref, "params", on_four, "params", atol=0)
    # 4 -> 1
    p = parallel.Parallel("jit", jax.devices()[:1])
    back = pw.restore(tmp_path / "ckpt_4", p, pw.make_state())
    assert all(x.sharding == p.replicated for x in jax.tree.leaves(back))
    assert int(back.step) == 7
    assert_trees_close(ref, "params", pw.flatten("params", back.params), "params", atol=0)


def test_a_run_checkpoint_from_more_devices_evaluates_and_is_kept_when_it_does_not_fit(tmp_path):
    state = saved_and_restored_on(2, tmp_path)
    directory = tmp_path / "checkpoints_2"
    checkpoints = checkpoint.Checkpoints(directory)
    # Evaluation and prediction read the variables alone, onto this process's one device.
    variables = checkpoints.restore_variables(7)
    ref = pw.flatten("params", state.params)
    assert_trees_close(ref, "params", pw.flatten("params", variables["params"]), "params", atol=0)
    # An intact checkpoint that does not fit the state (another optimizer) is an error of the
    # config, not damage: it stays where it is.
    adam = state.replace(tx=optax.adam(1e-3), opt_state=optax.adam(1e-3).init(state.params))
    p = parallel.Parallel("jit", jax.devices()[:1])
    with pytest.raises((ValueError, KeyError)) as raised:
        checkpoints.restore(7, p.restore_target(adam))
    assert not isinstance(raised.value, checkpoint.CheckpointError)
    assert checkpoints.all_steps() == [7]
    assert not (tmp_path / "corrupt_checkpoints").exists()
    checkpoints.close()
