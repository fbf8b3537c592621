"""torchvision -> Flax conversion: eval parity for every arch, strict errors, new heads, the CLI."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from flax import traverse_util
from torchvision.models.resnet import BasicBlock, Bottleneck

from resnet_jax import convert, models

REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
# float32 parity: rtol on each element, plus an atol of this fraction of the tensor's largest
# magnitude for elements near zero. Measured errors stay below 1e-5 of that scale.
RTOL = 1e-4
ATOL_FRACTION = 2e-5


def randomize_batch_norms(model: torchvision.models.ResNet) -> None:
    """Random BN affine params and running stats (never torch's ones/zeros, which hide errors).

    Running stats are measured on a random batch and then perturbed, so activations stay O(1)
    through 150 layers instead of exploding. The last BN of each block gets a small scale, as in
    trained ResNets; otherwise float32 rounding alone grows to ~5e-5 in resnet152 (torch's own
    float32 output is that far from its float64 one).
    """
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    last_in_block = [
        block.bn3 if isinstance(block, Bottleneck) else block.bn2
        for block in model.modules()
        if isinstance(block, BasicBlock | Bottleneck)
    ]
    with torch.no_grad():
        for bn in batch_norms:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.5)
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: the stats of exactly this one batch
        for bn in last_in_block:
            bn.weight.uniform_(0.1, 0.5)
        model.train()(torch.randn(4, 3, 64, 64))
        for bn in batch_norms:
            bn.running_mean.add_(0.2 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.5, 2.0))
    model.eval()


@functools.cache
def torch_reference(arch: str) -> tuple[dict, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A randomized torchvision model's state_dict, NHWC images, logits and NHWC stage outputs."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    randomize_batch_norms(model)
    images = torch.randn(2, 3, 64, 64)
    stage_outputs = {}
    for stage, module_name in zip(STAGES, ("maxpool", *STAGES[1:]), strict=True):
        getattr(model, module_name).register_forward_hook(
            lambda module, inputs, output, stage=stage: stage_outputs.update(
                {stage: output.permute(0, 2, 3, 1).numpy()}
            )
        )
    with torch.no_grad():
        logits = model(images).numpy()
    return model.state_dict(), images.permute(0, 2, 3, 1).numpy(), logits, stage_outputs


def flax_forward(variables: dict, arch: str, images: np.ndarray) -> tuple[np.ndarray, dict]:
    model = models.get_model(arch, num_classes=1000)
    apply = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
    logits, state = apply(variables, jnp.asarray(images))
    stages = {name: np.asarray(value[0]) for name, value in state["intermediates"].items()}
    return np.asarray(logits), stages


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    atol = ATOL_FRACTION * np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=atol, err_msg=what)


def save_weights(state_dict: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


slow = pytest.mark.slow
PARITY_CASES = [
    pytest.param("resnet152", "pth", marks=slow),
    pytest.param("resnet101", "pth", marks=slow),
    ("resnet50", "pth"),
    ("resnet34", "pth"),
    ("resnet18", "pth"),
    ("resnet50", "safetensors"),
    ("resnet18", "safetensors"),
]


@pytest.mark.parametrize(("arch", "file_format"), PARITY_CASES)
def test_eval_parity_with_torchvision(arch, file_format, tmp_path):
    state_dict, images, torch_logits, torch_stages = torch_reference(arch)
    path = save_weights(state_dict, tmp_path / f"{arch}.{file_format}")

    variables = convert.torchvision_to_flax(path, arch)
    logits, stages = flax_forward(variables, arch, images)

    chex.assert_type(logits, np.float32)
    assert_close(logits, torch_logits, f"{arch} logits")
    for stage in STAGES:
        assert_close(stages[stage], torch_stages[stage], f"{arch} {stage} output")


@pytest.mark.parametrize("arch", convert.ARCHS)
def test_safetensors_converts_exactly_as_pth(arch, tmp_path):
    """With the .pth parity above, this carries torchvision parity to .safetensors for all."""
    torch.manual_seed(1)
    state_dict = {
        key: torch.randn_like(value) if value.is_floating_point() else value
        for key, value in getattr(torchvision.models, arch)(weights=None).state_dict().items()
    }
    from_pth = convert.torchvision_to_flax(save_weights(state_dict, tmp_path / "w.pth"), arch)
    from_safetensors = convert.torchvision_to_flax(
        save_weights(state_dict, tmp_path / "w.safetensors"), arch
    )
    chex.assert_trees_all_equal(from_pth, from_safetensors)


def test_converted_layouts_and_dtypes():
    state_dict, *_ = torch_reference("resnet18")
    variables = convert.torchvision_to_flax(state_dict, "resnet18")

    assert set(variables) == {"params", "batch_stats"}
    leaves = jax.tree.leaves(variables)
    assert all(isinstance(leaf, np.ndarray) and leaf.dtype == np.float32 for leaf in leaves)
    conv = state_dict["layer2.0.downsample.0.weight"].numpy()
    np.testing.assert_array_equal(
        variables["params"]["layer2_0"]["downsample_conv"]["kernel"], conv.transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state_dict["fc.weight"].T)
    bn = variables["batch_stats"]["layer1_1"]["bn2"]
    np.testing.assert_array_equal(bn["var"], state_dict["layer1.1.bn2.running_var"])


def test_accepts_numpy_state_dicts_and_wrapped_checkpoints(tmp_path):
    state_dict, *_ = torch_reference("resnet18")
    expected = convert.torchvision_to_flax(state_dict, "resnet18")
    numpy_state_dict = {key: value.numpy() for key, value in state_dict.items()}
    wrapped = tmp_path / "checkpoint.pth.tar"
    data_parallel = {f"module.{key}": value for key, value in state_dict.items()}
    torch.save({"epoch": 3, "state_dict": data_parallel}, wrapped)

    chex.assert_trees_all_equal(convert.torchvision_to_flax(numpy_state_dict, "resnet18"), expected)
    chex.assert_trees_all_equal(convert.torchvision_to_flax(wrapped, "resnet18"), expected)


def resnet18_state_dict() -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in torch_reference("resnet18")[0].items()}


def test_missing_key_is_named_with_its_shape():
    state_dict = resnet18_state_dict()
    del state_dict["layer2.1.bn2.running_var"]

    with pytest.raises(convert.ConversionError) as error:
        convert.torchvision_to_flax(state_dict, "resnet18")

    message = str(error.value)
    assert "layer2.1.bn2.running_var (expected (128,), not found)" in message
    assert "It has resnet18's block layout" in message


def test_unexpected_key_is_named_with_its_shape():
    state_dict = resnet18_state_dict()
    state_dict["layer2.0.extra.weight"] = np.zeros((3, 5), np.float32)

    with pytest.raises(convert.ConversionError, match=r"layer2\.0\.extra\.weight \(found \(3, 5\)"):
        convert.torchvision_to_flax(state_dict, "resnet18")


def test_wrongly_shaped_key_names_both_shapes():
    state_dict = resnet18_state_dict()
    state_dict["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)

    with pytest.raises(convert.ConversionError) as error:
        convert.torchvision_to_flax(state_dict, "resnet18")

    message = str(error.value)
    assert "layer1.0.conv2.weight (expected (64, 64, 3, 3), found (64, 64, 1, 1))" in message
    assert "It has resnet18's block layout" in message


def test_wrong_arch_names_the_architecture_the_file_looks_like():
    with pytest.raises(convert.ConversionError) as error:
        convert.torchvision_to_flax(resnet18_state_dict(), "resnet34")

    message = str(error.value)
    assert "does not fit torchvision's resnet34" in message
    assert "layer1.2.bn1.bias (expected (64,), not found)" in message
    assert "looks like resnet18 (basic blocks, 2-2-2-2 per stage, 1000 classes)" in message
    assert "--arch resnet18" in message


def test_bottleneck_file_is_recognized():
    with torch.device("meta"):  # only key names and shapes matter here
        state_dict = torchvision.models.resnet50(weights=None, num_classes=7).state_dict()
    shapes_only = {key: np.broadcast_to(np.float32(0), v.shape) for key, v in state_dict.items()}

    with pytest.raises(convert.ConversionError) as error:
        convert.torchvision_to_flax(shapes_only, "resnet101")

    message = str(error.value)
    assert "looks like resnet50 (bottleneck blocks, 3-4-6-3 per stage, 7 classes)" in message


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101, resnet152"):
        convert.torchvision_to_flax({}, "resnet20")


def test_missing_file_says_where_to_get_weights(tmp_path):
    missing = tmp_path / "resnet50.pth"

    with pytest.raises(convert.ConversionError) as error:
        convert.load_pretrained({}, missing, "resnet50")

    message = str(error.value)
    assert str(missing) in message
    assert convert.TORCHVISION_URLS["resnet50"] in message


def test_a_damaged_safetensors_file_is_explained(tmp_path):
    damaged = tmp_path / "resnet18.safetensors"
    damaged.write_bytes(b"\xff" * 64)

    with pytest.raises(convert.ConversionError, match="damaged or not safetensors"):
        convert.load_pretrained({}, damaged, "resnet18")


def fresh_variables(model: models.ResNet, channels: int = 3) -> dict:
    """Random stand-ins for `model.init`'s variables on images of `channels`, without compiling
    the model."""
    rng = np.random.default_rng(1)
    shapes = models.init_shapes(model, (1, 32, 32, channels))
    return jax.tree.map(lambda leaf: rng.standard_normal(leaf.shape, np.float32), shapes)


def test_load_pretrained_keeps_a_new_head(tmp_path):
    path = save_weights(torch_reference("resnet18")[0], tmp_path / "resnet18.pth")
    converted = convert.torchvision_to_flax(path, "resnet18")
    fresh = fresh_variables(models.get_model("resnet18", num_classes=2))

    variables, report = convert.load_pretrained(fresh, path, "resnet18")

    assert report.new == ["fc/bias", "fc/kernel"]
    assert report.unused == []  # the checkpoint's fc has a place in the model, just another shape
    assert "kept fresh: fc/bias, fc/kernel" in report.summary()
    chex.assert_trees_all_equal(variables["params"]["fc"], fresh["params"]["fc"])
    merged = traverse_util.flatten_dict(variables, sep="/")
    checkpoint = traverse_util.flatten_dict(converted, sep="/")
    backbone = {name: value for name, value in checkpoint.items() if "/fc/" not in name}
    assert sorted(report.loaded) == sorted(name.split("/", 1)[1] for name in backbone)
    for name, value in backbone.items():
        np.testing.assert_array_equal(merged[name], value, err_msg=name)  # bit-identical


def test_load_pretrained_into_cifar_stem_keeps_conv1_fresh(tmp_path):
    path = save_weights(torch_reference("resnet18")[0], tmp_path / "resnet18.safetensors")
    fresh = fresh_variables(models.get_model("resnet18", num_classes=1000, stem="cifar"))

    variables, report = convert.load_pretrained(fresh, path, "resnet18")

    assert report.new == ["conv1/kernel"]
    assert "bn1/scale" in report.loaded
    chex.assert_trees_all_equal(variables["params"]["conv1"], fresh["params"]["conv1"])


def test_rgb_weights_load_into_a_gray_model_with_the_stem_summed_over_rgb(tmp_path):
    path = save_weights(torch_reference("resnet18")[0], tmp_path / "resnet18.safetensors")
    model = models.get_model("resnet18", num_classes=1000)
    rgb, rgb_report = convert.load_pretrained(fresh_variables(model), path, "resnet18")
    gray, report = convert.load_pretrained(fresh_variables(model, channels=1), path, "resnet18")

    assert report.new == [] and not rgb_report.adapted
    assert "conv1/kernel summed over RGB for gray images" in report.summary()
    chex.assert_shape(gray["params"]["conv1"]["kernel"], (7, 7, 1, 64))
    images = np.random.default_rng(2).normal(size=(2, 64, 64, 1)).astype(np.float32)
    apply = jax.jit(functools.partial(model.apply, train=False))
    gray_logits = np.asarray(apply(gray, images))
    # A gray image repeated in R, G and B through the RGB net: the same logits.
    np.testing.assert_allclose(
        gray_logits, apply(rgb, np.repeat(images, 3, axis=-1)), rtol=1e-4, atol=1e-4
    )
    assert np.abs(gray_logits).max() > 0.1  # not a degenerate agreement


def test_load_pretrained_into_a_plain_twin_reports_the_unused_projections(tmp_path):
    path = save_weights(torch_reference("resnet18")[0], tmp_path / "resnet18.safetensors")
    fresh = fresh_variables(models.get_model("resnet18", num_classes=1000, residual=False))

    _, report = convert.load_pretrained(fresh, path, "resnet18")

    assert report.new == []
    assert {name.split("/")[1] for name in report.unused} == {"downsample_bn", "downsample_conv"}
    assert len(report.unused) == 3 * 5  # stages 2-4: kernel, scale, bias, mean, var


def test_load_pretrained_refuses_to_load_nothing(tmp_path):
    path = save_weights(torch_reference("resnet18")[0], tmp_path / "resnet18.safetensors")
    fresh = fresh_variables(models.get_model("resnet18", num_classes=1000, width=32))

    with pytest.raises(convert.ConversionError, match="nothing would be loaded"):
        convert.load_pretrained(fresh, path, "resnet18")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "resnet_jax.convert", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


@slow  # a subprocess
def test_cli_writes_a_checkpoint_that_loads_like_the_file(tmp_path):
    path = save_weights(torch_reference("resnet18")[0], tmp_path / "resnet18.pth")
    output = tmp_path / "converted"

    result = run_cli("--arch", "resnet18", "--input", str(path), "--output", str(output))

    assert result.returncode == 0, result.stderr
    assert "orbax" not in result.stderr  # its routine INFO lines stay out of the output
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata == {"arch": "resnet18", "num_classes": 1000, "source": str(path)}
    direct = convert.torchvision_to_flax(path, "resnet18")
    chex.assert_trees_all_equal(convert.torchvision_to_flax(output, "resnet18"), direct)
    fresh = fresh_variables(models.get_model("resnet18", num_classes=1000))
    variables, report = convert.load_pretrained(fresh, output, "resnet18")
    assert report.new == []
    assert report.unused == []
    chex.assert_trees_all_equal(variables, direct)


@slow  # a subprocess
def test_cli_missing_input_fails_with_one_paragraph(tmp_path):
    missing = tmp_path / "resnet34.pth"

    result = run_cli("--arch", "resnet34", "--input", str(missing), "--output", str(tmp_path / "o"))

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (message,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert f"No weights found at '{missing}'" in message
    assert convert.TORCHVISION_URLS["resnet34"] in message
    assert not (tmp_path / "o").exists()
