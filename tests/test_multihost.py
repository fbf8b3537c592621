"""Two real processes on localhost under `jax.distributed` (gloo CPU collectives, 2 fake devices
each) train like one process does on the same global batches, each process feeding only its own
half of every global batch; their collectively saved checkpoints restore onto one device.

Tolerance as in test_parallel: parameters within 1e-5 absolute after 3 SGD steps (measured on
CPU: at most 8.4e-7). Each worker is killed after 120 s, so a hang fails the test.

The command line too: two `resnet_jax.train` processes streaming an image folder log the same
losses, save the same parameters and write the same results.json as one process with two devices.
"""

from __future__ import annotations

import json

import jax
import numpy as np

from resnet_jax import parallel
from tests import parallel_worker as pw
from tests.conftest import run_module
from tests.test_multihost_faults import start_processes, wait_for_all
from tests.test_parallel import ATOL, assert_trees_close
from tests.test_stream import jpeg_folder
from tests.test_stream_training import final_variables, recipe_args, step_records


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


def test_two_training_processes_streaming_a_folder_match_one_process_with_two_devices(
    tmp_path, cache_dir
):
    # The command line end to end: jax.distributed, each process reading its slice of every batch
    # from the stream, checkpoints saved together, results written once.
    folder = jpeg_folder(
        tmp_path / "jpegs", {"train": {"a": 8, "b": 8}, "test": {"a": 3, "b": 2}}, size=(36, 44)
    )

    def args(run: str) -> list[str]:
        workdir = tmp_path / run
        return [*recipe_args(folder, workdir, cache_dir, workers=0), "--config.model.name=resnet18"]

    port = pw.free_port()
    started = start_processes(
        [
            [*args("two"), f"--coordinator_address=localhost:{port}", "--num_processes=2",
             f"--process_id={i}"]
            for i in range(2)
        ],
        tmp_path,
    )  # fmt: skip
    one = run_module(
        "resnet_jax.train", *args("one"),
        env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    for code, output in wait_for_all(started):
        assert code == 0 and "Traceback" not in output, output[-3000:]
    assert "Input pipeline: stream" in one.stderr
    assert [r["train_loss"] for r in step_records(tmp_path / "two")] == [
        r["train_loss"] for r in step_records(tmp_path / "one")
    ]
    same = jax.tree.map(
        np.array_equal, final_variables(tmp_path / "two"), final_variables(tmp_path / "one")
    )
    assert all(jax.tree.leaves(same))
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("two", "one")]
    assert results[0] == results[1] and results[0]["num_test_examples"] == 5
