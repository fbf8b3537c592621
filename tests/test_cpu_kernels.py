"""The CPU kernel set (`resnet_jax.cpu.kernels`) computes what plain Flax does, and its oneDNN shim
is built and used where it can be, with XLA's ops where it cannot.

First the whole models on both kernel sets (same variables: forward, gradients, BatchNorm
statistics, checkpoints), then each kernel against the Flax or lax op it stands in for, then the
shim. Tests that need the shim skip where it cannot be built.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import platform
import re
import subprocess
import sys
import textwrap
import threading
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax import lax

from resnet_jax import layers, models
from resnet_jax.cpu import kernels, onednn
from resnet_jax.cpu.kernels import kernel_modules
from tests.conftest import REPO_ROOT

needs_shim = pytest.mark.skipif("not onednn.available()", reason="the oneDNN shim is not here")


@pytest.fixture(params=["onednn", "xla"])
def conv_backend(request, monkeypatch):
    """Runs a test on the shim's convs and sums, and on XLA's (the fallback off one CPU device)."""
    if request.param == "onednn":
        if not onednn.available():
            pytest.skip("the oneDNN shim is not available here")
    else:
        monkeypatch.setattr(onednn, "usable", lambda lhs, rhs: False)
    return request.param


def assert_close_to_scale(got, want, fraction: float) -> None:
    """Every leaf of `got` within `fraction` of the largest magnitude of its leaf in `want`."""
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    for got_leaf, (path, want_leaf) in zip(jax.tree.leaves(got), want_leaves, strict=True):
        got_leaf, want_leaf = np.asarray(got_leaf, np.float32), np.asarray(want_leaf, np.float32)
        scale, error = np.max(np.abs(want_leaf)), np.max(np.abs(got_leaf - want_leaf))
        assert error <= fraction * scale, f"{jax.tree_util.keystr(path)}: {error} of {scale}"


def relative_error(got, want) -> float:
    """||got - want|| / ||want|| over every leaf of the trees together."""
    got, want = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
                 for t in (got, want))  # fmt: skip
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


# -- whole models on both kernel sets -----------------------------------------------------------


def basic_block_net(kernels: str, dtype) -> models.ResNet:
    return models.get_model("resnet20", 10, width=4, dtype=dtype, kernels=kernels)


def bottleneck_net(kernels: str, dtype) -> models.ResNet:
    # One block per stage: deeper tiny nets at init amplify any rounding difference (the
    # bfloat16 gradients of a width-4 resnet50 differ from its float32 ones by 100%).
    return models.ResNet(
        stage_sizes=(1, 1, 1, 1), block_cls=models.Bottleneck, num_classes=10, stem="imagenet",
        stem_width=4, stage_widths=(4, 8, 16, 32), dtype=dtype, **kernel_modules(kernels),
    )  # fmt: skip


def train_outputs(model: models.ResNet, variables: dict, images: jax.Array) -> tuple:
    """A train-mode cross-entropy step's (logits, parameter gradients, new batch statistics)."""
    labels = jnp.arange(images.shape[0]) % 10

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, updates["batch_stats"])

    grads, (logits, stats) = jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])
    return logits, grads, stats


