"""Importing resnet_jax changes nothing in the process; `resnet_jax.cpu.setup()` is what does.

Each check runs in a fresh interpreter: the state it looks at (environment, jax.config, the
matplotlib backend, sys hooks, glibc's malloc) is process-wide and set at most once.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT, SUBPROCESS_TIMEOUT_S

# Snapshots the process state, runs ACTION, and prints what changed as one JSON object. mallopt
# calls are recorded by wrapping ctypes' library loaders (resnet_jax reaches libc through them).
PROBE = textwrap.dedent("""
    import ctypes, json, os, sys

    mallopt_calls = []

    class RecordingCDLL(ctypes.CDLL):
        def __getattr__(self, name):
            function = super().__getattr__(name)
            if name != "mallopt":
                return function
            def mallopt(*args):
                mallopt_calls.append(args)
                return function(*args)
            setattr(self, name, mallopt)  # CDLL caches the function it found the same way
            return mallopt

    ctypes.CDLL = RecordingCDLL
    ctypes.cdll._dlltype = RecordingCDLL

    import jax
    import matplotlib

    def state():
        return {
            "environ": dict(os.environ),
            "jax_config": {k: repr(v) for k, v in jax.config.values.items()},
            "matplotlib_backend": repr(matplotlib.rcParams._get_backend_or_none()),
            "pyplot_imported": "matplotlib.pyplot" in sys.modules,
            "hooks": [id(sys.unraisablehook), id(sys.excepthook), id(sys.displayhook)],
        }

    before = state()
    ACTION
    after = state()
    changed = {}
    for key in before:
        if isinstance(before[key], dict):
            names = set(before[key]) | set(after[key])
            diff = {k: [before[key].get(k), after[key].get(k)] for k in sorted(names)
                    if before[key].get(k) != after[key].get(k)}
        else:
            diff = [before[key], after[key]] if before[key] != after[key] else {}
        if diff:
            changed[key] = diff
    if mallopt_calls:
        changed["mallopt"] = mallopt_calls
    print("CHANGED " + json.dumps(changed))
""")

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, resnet_jax
modules = [m.name for m in pkgutil.walk_packages(resnet_jax.__path__, "resnet_jax.")]
for name in modules:
    importlib.import_module(name)
assert "resnet_jax.cpu.kernels" in modules and "resnet_jax.train" in modules, modules
"""


def changes_made_by(action: str, env: dict[str, str]) -> dict:
    """What `action` (Python source) changed in a fresh interpreter's process state."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE.replace("ACTION", textwrap.dedent(action))],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("CHANGED ")]
    return json.loads(line.removeprefix("CHANGED "))


def clean_environment() -> dict[str, str]:
    """os.environ without the settings `setup()` would leave alone if the user had set them."""
    names = ("XLA_FLAGS", "JAX_CPU_ENABLE_ASYNC_DISPATCH", "RESNET_JAX_XLA_DEFAULTS",
             "RESNET_JAX_MALLOC", "GLIBC_TUNABLES")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith("MALLOC_")}
    return env | {"PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_importing_every_module_changes_nothing_in_the_process():
    assert changes_made_by(IMPORT_EVERY_MODULE, clean_environment()) == {}


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only"
)
def test_cpu_setup_applies_the_xla_flags_malloc_and_synchronous_dispatch():
    changed = changes_made_by("import resnet_jax.cpu; resnet_jax.cpu.setup()", clean_environment())

    assert set(changed) == {"environ", "jax_config", "mallopt"}, changed
    assert changed["environ"] == {
        "XLA_FLAGS": [None, "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"]
    }
    assert changed["jax_config"] == {"jax_cpu_enable_async_dispatch": ["True", "False"]}
    assert changed["mallopt"] == [[-8, 1], [-4, 0], [-1, -1]]


def test_cpu_setup_is_switched_off_by_its_environment_variables():
    env = clean_environment() | {"RESNET_JAX_XLA_DEFAULTS": "0", "RESNET_JAX_MALLOC": "0"}

    assert changes_made_by("import resnet_jax.cpu; resnet_jax.cpu.setup()", env) == {}
