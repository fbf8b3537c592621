"""The CPU plug-in on the CPUs CI does not run on.

The kernel-equivalence tests, the bfloat16 tests and a short bfloat16 training run pass again in
a process that imitates an AVX2-only x86 CPU (oneDNN, XLA:CPU and PyTorch held to AVX2 by
`cpu.isa_capped_environment`), and in one without the oneDNN wheels, as on aarch64 or macOS where
pip does not install them (`tests/without_onednn.py`). Each runs its own pytest, serially: the
same tests, whose results are compared with plain Flax as on this machine.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from resnet_jax import cpu
from tests.conftest import REPO_ROOT, subprocess_env

KERNELS = "tests/test_cpu_kernels.py::test_"
# Each kernel against the op it stands in for, a whole net against plain Flax (float32 and
# bfloat16), where each conv and sum runs, the bfloat16 model and step, and a bfloat16 run.
PORTABLE_TESTS = (
    f"{KERNELS}the_cpu_kernel_set_computes_what_plain_flax_does[basic-blocks-resnet20]",
    f"{KERNELS}on_the_shim_every_3x3_conv_and_every_batch_statistic_runs_there",
    f"{KERNELS}conv_hook_equals_lax_conv_with_gradients",
    f"{KERNELS}a_bfloat16_1x1_conv_gets_its_kernel_gradient_from_a_dot_in_the_kernels_layout",
    f"{KERNELS}max_pool_sums_a_bfloat16_gradient_in_float32_and_rounds_once",
    f"{KERNELS}batchnorm_computes_what_the_plain_batchnorm_does",
    f"{KERNELS}bfloat16_batchnorm_rounds_what_the_plain_batchnorm_computes",
    f"{KERNELS}channel_sums_are_the_exact_sums_rounded_to_float32",
    "tests/test_models.py::test_bfloat16_compute_keeps_float32_params_and_logits",
    "tests/test_train_state.py::test_bfloat16_compute_keeps_float32_params_and_loss",
    "tests/test_train.py::test_a_bfloat16_run_with_trivialaugment_mixup_and_cutmix_trains_and_reports",
)
# What the shim reports for a 3x3 conv of each dtype in the imitated process, printed as
# "float32 True" / "bfloat16 False": whether oneDNN builds fast kernels for it.
SHIM_REPORT = """
import jax.numpy as jnp
from resnet_jax.cpu import onednn
print("available", onednn.available())
for dtype in ("float32", "bfloat16"):
    if onednn.available():
        print(dtype, onednn.has_fast_conv((2, 8, 8, 4), (3, 3, 4, 4), dtype, (1, 1), ((1, 1),) * 2))
"""


def run_python(args: list[str], env: dict[str, str]) -> str:
    env = {name: value for name, value in env.items() if not name.startswith("PYTEST_")}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


@pytest.mark.slow
def test_on_an_avx2_only_cpu_the_kernel_and_bfloat16_tests_pass(tmp_path):
    env = cpu.isa_capped_environment("AVX2", subprocess_env())

    # The imitation holds: oneDNN has AVX2 float32 kernels and no bfloat16 ones, as on such a CPU.
    report = run_python(["-c", SHIM_REPORT], env).split("\n")
    assert report[:3] == ["available True", "float32 True", "bfloat16 False"]

    out = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                      str(tmp_path / "t"), *PORTABLE_TESTS], env)  # fmt: skip
    assert " passed" in out and " failed" not in out


@pytest.mark.slow
def test_without_the_onednn_wheels_the_kernel_and_bfloat16_tests_pass(tmp_path):
    env = {**subprocess_env(), "RESNET_JAX_CACHE": str(tmp_path / "cache")}  # no built shim either

    plugin = ["-p", "tests.without_onednn"]
    report = run_python(["-c", "import tests.without_onednn\n" + SHIM_REPORT], env)
    assert report.split("\n")[0] == "available False"

    out = run_python(["-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, "--basetemp",
                      str(tmp_path / "t"), *PORTABLE_TESTS], env)  # fmt: skip
    assert " passed" in out and " failed" not in out


@pytest.mark.parametrize(
    ("system", "machine", "installed"),
    [("linux", "x86_64", True), ("linux", "aarch64", False), ("darwin", "arm64", False),
     ("darwin", "x86_64", False), ("win32", "AMD64", False)],
)  # fmt: skip
def test_pip_installs_the_onednn_wheels_only_on_x86_64_linux(system, machine, installed):
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    onednn = [Requirement(r) for r in project["dependencies"] if r.startswith("onednn")]
    where = {"sys_platform": system, "platform_machine": machine}

    assert len(onednn) == 2
    assert all(r.marker.evaluate(where) == installed for r in onednn)