@pytest.mark.slow  # compiles two whole nets' gradients twice each
@pytest.mark.parametrize(
    ("net", "image_size"),
    [
        pytest.param(basic_block_net, 16, id="basic-blocks-resnet20"),
        pytest.param(bottleneck_net, 32, id="bottlenecks-imagenet-stem"),  # maps down to 1x1
    ],
)
def test_the_cpu_kernel_set_computes_what_plain_flax_does(net, image_size):
    images = jax.random.normal(jax.random.key(0, impl="rbg"), (8, image_size, image_size, 3))
    plain = net("xla", jnp.float32)
    variables = jax.jit(functools.partial(plain.init, train=False))(jax.random.key(1), images)
    want = train_outputs(plain, variables, images)

    got = train_outputs(net("cpu", jnp.float32), variables, images)
    chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
    # The same sums in another order: a wrong tap, shift or statistic would be off by O(1).
    for got_part, want_part in zip(got, want, strict=True):
        for got_leaf, want_leaf in zip(*map(jax.tree.leaves, (got_part, want_part)), strict=True):
            assert relative_error(got_leaf, want_leaf) < 1e-3

    # bfloat16 rounds every layer's output, the two sets at different points: the CPU set's
    # logits, gradients and statistics are as far from float32's as plain Flax's bf16 ones are.
    plain_bf16 = train_outputs(net("xla", jnp.bfloat16), variables, images)
    cpu_bf16 = train_outputs(net("cpu", jnp.bfloat16), variables, images)
    chex.assert_trees_all_equal_shapes_and_dtypes(cpu_bf16, plain_bf16)
    for what, got_part, plain_part, want_part in zip(
        ("logits", "gradients", "statistics"), cpu_bf16, plain_bf16, want, strict=True
    ):
        bf16_error = relative_error(plain_part, want_part)
        assert relative_error(got_part, want_part) <= 2 * bf16_error + 1e-3, what


@pytest.mark.parametrize(("saved_with", "restored_into"), [("cpu", "xla"), ("xla", "cpu")])
def test_a_checkpoint_of_one_kernel_set_restores_into_the_other(
    saved_with, restored_into, tmp_path
):
    images = jax.random.normal(jax.random.key(0, impl="rbg"), (4, 16, 16, 3))
    saving = models.get_model("resnet20", 10, width=4, kernels=saved_with)
    restoring = models.get_model("resnet20", 10, width=4, kernels=restored_into)
    variables = saving.init(jax.random.key(1), images, train=False)
    _, trained_stats = saving.apply(variables, images, train=True, mutable=["batch_stats"])
    variables = {**variables, **trained_stats}  # statistics of their own, not the initial ones
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / "checkpoint", variables)
    checkpointer.wait_until_finished()

    restored = checkpointer.restore(
        tmp_path / "checkpoint", models.init_shapes(restoring, images.shape)
    )

    chex.assert_trees_all_equal(restored, variables)
    chex.assert_trees_all_close(
        restoring.apply(restored, images, train=False),
        saving.apply(variables, images, train=False),
        rtol=1e-5,
        atol=1e-5,
    )


def counting(calls: collections.Counter, name: str, function):
    """`function`, counting its calls under `name` in `calls`."""

    def call(*args, **kwargs):
        calls[name] += 1
        return function(*args, **kwargs)

    return call


def traced_step(model: models.ResNet, train: bool, grad: bool) -> None:
    """Trace (no compile, no run) resnet20's forward pass, and its gradient if `grad`."""
    images = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    variables = models.init_shapes(model, images.shape)

    def loss(params, batch_stats, images):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, images, train=train,
            mutable=["batch_stats"],
        )  # fmt: skip
        return jnp.sum(logits)

    fn = jax.grad(loss) if grad else loss
    jax.eval_shape(fn, variables["params"], variables["batch_stats"], images)


@needs_shim
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_on_the_shim_every_3x3_conv_and_every_batch_statistic_runs_there(monkeypatch, train, dtype):
    calls = collections.Counter()
    shim = types.ModuleType(onednn.__name__)  # what the kernels call; the shim's own calls as is
    shim.__dict__.update(vars(onednn))
    for name in ("conv", "channel_sums"):
        setattr(shim, name, counting(calls, name, getattr(onednn, name)))
    monkeypatch.setattr(kernels, "onednn", shim)

    traced_step(models.get_model("resnet20", 10, width=4, dtype=dtype, kernels="cpu"), train, train)

    # resnet20's 19 convs (the stem and 18 in blocks), each called twice by nn.Conv (once for its
    # output shape), where oneDNN builds them on this CPU (bfloat16 needs AVX-512); in training
    # each of the 19 BNs sums forward and backward, on any x86 CPU.
    convs = 2 * 19 if onednn_builds(dtype) else 0
    assert calls == ({"conv": convs} if convs else {}) | ({"channel_sums": 2 * 19} if train else {})


