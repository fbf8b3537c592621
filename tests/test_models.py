"""The model family: shapes and parameter counts via eval_shape, then a few passes on tiny nets.

The tiny nets run eagerly (no jit): the tests share op shapes, so each op compiles once per
process instead of every test compiling a whole-model program. They are initialized with "rbg"
keys because compiling threefry's random bits for every parameter shape costs seconds on CPU.
"""

import collections
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import traverse_util
from jax import lax

from resnet_jax import models, onednn

IMAGENET_NAMES = tuple(models.IMAGENET_FAMILY)
CIFAR_NAMES = tuple(models.CIFAR_FAMILY)
TINY = {"width": 4}
TINY_IMAGES_SHAPE = (2, 16, 16, 3)
COLLECTIONS = ("params", "batch_stats")


@functools.cache
def abstract_init(name: str, num_classes: int, image_size: int, **options):
    """Logits and variables (with the sown intermediates) as ShapeDtypeStructs, batch of 2."""
    model = models.get_model(name, num_classes, **options)
    images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
    init = functools.partial(model.init_with_output, train=False, mutable=True)
    return jax.eval_shape(init, jax.random.key(0), images)


def param_count(name: str, num_classes: int, **options) -> int:
    _, variables = abstract_init(name, num_classes, 32, **options)
    return models.count_params(variables["params"])


NATURAL_SIZES = [
    *(pytest.param(name, 1000, 224, {}, id=f"{name}-224") for name in IMAGENET_NAMES),
    *(
        pytest.param(name, 10, 32, {"stem": "cifar"}, id=f"{name}-cifar-stem-32")
        for name in IMAGENET_NAMES
    ),
    *(pytest.param(name, 10, 32, {}, id=f"{name}-32") for name in CIFAR_NAMES),
]


@pytest.mark.parametrize(("name", "num_classes", "image_size", "options"), NATURAL_SIZES)
def test_logits_shape_and_dtype(name, num_classes, image_size, options):
    logits, _ = abstract_init(name, num_classes, image_size, **options)

    chex.assert_shape(logits, (2, num_classes))
    assert logits.dtype == jnp.float32


@pytest.mark.parametrize(
    ("name", "image_size", "expected"),
    [
        ("resnet50", 224, {"stem": (56, 64), "layer1": (56, 256), "layer2": (28, 512),
                           "layer3": (14, 1024), "layer4": (7, 2048)}),
        ("resnet18", 224, {"stem": (56, 64), "layer1": (56, 64), "layer2": (28, 128),
                           "layer3": (14, 256), "layer4": (7, 512)}),
        ("resnet20", 32, {"stem": (32, 16), "layer1": (32, 16), "layer2": (16, 32),
                          "layer3": (8, 64)}),
    ],
)  # fmt: skip
def test_stage_output_shapes(name, image_size, expected):
    _, variables = abstract_init(name, 10, image_size)
    stages = variables["intermediates"]

    assert set(stages) == set(expected)
    for stage, (size, channels) in expected.items():
        (output,) = stages[stage]
        chex.assert_shape(output, (2, size, size, channels))


@pytest.mark.parametrize("name", IMAGENET_NAMES)
def test_imagenet_param_counts_equal_torchvision(name):
    with torch.device("meta"):  # shapes only: nothing is allocated or initialized
        torch_model = getattr(torchvision.models, name)(weights=None)
    torch_count = sum(parameter.numel() for parameter in torch_model.parameters())

    assert param_count(name, 1000) == torch_count


def test_resnet50_has_the_published_param_count():
    assert param_count("resnet50", 1000) == 25_557_032


# He et al. (2015), Table 6, in millions; and the exact counts for 10 classes.
CIFAR_PARAMS = {
    "resnet20": ("0.27", 269_722),
    "resnet32": ("0.46", 464_154),
    "resnet44": ("0.66", 658_586),
    "resnet56": ("0.85", 853_018),
    "resnet110": ("1.7", 1_727_962),
    "resnet1202": ("19.4", 19_421_274),
}


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_param_counts_match_the_paper(name):
    paper_millions, exact = CIFAR_PARAMS[name]
    decimals = len(paper_millions.split(".")[1])

    count = param_count(name, 10)

    assert f"{count / 1e6:.{decimals}f}" == paper_millions
    assert count == exact


@pytest.mark.parametrize(
    ("name", "options"), [("resnet20", {}), ("resnet110", {}), ("resnet18", {"shortcut": "A"})]
)
def test_plain_twin_with_shortcut_a_has_identical_params(name, options):
    _, residual = abstract_init(name, 10, 32, **options)
    _, plain = abstract_init(name, 10, 32, residual=False, **options)

    chex.assert_trees_all_equal_shapes_and_dtypes(plain["params"], residual["params"])


