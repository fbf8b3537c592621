"""experiments/benchmark.py runs end to end at tiny sizes. A benchmark is not a test: no timings
are checked here, only that every section produces its numbers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "experiments" / "benchmark.py"


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        str(BENCHMARK),
        "--quick",
        "--no_subprocess",
        "--layers",
        "--json",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train ratio" in proc.stdout and "Input pipeline" in proc.stdout
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["model"] == "resnet20" and row["gflop_per_step"] > 0
    for key in ("jax_train_img_s", "torch_train_img_s", "jax_eval_img_s", "torch_eval_img_s"):
        assert row[key] > 0
    assert result["gemm_gflop_s"]["jax"] > 0
    assert result["pipeline"]["pipeline_s"] > 0
    passes = ["forward", "input_grad", "kernel_grad"]
    assert [(r["layer"], r["pass"]) for r in result["conv_layers"]] == [
        (layer, kind) for layer in ("8x8x8", "8x8x8, stride 2 to 8") for kind in passes
    ]
    assert all(r["xla_gflop_s"] > 0 and r["torch_gflop_s"] > 0 for r in result["conv_layers"])