def onednn_builds(dtype) -> bool:
    """Whether oneDNN has fast kernels for a 3x3 conv of `dtype` on this CPU."""
    dtype = jnp.dtype(dtype).name
    return onednn.has_fast_conv((2, 8, 8, 4), (3, 3, 4, 4), dtype, (1, 1), ((1, 1), (1, 1)))


@needs_shim
@pytest.mark.parametrize(
    "implementations",
    [("", "", ""), ("jit:avx2", "jit:avx2", ""), ("ref:any", "ref:any", "ref:any")],
    ids=["none", "no-kernel-gradient", "reference-only"],
)
def test_a_conv_onednn_cannot_build_fast_here_runs_on_xla_with_one_debug_line(
    monkeypatch, caplog, implementations
):
    # As a bfloat16 conv on a CPU without AVX-512: oneDNN cannot build it, or only its slow
    # reference kernels. The hook asks once per conv shape and then leaves it to XLA's conv.
    monkeypatch.setattr(onednn, "conv_implementations", lambda *args: implementations)
    onednn._log_fallback.cache_clear()
    monkeypatch.setattr(onednn, "conv", lambda *args: pytest.fail("oneDNN's conv was called"))
    x = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 8, 8, 3))
    kernel = jax.random.normal(jax.random.key(2, impl="rbg"), (3, 3, 3, 5))
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, kernels.NHWC)
    padding = ((1, 1), (1, 1))

    with caplog.at_level(logging.DEBUG, logger=onednn.__name__):
        for _ in range(2):  # traced twice: one line
            got = kernels.conv_general_dilated(
                x, kernel, (1, 1), padding, dimension_numbers=numbers
            )

    want = lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=numbers)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "XLA's conv runs it" in caplog.records[0].getMessage()


@needs_shim
def test_onednn_names_its_conv_kernels_and_has_fast_ones_for_float32_on_every_x86_cpu():
    padding = ((1, 1), (1, 1))
    names = onednn.conv_implementations((2, 8, 8, 4), (3, 3, 4, 4), "float32", (1, 1), padding)

    assert len(names) == 3 and all(":" in name for name in names)  # e.g. "jit:avx2"
    assert onednn_builds(jnp.float32)


@pytest.mark.parametrize(
    ("train", "frozen_stages", "trained"),
    [(True, -1, 19), (False, -1, 0), (True, 2, 6)],  # resnet20: the stem and 18 3x3 convs
    ids=["train", "eval", "train-frozen-to-stage-2"],
)
def test_off_the_shim_only_convs_that_get_a_kernel_gradient_materialize_their_input(
    monkeypatch, train, frozen_stages, trained
):
    calls = collections.Counter()
    monkeypatch.setattr(onednn, "usable", lambda lhs, rhs: False)
    monkeypatch.setattr(
        kernels, "materialized", counting(calls, "materialized", kernels.materialized)
    )
    model = models.get_model("resnet20", 10, frozen_stages=frozen_stages, width=4, kernels="cpu")

    traced_step(model, train, train)

    assert calls["materialized"] == trained


def test_only_a_float32_input_is_materialized():
    x = jnp.ones((2, 4, 4, 3))

    assert "dot_general" in str(jax.make_jaxpr(kernels.materialized)(x))
    assert "dot_general" not in str(jax.make_jaxpr(kernels.materialized)(x.astype(jnp.bfloat16)))


# -- each kernel against the op it stands in for ------------------------------------------------

CONV_CASES = [
    pytest.param((2, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), id="3x3"),
    pytest.param((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1)), id="3x3-stride2"),
    pytest.param((2, 9, 9, 4), (7, 7), (2, 2), ((3, 3), (3, 3)), id="7x7-stride2-stem"),
    pytest.param((2, 8, 8, 4), (1, 1), (2, 2), ((0, 0), (0, 0)), id="1x1-stride2-as-dot"),
    pytest.param((2, 2, 2, 4), (3, 3), (1, 1), ((1, 1), (1, 1)), id="3x3-on-2x2-im2col"),
    pytest.param((2, 3, 3, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), id="3x3-stride2-on-3x3-im2col"),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("lhs_shape", "window", "strides", "padding"), CONV_CASES)
