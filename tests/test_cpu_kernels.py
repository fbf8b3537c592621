"""oneDNN convolutions: built and used where they can be, XLA's convs where they cannot.

The conv itself is checked against `lax.conv_general_dilated` in test_models.py (every path of
the conv hook, gradients included); here: the build, the fallback and a whole train step.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
import textwrap
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models, onednn, train_state
from tests.conftest import REPO_ROOT


@pytest.fixture
def fresh_availability(monkeypatch):
    """`onednn.available()` computed again in this test, and again after it."""
    onednn.available.cache_clear()
    yield
    monkeypatch.undo()
    onednn.available.cache_clear()


@pytest.mark.skipif(
    sys.platform != "linux" or platform.machine() != "x86_64", reason="oneDNN wheels: Linux x86-64"
)
def test_the_shim_builds_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_JAX_CACHE", str(tmp_path))

    library = onednn.build_library()

    assert library.is_file() and library.is_relative_to(tmp_path)
    assert onednn.build_library() == library  # the second call reuses the build


def test_a_failed_build_falls_back_to_xla_with_one_warning(fresh_availability, monkeypatch, caplog):
    def no_compiler():
        raise onednn.BuildError("no C++ compiler (g++) on PATH; install g++ or set CXX")

    monkeypatch.setattr(onednn, "build_library", no_compiler)
    with caplog.at_level(logging.WARNING, logger=onednn.__name__):
        assert not onednn.available()
        assert not onednn.available()

    assert [r.getMessage() for r in caplog.records] == [
        "The oneDNN shim is off, XLA's convs and sums are used instead: no C++ compiler (g++) on "
        "PATH; install g++ or set CXX"
    ]


def test_the_environment_variable_turns_it_off(fresh_availability, monkeypatch):
    monkeypatch.setenv(onednn.DISABLE_ENV, "0")

    assert not onednn.available()


def test_a_train_step_on_onednn_equals_the_one_on_xla(monkeypatch):
    if not onednn.available():
        pytest.skip("oneDNN convolutions are not available here")
    model = models.get_model("resnet20", 10, width=4)
    init = jax.jit(lambda rng: model.init(rng, jnp.zeros((4, 16, 16, 3)), train=False))
    variables = init(jax.random.key(0, impl="rbg"))  # rbg: a short compile of the initializers
    state = train_state.create(
        model, optax.sgd(0.1, momentum=0.9), jax.random.key(1), (4, 16, 16, 3), variables=variables
    )
    images = jax.random.normal(jax.random.key(2, impl="rbg"), (4, 16, 16, 3))
    batch = {"image": images, "label": jnp.arange(4) % 10}

    def step_and_its_calls():
        step = jax.jit(train_state.train_step)
        text = step.lower(state, batch).as_text()
        return step(state, batch), text.count("ResnetJaxConv"), text.count("ResnetJaxChannelSums")

    on_onednn, *onednn_calls = step_and_its_calls()
    monkeypatch.setattr(onednn, "usable", lambda lhs, rhs: False)
    jax.clear_caches()  # jit would otherwise reuse the trace with oneDNN's convs
    on_xla, *xla_calls = step_and_its_calls()

    # The stem conv takes no input gradient; each of the 19 BNs sums once forward, once backward.
    assert (onednn_calls, xla_calls) == ([19 * 3 - 1, 19 * 2], [0, 0])

    chex.assert_trees_all_close(on_onednn, on_xla, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 300, 64), (4, 4, 4, 512)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channel_sums_are_the_exact_sums_rounded_to_float32(shape, dtype):
    # Row counts that are no multiple of the kernel's 128-row blocks nor of its threads.
    if not onednn.available():
        pytest.skip("the shim is not available here")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(1.0, 2.0, shape), dtype)
    b = jnp.asarray(rng.normal(-0.5, 1.0, shape), dtype)

    sums = jax.jit(onednn.channel_sums)(a, b)

    a64, b64 = (np.asarray(v, np.float64).reshape(-1, shape[-1]) for v in (a, b))
    for got, terms in zip(sums, (a64, a64 * b64), strict=True):
        assert got.dtype == jnp.float32
        # Within a few float32 roundings of the sum of magnitudes (the exact sum can cancel).
        tolerance = 4 * np.finfo(np.float32).eps * np.abs(terms).sum(0)
        np.testing.assert_array_less(np.abs(np.asarray(got) - terms.sum(0)), tolerance)


def test_one_conv_run_from_several_threads_at_once_gives_the_same_gradients():
    # XLA runs convs from any of its threads, two at once at times: each execution needs its own
    # scratchpad (oneDNN's default one belongs to the thread that built the primitive).
    if not onednn.available():
        pytest.skip("oneDNN convolutions are not available here")
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (32, 16, 16, 64))
    kernel = 0.05 * jax.random.normal(jax.random.key(1, impl="rbg"), (3, 3, 64, 64))
    padding = ((1, 1), (1, 1))
    grads = jax.jit(jax.grad(lambda x, k: jnp.sum(onednn.conv(x, k, (1, 1), padding) ** 2), (0, 1)))
    expected = jax.device_get(grads(x, kernel))  # builds the primitives on this thread
    mismatches = []

    def run_repeatedly():
        for _ in range(20):
            got = jax.device_get(grads(x, kernel))
            mismatches.extend(a for a, b in zip(got, expected, strict=True) if not (a == b).all())

    threads = [threading.Thread(target=run_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches


# Kernel gradient of one conv, saved to argv[2], run (and its primitive built) on the main thread
# with argv[1] OpenMP threads set on it, as torch.set_num_threads does.
KERNEL_GRADIENT_SCRIPT = textwrap.dedent("""
    import ctypes, sys
    import jax, jax.numpy as jnp, numpy as np
    from resnet_jax import onednn
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # the conv runs on this thread
    assert onednn.available()
    ctypes.CDLL("libgomp.so.1").omp_set_num_threads(int(sys.argv[1]))
    x = jax.random.normal(jax.random.key(0), (10, 32, 32, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
    loss = lambda k: jnp.sum(onednn.conv(x, k, (1, 1), ((1, 1), (1, 1))) ** 2)
    np.save(sys.argv[2], np.asarray(jax.jit(jax.grad(loss))(kernel)))
""")


def test_a_conv_gives_the_same_gradients_whatever_openmp_setting_its_thread_has(tmp_path):
    # oneDNN splits the kernel gradient's sums by the thread count of the thread that builds the
    # primitive; a thread on which torch had set one thread once built a differently rounded one.
    if not onednn.available():
        pytest.skip("oneDNN convolutions are not available here")
    grads = {}
    for threads in (1, 2):
        out = tmp_path / f"{threads}.npy"
        done = subprocess.run(
            [sys.executable, "-c", KERNEL_GRADIENT_SCRIPT, str(threads), str(out)],
            cwd=REPO_ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        grads[threads] = np.load(out)
    np.testing.assert_array_equal(grads[1], grads[2])
