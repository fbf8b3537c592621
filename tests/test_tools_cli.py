"""The command lines of issue 21's tools: a run with stochastic depth and a profiler trace,
evaluate --tta flip, export and predict --exported (each in a subprocess, as users run them)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
from PIL import Image

from tests.conftest import run_module
from tests.test_profiling import traced_executions


def test_a_pmap_bf16_run_with_stochastic_depth_writes_the_chosen_steps_trace(
    tiny_overrides, tmp_path
):
    workdir = tmp_path / "run"
    done = run_module(
        "resnet_jax.train", *tiny_overrides, f"--workdir={workdir}", "--config.num_steps=6",
        "--config.parallel=pmap", "--config.half_precision=True",
        "--config.model.drop_path_rate=0.2", "--config.profile.start_step=2",
        "--config.profile.num_steps=3",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    assert "Tracing steps 3-5 into" in done.stderr
    assert list((workdir / "profile").rglob("*.xplane.pb"))
    # The train step is what ran (jax's pmap names its module jit__fun), 3 times, and nothing
    # more often: the window held those steps and not the warm-up.
    assert max(traced_executions(workdir / "profile").values()) == 3
    results = json.loads((workdir / "results.json").read_text())
    assert np.isfinite(results["test_loss"])


def test_evaluate_tta_flip_writes_beside_the_plain_results(trained_run, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained_run["workdir"], workdir)
    plain = (workdir / "results.json").read_bytes()

    done = run_module("resnet_jax.evaluate", f"--workdir={workdir}", "--tta=flip")

    assert done.returncode == 0, done.stderr[-2000:]
    assert "test-time augmentation flip" in done.stdout
    assert (workdir / "results.json").read_bytes() == plain
    results = json.loads((workdir / "results_tta_flip.json").read_text())
    assert results["tta"] == "flip" and results["num_test_examples"] == 20
    assert results["checkpoint_step"] == json.loads(plain)["checkpoint_step"]
    assert (workdir / "results_tta_flip.png").exists()


def write_images(directory, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = [str(directory / f"image{i}.png") for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (40, 36, 3), np.uint8)).save(path)
    return paths


def ranked(stdout: str) -> list[list[tuple[str, float]]]:
    return [
        [(name, float(p)) for name, p in re.findall(r"(\w+) (\d\.\d{3})", line.split(": ", 1)[1])]
        for line in stdout.strip().splitlines()
    ]


def test_predict_from_an_export_prints_what_predict_from_the_checkpoint_does(trained_run, tmp_path):
    exported = tmp_path / "exported"
    paths = write_images(tmp_path, 2)

    done = run_module(
        "resnet_jax.export", f"--workdir={trained_run['workdir']}", f"--output={exported}"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "for cpu, cuda to" in done.stdout
    from_export = run_module("resnet_jax.predict", f"--exported={exported}", "--top_k=3", *paths)
    from_checkpoint = run_module(
        "resnet_jax.predict", f"--workdir={trained_run['workdir']}", "--top_k=3", *paths
    )

    assert from_export.returncode == 0, from_export.stderr[-2000:]
    assert [line.split(":")[0] for line in from_export.stdout.splitlines()] == paths
    for top_export, top_checkpoint in zip(
        ranked(from_export.stdout), ranked(from_checkpoint.stdout), strict=True
    ):
        assert len(top_export) == 3
        assert [name for name, _ in top_export] == [name for name, _ in top_checkpoint]
        np.testing.assert_allclose(
            [p for _, p in top_export], [p for _, p in top_checkpoint], atol=0.0011
        )

    # A damaged export and a workdir passed as one: one paragraph each, no traceback.
    (exported / "model.jaxexport").write_bytes(b"\x00" * 100)
    for directory, explained in [
        (exported, "is damaged"),
        (trained_run["workdir"], "is a training run's workdir, not an export"),
    ]:
        done = run_module("resnet_jax.predict", f"--exported={directory}", *paths)
        assert done.returncode == 1
        assert "Traceback" not in done.stderr and "Error: " in done.stderr
        assert explained in " ".join(done.stderr.split())