def test_conv_hook_equals_lax_conv_with_gradients(
    conv_backend, lhs_shape, window, strides, padding, dtype
):
    # Every path of the hook (oneDNN or XLA's conv, im2col, 1x1 as a dot) against XLA's conv,
    # compiled as in training.
    lhs = jax.random.normal(jax.random.key(1, impl="rbg"), lhs_shape, dtype)
    rhs = jax.random.normal(jax.random.key(2, impl="rbg"), (*window, lhs_shape[-1], 5), dtype)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, kernels.NHWC)

    def loss(conv, lhs, rhs):
        y = conv(lhs, rhs, strides, padding, dimension_numbers=numbers)
        return jnp.sum(jnp.sin(y)), y

    def value_and_grads(conv):
        grad_fn = jax.value_and_grad(functools.partial(loss, conv), argnums=(0, 1), has_aux=True)
        return jax.jit(grad_fn)(lhs, rhs)

    (_, want), want_grads = value_and_grads(lax.conv_general_dilated)
    (_, got), got_grads = value_and_grads(kernels.conv_general_dilated)
    chex.assert_trees_all_equal_dtypes((got, got_grads), (want, want_grads))
    if dtype == jnp.float32:
        # float32 sums in another order: a wrong tap or shift would be off by O(1), not 1e-4.
        chex.assert_trees_all_close((got, got_grads), (want, want_grads), rtol=1e-4, atol=1e-4)
        return
    # bfloat16 rounds each result to 8 mantissa bits (0.4%): allowed 3% of each result's scale.
    assert_close_to_scale((got, got_grads), (want, want_grads), 0.03)


def test_a_bfloat16_1x1_conv_gets_its_kernel_gradient_from_a_dot_in_the_kernels_layout():
    # What it guards is a layout, which no output shows: rounded to bf16 between the dot and the
    # float32 parameter, the gradient came out of XLA:CPU's dot transposed (out x in) and was
    # copied back in a slow strided loop. So this one reads the compiled HLO.
    x = jax.random.normal(jax.random.key(1, impl="rbg"), (8, 4, 4, 64), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(2, impl="rbg"), (1, 1, 64, 128))
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, kernels.NHWC)

    def loss(kernel):
        kernel = kernel.astype(jnp.bfloat16)
        y = kernels.conv_general_dilated(
            x, kernel, (1, 1), ((0, 0), (0, 0)), dimension_numbers=numbers
        )
        return jnp.sum(jnp.sin(y.astype(jnp.float32)))

    hlo = jax.jit(jax.grad(loss)).lower(kernel).compile().as_text()
    dot_shapes = re.findall(r"= f32\[(\d+,\d+)\]\S* dot\(", hlo)
    assert "64,128" in dot_shapes and "128,64" not in dot_shapes, dot_shapes


