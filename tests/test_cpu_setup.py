"""The CPU process settings of `resnet_jax.cpu.setup()`: XLA flags added only where the user set
nothing, malloc tuned unless the user tuned it, and applied by the command lines only on the CPU.
(tests/test_imports.py checks in a fresh process that setup() applies them and import does not.)
"""

import importlib.metadata
import os
import platform
import subprocess
import sys

import pytest

from resnet_jax.cpu import process

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_appended_to_the_users_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    added = process.apply_xla_defaults(environ)
    assert added and all(flag.split("=")[0] in process.CPU_DEFAULTS for flag in added)
    assert environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 ")
    assert FLAG in process.flag_names(environ["XLA_FLAGS"])


def test_a_flag_the_user_set_wins():
    environ = {"XLA_FLAGS": f"{FLAG}=individual_convolution"}
    process.apply_xla_defaults(environ)
    assert environ["XLA_FLAGS"].split().count(f"{FLAG}=individual_convolution") == 1
    assert sum(token.startswith(FLAG) for token in environ["XLA_FLAGS"].split()) == 1


def test_switched_off():
    environ = {process.XLA_DEFAULTS_ENV: "0"}
    assert process.apply_xla_defaults(environ) == []
    assert "XLA_FLAGS" not in environ


# Allocates, fills and frees a 256 MiB block on a worker thread twice, as XLA does with a step's
# temporaries; prints the page faults of the second round (about 65k when each block is a fresh
# mmap, none when the freed block is reused).
REUSE_PROBE = """
import ctypes, resource, threading
import jax
import resnet_jax.cpu

resnet_jax.cpu.setup()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 256 * 1024 * 1024

def step():
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)

def on_a_worker_thread():
    thread = threading.Thread(target=step)
    thread.start()
    thread.join()

on_a_worker_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
on_a_worker_thread()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults, jax.config.values["jax_cpu_enable_async_dispatch"])
"""


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)
@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("switch", ["1", "0"])
def test_a_step_reuses_the_memory_freed_by_the_last(switch):
    env = {**os.environ, process.MALLOC_ENV: switch}
    out = subprocess.run(
        [sys.executable, "-c", REUSE_PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    faults, async_dispatch = int(out[0]), out[1] == "True"
    if switch == "1":
        assert faults < 1000 and not async_dispatch
    else:  # malloc untouched: the block is mapped afresh and faulted in page by page
        assert faults > 60_000 and async_dispatch


def test_a_users_own_malloc_setting_is_left_alone():
    assert not process.reuse_step_memory({"MALLOC_ARENA_MAX": "4"})
    assert not process.reuse_step_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert not process.reuse_step_memory({process.MALLOC_ENV: "0"})


class FakeDistribution:
    def __init__(self, name: str):
        self.metadata = {"Name": name}


@pytest.mark.parametrize(
    ("jax_platforms", "installed", "on_cpu"),
    [
        ("cpu", ["jax-cuda12-plugin"], True),
        ("cuda,cpu", [], False),
        ("tpu", [], False),
        ("", ["numpy", "jaxlib"], True),
        ("", ["jax_cuda13_plugin"], False),
        ("", ["jax-rocm60-plugin"], False),
        ("", ["libtpu"], False),
    ],
)
def test_the_cpu_is_told_apart_from_an_accelerator_without_starting_jax(
    monkeypatch, jax_platforms, installed, on_cpu
):
    distributions = [FakeDistribution(name) for name in installed]
    monkeypatch.setattr(importlib.metadata, "distributions", lambda: distributions)

    assert process.will_run_on_cpu({"JAX_PLATFORMS": jax_platforms}) is on_cpu