@pytest.mark.parametrize(
    ("name", "options"), [("resnet18", {}), ("resnet50", {}), ("resnet20", {"shortcut": "B"})]
)
def test_plain_twin_with_shortcut_b_has_no_projections(name, options):
    _, residual = abstract_init(name, 10, 32, **options)
    _, plain = abstract_init(name, 10, 32, residual=False, **options)
    residual_params = traverse_util.flatten_dict(residual["params"])
    plain_params = traverse_util.flatten_dict(plain["params"])
    projections = {path for path in residual_params if path[1].startswith("downsample_")}

    assert projections
    assert plain_params.keys() == residual_params.keys() - projections
    projection_size = sum(residual_params[path].size for path in projections)
    residual_count = models.count_params(residual["params"])
    assert models.count_params(plain["params"]) == residual_count - projection_size


# -- tiny nets, run eagerly --------------------------------------------------------------------


def tiny_images() -> np.ndarray:
    return np.random.default_rng(42).standard_normal(TINY_IMAGES_SHAPE, np.float32)


@functools.cache
def tiny_variables(name: str, **options) -> dict:
    model = models.get_model(name, 10, **options)
    return model.init(jax.random.key(0, impl="rbg"), tiny_images(), train=False)


def restrict_to(variables: dict, like: dict) -> dict:
    """The part of `variables` at the paths `like` has."""
    flat = traverse_util.flatten_dict(variables)
    paths = traverse_util.flatten_dict(like)
    return traverse_util.unflatten_dict({path: flat[path] for path in paths})


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_plain_forward_differs_from_residual(shortcut):
    residual = models.get_model("resnet20", 10, shortcut=shortcut, **TINY)
    plain = models.get_model("resnet20", 10, shortcut=shortcut, residual=False, **TINY)
    variables = tiny_variables("resnet20", shortcut=shortcut, **TINY)
    _, plain_shapes = abstract_init("resnet20", 10, 32, shortcut=shortcut, residual=False, **TINY)
    plain_variables = restrict_to(variables, {c: plain_shapes[c] for c in COLLECTIONS})

    residual_logits = residual.apply(variables, tiny_images(), train=False)
    plain_logits = plain.apply(plain_variables, tiny_images(), train=False)

    difference = np.abs(residual_logits - plain_logits).max()
    assert difference > 0.1 * np.abs(residual_logits).max()


