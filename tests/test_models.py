"""The model family: shapes and parameter counts via eval_shape, then a few passes on tiny nets.

The tiny nets run eagerly (no jit): the tests share op shapes, so each op compiles once per
process instead of every test compiling a whole-model program. They are initialized with "rbg"
keys because compiling threefry's random bits for every parameter shape costs seconds on CPU.
"""

import functools
import platform
import sys

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

from resnet_jax import convert, layers, models
from resnet_jax.cpu.kernels import KERNELS, kernel_modules, resolve_kernels
from tests.test_convert import STAGES, assert_close, torch_reference

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


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
@pytest.mark.parametrize("frozen_stages", [0, 1, 3, 4])  # 4 is past resnet20's last stage
def test_frozen_stages_get_no_gradient_and_keep_their_statistics(frozen_stages, kernels):
    model = models.get_model("resnet20", 10, frozen_stages=frozen_stages, kernels=kernels, **TINY)
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
        ({"name": "resnet18", "kernels": "gpu"}, KERNELS),
        ({"name": "resnet18", "stem": "tiny"}, ("imagenet", "cifar")),
        ({"name": "resnet20", "stem": "imagenet"}, ("cifar",)),
        ({"name": "resnet18", "shortcut": "C"}, ("A", "B")),
    ],
)
def test_bad_choices_raise_listing_the_valid_ones(arguments, choices):
    with pytest.raises(ValueError) as error:
        models.get_model(**arguments)

    assert f"valid choices are: {', '.join(choices)}." in str(error.value)


# -- kernel sets --------------------------------------------------------------------------------


def test_plain_flax_is_the_default_and_auto_picks_the_cpu_set_on_one_cpu_device():
    plain = models.get_model("resnet18", kernels="xla")
    assert (plain.conv, plain.norm, plain.pool) == (nn.Conv, layers.BatchNorm, nn.max_pool)
    assert models.ResNet(stage_sizes=(1,), block_cls=models.BasicBlock).conv is nn.Conv

    on_one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    on_x86_linux = sys.platform == "linux" and platform.machine() == "x86_64"
    assert resolve_kernels("auto") == ("cpu" if on_one_cpu and on_x86_linux else "xla")
    assert models.get_model("resnet18").norm is kernel_modules("auto")["norm"]


@pytest.mark.parametrize(("system", "machine"), [("linux", "aarch64"), ("darwin", "arm64")])
def test_auto_is_plain_flax_on_a_cpu_the_cpu_set_was_not_measured_on(monkeypatch, system, machine):
    monkeypatch.setattr(sys, "platform", system)
    monkeypatch.setattr(platform, "machine", lambda: machine)

    assert resolve_kernels("auto") == "xla"
    assert models.get_model("resnet20").conv is nn.Conv


def test_both_kernel_sets_have_the_same_variables():
    xla = models.init_shapes(models.get_model("resnet50", kernels="xla"), (1, 64, 64, 3))
    cpu = models.init_shapes(models.get_model("resnet50", kernels="cpu"), (1, 64, 64, 3))

    chex.assert_trees_all_equal_shapes_and_dtypes(cpu, xla)


@pytest.mark.parametrize("kernels", KERNELS[1:])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_eval_parity_with_torchvision_on_each_kernel_set(arch, kernels):
    state_dict, images, torch_logits, torch_stages = torch_reference(arch)
    model = models.get_model(arch, num_classes=1000, kernels=kernels)
    apply = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))

    logits, state = apply(convert.torchvision_to_flax(state_dict, arch), jnp.asarray(images))

    assert_close(np.asarray(logits), torch_logits, f"{arch} logits")
    for stage in STAGES:
        (output,) = state["intermediates"][stage]
        assert_close(np.asarray(output), torch_stages[stage], f"{arch} {stage} output")
