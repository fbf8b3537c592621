"""experiments/benchmark.py, gpu_benchmark.py, pipeline_benchmark.py and augment_cost.py run end
to end at tiny sizes, as `python -m experiments.<name>` from the repository root. A benchmark is
not a test: no timings are checked here, only that every section produces its numbers."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def run_script(module: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python -m experiments.<module> args` from the repository root, output captured."""
    command = [sys.executable, "-m", f"experiments.{module}", *args]
    return subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.mark.slow
def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_script(
        "benchmark", "--quick", "--no_subprocess", "--layers", "--json", str(out), env=env
    )
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


# The fp32 row is the bf16 row's code with another dtype: the suite runs the two bf16 rows.
GPU_ROWS = ["resnet50-224-bf16", "resnet18-cifar-bf16"]
# Not on the GPU machine's image; ml_collections would have to be carried as a wheel.
NOT_ON_THE_GPU_IMAGE = ("tensorflow", "tensorflow_datasets", "grain", "ml_collections")


@pytest.mark.slow
def test_quick_gpu_benchmark_runs_without_what_the_gpu_image_lacks(tmp_path):
    out = tmp_path / "result.json"
    # A module set to None in sys.modules cannot be imported: as if it were not installed.
    hidden = "".join(f"sys.modules[{name!r}] = None; " for name in NOT_ON_THE_GPU_IMAGE)
    run = (
        f"import runpy, sys; {hidden}"
        "runpy.run_module('experiments.gpu_benchmark', run_name='__main__', alter_sys=True)"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    rows = f"--rows={','.join(GPU_ROWS)}"
    cmd = [sys.executable, "-c", run, "--quick", rows, "--json", str(out)]
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=env, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [row["name"] for row in result["rows"]] == GPU_ROWS
    assert result["matmul_tflop_s"] > 0
    for row in result["rows"]:
        assert not [key for key in row if key.endswith("error")], row
        assert row["step_tflop"] > 0 and row["jax_compile_s"] > 0
        for side in ("jax", "torch_eager", "torch_compile"):
            assert row[f"{side}_img_s"] > 0 and row[f"{side}_mfu"] > 0
        assert row["vs_torch_eager"] > 0 and row["vs_torch_compile"] > 0
        assert f"| {row['name']} | {row['image_size']} | {row['batch_size']} |" in proc.stdout


@pytest.mark.slow
def test_quick_pipeline_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_script("pipeline_benchmark", "--quick", "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["folder"]["images"] == 64
    assert [row["workers"] for row in result["rows"]] == [1, 2]
    for row in result["rows"]:
        for side in ("stream", "torch"):
            assert row[f"{side}_img_s"] > 0 and row[f"{side}_cpu_ms_per_img"] > 0
        assert row["ratio"] > 0 and f"| {row['workers']} | " in proc.stdout
    assert result["step"]["img_s"] > 0 and "bounds training here" in proc.stdout


@pytest.mark.slow
def test_quick_startup_benchmark_runs(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_script("pipeline_benchmark", "--quick", "--startup", "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [(r["pipeline"], r["images"]) for r in result["rows"]] == [
        ("memory", 64), ("memory", 128), ("stream", 64), ("stream", 128),
    ]  # fmt: skip
    for row in result["rows"]:
        assert 0 < row["first_step_s"] < row["total_s"]
        assert 0 < row["main_peak_rss_mib"] <= row["tree_peak_rss_mib"]
    stream_rows = [r for r in result["rows"] if r["pipeline"] == "stream"]
    assert all(r["tree_peak_rss_mib"] > r["main_peak_rss_mib"] for r in stream_rows)  # workers
    assert all(r["worker_peak_rss_mib"] > 0 for r in stream_rows)
    assert set(result["growth"]) == {"memory", "stream"}
    assert all(ratio > 0 for growth in result["growth"].values() for ratio in growth.values())
    assert "**128/64**" in proc.stdout and "flat within 15%" in proc.stdout


@pytest.mark.slow
def test_quick_augment_cost_runs(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = run_script("augment_cost", "--quick", "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["model"] == "resnet20" and result["batch_size"] == 8
    assert set(result["augmentation_ms"]) == {
        "crop+flip", "+mixup/cutmix", "+randaugment(2, 9)", "+trivialaugment",
        "+trivialaugment+mixup/cutmix",
    }  # fmt: skip
    assert all(ms > 0 for ms in [*result["augmentation_ms"].values(), *result["step_ms"].values()])
    assert "augmentation alone" in proc.stdout and "train step" in proc.stdout