def train_step_outputs(model: models.ResNet, variables: dict) -> tuple[dict, dict]:
    """Gradients of a cross-entropy loss and the batch_stats a train-mode forward leaves."""
    labels = jnp.array([3, 7])

    def loss_fn(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            tiny_images(),
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    return jax.grad(loss_fn, has_aux=True)(variables["params"])


def test_forward_backward_on_a_tiny_net():
    model = models.get_model("resnet20", 10, **TINY)
    variables = tiny_variables("resnet20", **TINY)

    grads, train_stats = train_step_outputs(model, variables)
    _, eval_state = model.apply(variables, tiny_images(), train=False, mutable=["batch_stats"])

    chex.assert_trees_all_equal_shapes_and_dtypes(grads, variables["params"])
    chex.assert_tree_all_finite(grads)
    for path, grad in traverse_util.flatten_dict(grads, sep="/").items():
        assert np.any(grad != 0), f"no gradient reaches {path}"
    old_stats = traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    for path, stat in traverse_util.flatten_dict(train_stats, sep="/").items():
        assert np.all(stat != old_stats[path]), f"train mode left {path} unchanged"
    chex.assert_trees_all_equal(eval_state["batch_stats"], variables["batch_stats"])


def test_bfloat16_compute_keeps_float32_params_and_logits():
    fp32 = models.get_model("resnet20", 10, **TINY)
    bf16 = models.get_model("resnet20", 10, dtype=jnp.bfloat16, **TINY)
    _, bf16_shapes = abstract_init("resnet20", 10, 32, dtype=jnp.bfloat16, **TINY)
    variables = tiny_variables("resnet20", **TINY)

    fp32_logits = fp32.apply(variables, tiny_images(), train=False)
    bf16_logits, bf16_state = bf16.apply(
        variables, tiny_images(), train=True, mutable=["batch_stats"]
    )
    bf16_eval_logits = bf16.apply(variables, tiny_images(), train=False)

    for leaf in jax.tree.leaves({c: bf16_shapes[c] for c in COLLECTIONS}):
        assert leaf.dtype == jnp.float32
    chex.assert_type([bf16_logits, bf16_eval_logits], jnp.float32)
    chex.assert_type(jax.tree.leaves(bf16_state), jnp.float32)
    # bfloat16 keeps 8 mantissa bits: measured 0.3% of the logit scale here, allowed 2%.
    scale = np.abs(fp32_logits).max()
    np.testing.assert_allclose(bf16_eval_logits, fp32_logits, rtol=0.02, atol=0.02 * scale)


@pytest.mark.parametrize(("name", "last_norm"), [("resnet20", "bn2"), ("resnet50", "bn3")])
def test_zero_init_residual_zeroes_the_last_norm_of_each_block(name, last_norm):
    params = tiny_variables(name, zero_init_residual=True, **TINY)["params"]

    blocks = {name: block for name, block in params.items() if name.startswith("layer")}
    assert blocks
    for block_name, block in blocks.items():
        for module_name, module in block.items():
            if "bn" in module_name:  # bn1..bn3 and downsample_bn
                expected = 0.0 if module_name == last_norm else 1.0
                err_msg = f"{block_name}/{module_name}"
                np.testing.assert_array_equal(module["scale"], expected, err_msg=err_msg)


@pytest.mark.parametrize("frozen_stages", [0, 1, 3, 4])  # 4 is past resnet20's last stage
def test_frozen_stages_get_no_gradient_and_keep_their_statistics(frozen_stages):
    model = models.get_model("resnet20", 10, frozen_stages=frozen_stages, **TINY)
    variables = tiny_variables("resnet20", **TINY)

    grads, train_stats = train_step_outputs(model, variables)

    old_stats = traverse_util.flatten_dict(variables["batch_stats"])
    for path, stat in traverse_util.flatten_dict(train_stats).items():
        if models.stage_of(path) <= frozen_stages:
            np.testing.assert_array_equal(stat, old_stats[path], err_msg=str(path))
        else:
            assert np.all(stat != old_stats[path]), path
    for path, grad in traverse_util.flatten_dict(grads).items():
        stage = models.stage_of(path)
        if stage is not None and stage <= frozen_stages:
            assert np.all(grad == 0), path
        else:
            assert np.any(grad != 0), path


@pytest.mark.parametrize(
    ("arguments", "choices"),
    [
        ({"name": "resnet19"}, models.MODEL_NAMES),
        ({"name": "resnet18", "stem": "tiny"}, ("imagenet", "cifar")),
        ({"name": "resnet20", "stem": "imagenet"}, ("cifar",)),
        ({"name": "resnet18", "shortcut": "C"}, ("A", "B")),
    ],
)
def test_bad_choices_raise_listing_the_valid_ones(arguments, choices):
    with pytest.raises(ValueError) as error:
        models.get_model(**arguments)

    assert f"valid choices are: {', '.join(choices)}." in str(error.value)


CONV_CASES = [
    pytest.param((2, 8, 8, 3), (3, 3), (1, 1), ((1, 1), (1, 1)), id="3x3"),
    pytest.param((2, 8, 8, 3), (3, 3), (2, 2), ((1, 1), (1, 1)), id="3x3-stride2"),
    pytest.param((2, 9, 9, 4), (7, 7), (2, 2), ((3, 3), (3, 3)), id="7x7-stride2-stem"),
    pytest.param((2, 8, 8, 4), (1, 1), (2, 2), ((0, 0), (0, 0)), id="1x1-stride2-as-dot"),
    pytest.param((2, 2, 2, 4), (3, 3), (1, 1), ((1, 1), (1, 1)), id="3x3-on-2x2-im2col"),
    pytest.param((2, 3, 3, 4), (3, 3), (2, 2), ((1, 1), (1, 1)), id="3x3-stride2-on-3x3-im2col"),
]


@pytest.fixture(params=["onednn", "xla"])
def conv_backend(request, monkeypatch):
    """Each conv test runs on oneDNN's convs and on XLA's (the fallback; other backends)."""
    if request.param == "onednn":
        if not onednn.available():
            pytest.skip("oneDNN convolutions are not available here")
    else:
        monkeypatch.setattr(onednn, "usable", lambda lhs, rhs: False)
    return request.param


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(("lhs_shape", "window", "strides", "padding"), CONV_CASES)
def test_conv_hook_equals_lax_conv_with_gradients(
    conv_backend, lhs_shape, window, strides, padding, dtype
):
    # Every path of nn.Conv's hook (oneDNN or materialized input, im2col, 1x1 as a dot) against
    # XLA's conv, compiled as in training.
    lhs = jax.random.normal(jax.random.key(1, impl="rbg"), lhs_shape, dtype)
    rhs = jax.random.normal(jax.random.key(2, impl="rbg"), (*window, lhs_shape[-1], 5), dtype)
    numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv, lhs, rhs):
        y = conv(lhs, rhs, strides, padding, dimension_numbers=numbers)
        return jnp.sum(jnp.sin(y)), y

    def value_and_grads(conv):
        grad_fn = jax.value_and_grad(functools.partial(loss, conv), argnums=(0, 1), has_aux=True)
        return jax.jit(grad_fn)(lhs, rhs)

    (_, want), want_grads = value_and_grads(lax.conv_general_dilated)
    (_, got), got_grads = value_and_grads(models.conv_general_dilated)
    chex.assert_trees_all_equal_dtypes((got, got_grads), (want, want_grads))
    if dtype == jnp.float32:
        # float32 sums in another order: a wrong tap or shift would be off by O(1), not 1e-4.
        chex.assert_trees_all_close((got, got_grads), (want, want_grads), rtol=1e-4, atol=1e-4)
        return
    # bfloat16 rounds each result to 8 mantissa bits (0.4%): allowed 3% of each result's scale.
    for got_leaf, want_leaf in zip(jax.tree.leaves((got, got_grads)),
                                   jax.tree.leaves((want, want_grads)), strict=True):  # fmt: skip
        got_leaf, want_leaf = np.asarray(got_leaf, np.float32), np.asarray(want_leaf, np.float32)
        assert np.max(np.abs(got_leaf - want_leaf)) <= 0.03 * np.max(np.abs(want_leaf))


