"""The per-backend XLA defaults: added only where the user set nothing, and switchable off."""

import os
import platform
import subprocess
import sys

import pytest

from resnet_jax import xla_setup

FLAG = "--xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_appended_to_the_users_flags():
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    added = xla_setup.apply_defaults(environ)
    assert added and all(flag.split("=")[0] in xla_setup.CPU_DEFAULTS for flag in added)
    assert environ["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=2 ")
    assert FLAG in xla_setup.flag_names(environ["XLA_FLAGS"])


def test_a_flag_the_user_set_wins():
    environ = {"XLA_FLAGS": f"{FLAG}=individual_convolution"}
    xla_setup.apply_defaults(environ)
    assert environ["XLA_FLAGS"].split().count(f"{FLAG}=individual_convolution") == 1
    assert sum(token.startswith(FLAG) for token in environ["XLA_FLAGS"].split()) == 1


def test_switched_off():
    environ = {xla_setup.DISABLE_ENV: "0"}
    assert xla_setup.apply_defaults(environ) == []
    assert "XLA_FLAGS" not in environ


# Allocates, fills and frees a 256 MiB block on a worker thread twice, as XLA does with a step's
# temporaries; prints the page faults of the second round (about 65k when each block is a fresh
# mmap, none when the freed block is reused).
REUSE_PROBE = """
import ctypes, resource, threading
import resnet_jax, jax

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
@pytest.mark.parametrize("switch", ["1", "0"])
def test_a_step_reuses_the_memory_freed_by_the_last(switch):
    env = {**os.environ, xla_setup.MALLOC_ENV: switch}
    out = subprocess.run(
        [sys.executable, "-c", REUSE_PROBE], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    faults, async_dispatch = int(out[0]), out[1] == "True"
    if switch == "1":
        assert faults < 1000 and not async_dispatch
    else:  # malloc untouched: the block is mapped afresh and faulted in page by page
        assert faults > 60_000 and async_dispatch


def test_a_users_own_malloc_setting_is_left_alone():
    assert not xla_setup.reuse_step_memory({"MALLOC_ARENA_MAX": "4"})
    assert not xla_setup.reuse_step_memory({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0"})
    assert not xla_setup.reuse_step_memory({xla_setup.MALLOC_ENV: "0"})