def test_max_pool_equals_flax_with_gradients_routed_to_the_first_maximum():
    x = jax.random.normal(jax.random.key(3, impl="rbg"), (2, 7, 7, 3))
    x = x.at[:, 2, 2, :].set(x[:, 2, 3, :])  # ties: the gradient goes to the first in the window
    args = ((3, 3), (2, 2), ((1, 1), (1, 1)))

    def loss(pool, x):
        return jnp.sum(jnp.sin(pool(x, *args)))

    want = jax.value_and_grad(functools.partial(loss, nn.max_pool))(x)
    got = jax.value_and_grad(functools.partial(loss, kernels.max_pool))(x)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_max_pool_sums_a_bfloat16_gradient_in_float32_and_rounds_once():
    # A spike at an odd pixel is the maximum of the four 3x3/2 windows that overlap there, so it
    # gets four gradients; summed in bf16 they would be rounded three times.
    args = ((3, 3), (2, 2), ((1, 1), (1, 1)))
    x = 0.1 * jax.random.normal(jax.random.key(4, impl="rbg"), (2, 7, 7, 16))
    for row, col in ((1, 1), (1, 5), (5, 1), (5, 5)):
        x = x.at[:, row, col, :].set(10.0)
    dy = jax.random.normal(jax.random.key(5, impl="rbg"), (2, 4, 4, 16))

    def input_grad(x, dy):
        return jax.vjp(lambda x: kernels.max_pool(x, *args), x)[1](dy)[0]

    got = input_grad(x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
    want = input_grad(
        x.astype(jnp.bfloat16).astype(jnp.float32), dy.astype(jnp.bfloat16).astype(jnp.float32)
    )
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32)
    )


def _batch_norm_results(module, variables, x, weights, axis_name=None):
    """A loss through `module` in training mode: (loss, new batch stats, d loss / d (params, x)),
    over a leading device axis named `axis_name` when given (vmap stands in for pmap)."""

    def loss(params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), updates["batch_stats"]

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if axis_name is not None:
        grad = jax.vmap(grad, in_axes=(None, 0), axis_name=axis_name)
    (value, stats), grads = jax.jit(grad)(variables["params"], x)
    return value, stats, grads


@pytest.mark.parametrize("axis_name", [None, "devices"])
def test_batchnorm_computes_what_the_plain_batchnorm_does(conv_backend, axis_name):
    shape = (8, 6, 6, 16) if axis_name is None else (2, 4, 6, 6, 16)  # 2 devices of 4 examples
    x = 3.0 * jax.random.normal(jax.random.key(0, impl="rbg"), shape) + 1.0
    weights = jax.random.normal(jax.random.key(1, impl="rbg"), shape[-4:])
    plain_bn = layers.BatchNorm(use_running_average=False, momentum=0.9, axis_name=axis_name)
    ours = kernels.BatchNorm(use_running_average=False, momentum=0.9, axis_name=axis_name)
    variables = plain_bn.init(jax.random.key(2), x.reshape(-1, *shape[-3:]))
    variables = jax.tree.map(  # not the identity: scales, shifts and statistics of their own
        lambda v: v + 0.5 * jax.random.uniform(jax.random.key(3), v.shape), variables
    )
    chex.assert_trees_all_close(
        _batch_norm_results(ours, variables, x, weights, axis_name),
        _batch_norm_results(plain_bn, variables, x, weights, axis_name),
        rtol=2e-5,
        atol=2e-5,
    )
    eval_x = x.reshape(-1, *shape[-3:])
    chex.assert_trees_all_close(
        kernels.BatchNorm(use_running_average=True).apply(variables, eval_x),
        layers.BatchNorm(use_running_average=True).apply(variables, eval_x),
        rtol=1e-6,
        atol=1e-6,
    )