def test_a_bfloat16_1x1_conv_gets_its_kernel_gradient_from_a_dot_in_the_kernels_layout():
    # Rounded to bf16 between the dot and the float32 parameter, the gradient used to come out of
    # XLA:CPU's dot transposed (out x in) and be copied back in a slow strided loop.
    x = jax.random.normal(jax.random.key(1, impl="rbg"), (8, 4, 4, 64), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(2, impl="rbg"), (1, 1, 64, 128))
    numbers = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(kernel):
        kernel = kernel.astype(jnp.bfloat16)
        y = models.conv_general_dilated(
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
    got = jax.value_and_grad(functools.partial(loss, models.max_pool))(x)
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
        return jax.vjp(lambda x: models.max_pool(x, *args), x)[1](dy)[0]

    got = input_grad(x.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
    want = input_grad(
        x.astype(jnp.bfloat16).astype(jnp.float32), dy.astype(jnp.bfloat16).astype(jnp.float32)
    )
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(got, np.float32), np.asarray(want.astype(jnp.bfloat16), np.float32)
    )


def custom_vjp_calls(model: models.ResNet, train: bool) -> collections.Counter:
    """The model's custom-VJP calls by function: oneDNN convs (`conv`), materialized inputs
    (`_identity_matmul`) and training-mode `batch_norm`."""
    variables = tiny_variables("resnet20", **TINY)
    apply = functools.partial(model.apply, train=train, mutable=["batch_stats"])
    jaxpr = jax.make_jaxpr(apply)(variables, tiny_images())
    return collections.Counter(
        eqn.params["call_jaxpr"].jaxpr.debug_info.func_src_info.split()[0]
        for eqn in jaxpr.eqns
        if eqn.primitive.name.startswith("custom_vjp_call")
    )


@pytest.mark.parametrize(
    ("train", "frozen_stages", "trained"),
    [(True, -1, 19), (False, -1, 0), (True, 2, 6)],  # resnet20: the stem and 18 3x3 convs
    ids=["train", "eval", "train-frozen-to-stage-2"],
)
def test_without_onednn_only_convs_that_get_a_weight_gradient_materialize_their_input(
    monkeypatch, train, frozen_stages, trained
):
    # The same layers' BNs train on batch statistics; frozen and evaluating ones use running ones.
    monkeypatch.setattr(onednn, "usable", lambda lhs, rhs: False)
    model = models.get_model("resnet20", 10, frozen_stages=frozen_stages, **TINY)

    assert custom_vjp_calls(model, train) == collections.Counter(
        {"_identity_matmul": trained, "batch_norm": trained} if trained else {}
    )


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_with_onednn_every_3x3_conv_runs_on_it_and_nothing_is_materialized(train):
    if not onednn.available():
        pytest.skip("oneDNN convolutions are not available here")

    for dtype in (jnp.float32, jnp.bfloat16):
        model = models.get_model("resnet20", 10, dtype=dtype, **TINY)
        assert custom_vjp_calls(model, train) == {"conv": 19} | (
            {"batch_norm": 19} if train else {}
        )


def _batch_norm_results(module, variables, x, weights, axis_name=None, then=lambda y: y):
    """A loss through `module` (and `then`) in training mode: (loss, new batch stats,
    d loss / d (params, x)), over a leading device axis named `axis_name` when given (vmap stands
    in for pmap)."""

    def loss(params, x):
        y, updates = module.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(then(y).astype(jnp.float32)) * weights), updates["batch_stats"]

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    if axis_name is not None:
        grad = jax.vmap(grad, in_axes=(None, 0), axis_name=axis_name)
    (value, stats), grads = jax.jit(grad)(variables["params"], x)
    return value, stats, grads


