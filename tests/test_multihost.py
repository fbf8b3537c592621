"""Two real processes on localhost under `jax.distributed` (gloo CPU collectives, 2 fake devices
each) train like one process does on the same global batches, each process feeding only its own
half of every global batch; their collectively saved checkpoints restore onto one device.

Tolerance as in test_parallel: parameters within 1e-5 absolute after 3 SGD steps (measured on
CPU: at most 8.4e-7). Each worker is killed after 120 s, so a hang fails the test.
"""

from __future__ import annotations

import jax
import numpy as np

from resnet_jax import parallel
from tests import parallel_worker as pw
from tests.test_parallel import ATOL, assert_trees_close


def test_two_processes_train_like_one(tmp_path):
    coordinator = f"localhost:{pw.free_port()}"
    jobs = [
        ["multihost", str(tmp_path), f"--coordinator_address={coordinator}",
         "--num_processes=2", f"--process_id={i}"]
        for i in range(2)
    ]  # fmt: skip
    pw.run_workers(jobs, num_devices=2, log_dir=tmp_path, timeout=120)
    out = dict(np.load(tmp_path / "multihost.npz"))
    assert out["num_processes"] == 2 and out["num_devices"] == 4
    assert out["local_batch_size"] == pw.GLOBAL_BATCH // 2

    ref = pw.summarize("single", *pw.train_single())
    p = parallel.Parallel("jit", jax.devices()[:1])
    for mode in parallel.MODES:
        assert_trees_close(ref, "single/params", out, f"{mode}/params", ATOL)
        assert_trees_close(ref, "single/batch_stats", out, f"{mode}/batch_stats", ATOL)
        np.testing.assert_allclose(out[f"{mode}/train_loss"], ref["single/train_loss"], rtol=1e-5)
        assert out[f"{mode}/eval_count"] == pw.EVAL_VALID
        np.testing.assert_array_equal(out[f"{mode}/eval_confusion"], ref["single/eval_confusion"])
        assert out[f"{mode}/resumed_eval_loss_sum"] == out[f"{mode}/eval_loss_sum"]
        # Saved by both processes together, from 4 devices; restored here onto 1.
        restored = pw.restore(tmp_path / f"ckpt_{mode}", p, pw.make_state())
        assert int(restored.step) == pw.NUM_STEPS
        assert_trees_close(out, f"{mode}/params", pw.flatten("x", restored.params), "x", atol=0)