def test_batch_norm_differentiates_its_statistics_too():
    x = 2.0 * jax.random.normal(jax.random.key(0, impl="rbg"), (6, 3, 3, 8)) - 1.0
    scale, bias = jnp.linspace(0.5, 2.0, 8), jnp.linspace(-1.0, 1.0, 8)
    u, v = jnp.linspace(-1.0, 1.0, 8), jnp.linspace(2.0, -2.0, 8)

    def plain(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = jnp.maximum(0.0, (x * x).mean((0, 1, 2)) - mean * mean)
        return (x - mean) * lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    def loss(normalize):
        def value(x, scale, bias):
            y, mean, var = normalize(x, scale, bias)
            return jnp.sum(jnp.sin(y)) + jnp.sum(mean * u) + jnp.sum(var * v)

        return jax.jit(jax.value_and_grad(value, argnums=(0, 1, 2)))(x, scale, bias)

    ours = loss(lambda x, scale, bias: kernels.batch_norm(x, scale, bias, 1e-5, None))
    chex.assert_trees_all_close(ours, loss(plain), rtol=2e-5, atol=2e-5)


@needs_shim
def test_bfloat16_batchnorm_rounds_what_the_plain_batchnorm_computes():
    x = (3.0 * jax.random.normal(jax.random.key(0, impl="rbg"), (8, 6, 6, 16)) + 1.0).astype(
        jnp.bfloat16
    )
    weights = jax.random.normal(jax.random.key(1, impl="rbg"), x.shape)
    plain_bn = layers.BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
    ours = kernels.BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
    variables = plain_bn.init(jax.random.key(2), x)
    value, stats, (dparams, dx) = _batch_norm_results(ours, variables, x, weights)
    expected_value, expected_stats, (expected_dparams, expected_dx) = _batch_norm_results(
        plain_bn, variables, x, weights
    )
    assert dx.dtype == jnp.bfloat16
    # The statistics come from the same bf16 inputs, summed in float32 or wider by both.
    chex.assert_trees_all_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
    # y (and so dy) is rounded to bf16 by both; where the rounding differs by one unit, the loss
    # and the gradients move by a fraction of a percent.
    chex.assert_trees_all_close((value, dparams), (expected_value, expected_dparams), rtol=1e-2)
    np.testing.assert_allclose(
        np.asarray(dx, np.float32), np.asarray(expected_dx, np.float32), rtol=0, atol=2e-2
    )


def test_batchnorm_saves_only_its_input_and_statistics_for_the_backward_pass():
    # What it exists for is memory, which no output shows: the centered activations are
    # recomputed in the backward pass, not saved. So this one counts the VJP's full-size residuals:
    # one (the input) where the plain BatchNorm under autodiff keeps two.
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (8, 4, 4, 16))

    def full_size_residuals(cls) -> int:
        bn = cls(use_running_average=False)
        variables = bn.init(jax.random.key(1), x)

        def normalize(params, x):
            return bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]

        _, backward = jax.vjp(normalize, variables["params"], x)
        return sum(leaf.shape == x.shape for leaf in jax.tree.leaves(backward))

    assert (full_size_residuals(kernels.BatchNorm), full_size_residuals(layers.BatchNorm)) == (1, 2)


# -- the oneDNN shim ----------------------------------------------------------------------------


@pytest.fixture
def fresh_availability(monkeypatch):
    """`onednn.available()` computed again in this test, and again after it."""
    onednn.loaded.cache_clear()
    yield
    monkeypatch.undo()
    onednn.loaded.cache_clear()


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


@needs_shim
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 300, 64), (4, 4, 4, 512)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_channel_sums_are_the_exact_sums_rounded_to_float32(shape, dtype):
    # Row counts that are no multiple of the kernel's 128-row blocks nor of its threads.
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


@needs_shim
def test_one_conv_run_from_several_threads_at_once_gives_the_same_gradients():
    # XLA runs convs from any of its threads, two at once at times: each execution needs its own
    # scratchpad (oneDNN's default one belongs to the thread that built the primitive).
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
    from resnet_jax.cpu import onednn
    jax.config.update("jax_cpu_enable_async_dispatch", False)  # the conv runs on this thread
    assert onednn.available()
    ctypes.CDLL("libgomp.so.1").omp_set_num_threads(int(sys.argv[1]))
    x = jax.random.normal(jax.random.key(0), (10, 32, 32, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
    loss = lambda k: jnp.sum(onednn.conv(x, k, (1, 1), ((1, 1), (1, 1))) ** 2)
    np.save(sys.argv[2], np.asarray(jax.jit(jax.grad(loss))(kernel)))
""")


@pytest.mark.slow  # a subprocess
@needs_shim
def test_a_conv_gives_the_same_gradients_whatever_openmp_setting_its_thread_has(tmp_path):
    # oneDNN splits the kernel gradient's sums by the thread count of the thread that builds the
    # primitive; a thread on which torch had set one thread once built a differently rounded one.
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