@pytest.mark.parametrize("shim", [True, False], ids=["shim", "jnp"])
@pytest.mark.parametrize("axis_name", [None, "devices"])
@pytest.mark.parametrize("relu", [False, True], ids=["", "relu"])
def test_batchnorm_computes_what_flax_batchnorm_does(shim, axis_name, relu, monkeypatch):
    if shim and not onednn.available():
        pytest.skip("the shim is not available here")
    if not shim:
        monkeypatch.setattr(onednn, "usable", lambda a, b: False)
    shape = (8, 6, 6, 16) if axis_name is None else (2, 4, 6, 6, 16)  # 2 devices of 4 examples
    x = 3.0 * jax.random.normal(jax.random.key(0, impl="rbg"), shape) + 1.0
    weights = jax.random.normal(jax.random.key(1, impl="rbg"), shape[-4:])
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, axis_name=axis_name)
    ours = models.BatchNorm(use_running_average=False, momentum=0.9, axis_name=axis_name, relu=relu)
    then = nn.relu if relu else lambda y: y  # after flax's, inside ours
    variables = flax_bn.init(jax.random.key(2), x.reshape(-1, *shape[-3:]))
    variables = jax.tree.map(  # not the identity: scales, shifts and statistics of their own
        lambda v: v + 0.5 * jax.random.uniform(jax.random.key(3), v.shape), variables
    )
    expected = _batch_norm_results(flax_bn, variables, x, weights, axis_name, then)
    chex.assert_trees_all_close(
        _batch_norm_results(ours, variables, x, weights, axis_name), expected, rtol=2e-5, atol=2e-5
    )
    eval_x = x.reshape(-1, *shape[-3:])
    chex.assert_trees_all_close(
        models.BatchNorm(use_running_average=True, relu=relu).apply(variables, eval_x),
        then(nn.BatchNorm(use_running_average=True).apply(variables, eval_x)),
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

    ours = loss(lambda x, scale, bias: models.batch_norm(x, scale, bias, 1e-5, None))
    chex.assert_trees_all_close(ours, loss(plain), rtol=2e-5, atol=2e-5)


def test_bfloat16_batchnorm_rounds_what_flax_batchnorm_computes():
    if not onednn.available():
        pytest.skip("the shim is not available here")
    x = (3.0 * jax.random.normal(jax.random.key(0, impl="rbg"), (8, 6, 6, 16)) + 1.0).astype(
        jnp.bfloat16
    )
    weights = jax.random.normal(jax.random.key(1, impl="rbg"), x.shape)
    flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
    ours = models.BatchNorm(use_running_average=False, momentum=0.9, dtype=jnp.bfloat16)
    variables = flax_bn.init(jax.random.key(2), x)
    value, stats, (dparams, dx) = _batch_norm_results(ours, variables, x, weights)
    expected_value, expected_stats, (expected_dparams, expected_dx) = _batch_norm_results(
        flax_bn, variables, x, weights
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
    # The centered activations are recomputed in the backward pass, not saved: one full-size
    # residual (the input) where flax's BatchNorm under plain autodiff keeps two.
    x = jax.random.normal(jax.random.key(0, impl="rbg"), (8, 4, 4, 16))

    def full_size_residuals(cls) -> int:
        bn = cls(use_running_average=False)
        variables = bn.init(jax.random.key(1), x)

        def normalize(params, x):
            return bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]

        _, backward = jax.vjp(normalize, variables["params"], x)
        return sum(leaf.shape == x.shape for leaf in jax.tree.leaves(backward))

    assert (full_size_residuals(models.BatchNorm), full_size_residuals(nn.BatchNorm)) == (1, 2)
