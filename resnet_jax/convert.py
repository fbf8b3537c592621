"""torchvision ResNet weights -> Flax variables, and the CLI `python -m resnet_jax.convert`.

The Flax models name their submodules after torchvision's state_dict, so the conversion is a key
rename plus two layout changes: conv kernels OIHW -> HWIO and the fc weight (out, in) -> (in, out).
The expected keys are derived from the Flax model itself, so a file that does not fit the requested
architecture fails loudly, naming the offending keys and what the file looks like instead.

    python -m resnet_jax.convert --arch resnet50 --input resnet50-0676ba61.pth --output DIR
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from absl import app, flags
from flax import traverse_util

from resnet_jax import checkpoint, files, models
from resnet_jax.errors import UserError

ARCHS: tuple[str, ...] = tuple(models.IMAGENET_FAMILY)
# torchvision's IMAGENET1K_V1 weights (the original recipe; V2 exists for resnet50/101/152).
TORCHVISION_URLS: dict[str, str] = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet101": "https://download.pytorch.org/models/resnet101-63fe2227.pth",
    "resnet152": "https://download.pytorch.org/models/resnet152-394f9c45.pth",
}
METADATA_FILE = "metadata.json"
_COLLECTIONS = ("params", "batch_stats")
_STEM_KERNEL = ("params", "conv1", "kernel")  # the first conv: the one that sees the image

# Axis permutations between torch and Flax layouts, by number of dimensions (4: conv, 2: fc).
_FLAX_FROM_TORCH = {4: (2, 3, 1, 0), 2: (1, 0), 1: (0,)}
_TORCH_FROM_FLAX = {4: (3, 2, 0, 1), 2: (1, 0), 1: (0,)}
_TORCH_MODULE = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
# How many names of each kind a message lists before summarizing the rest as "and N more".
_NAMES_SHOWN = 4

StateDict = Mapping[str, Any]
Variables = dict[str, Any]
# torch key -> (Flax path including its collection, shape in torch layout).
ExpectedShapes = dict[str, tuple[tuple[str, ...], tuple[int, ...]]]


class ConversionError(UserError):
    """A weights source that is missing, unreadable, or does not fit the requested architecture."""


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_pretrained` did: paths (like "layer1_0/conv1/kernel") loaded or kept fresh.

    `new` are model variables kept as initialized (absent from the checkpoint or shaped
    differently, e.g. a new head); `unused` are checkpoint tensors the model has no place for;
    `adapted` says how the RGB stem was fitted to gray images ("" if it was not).
    """

    source: str
    loaded: list[str]
    new: list[str]
    unused: list[str]
    adapted: str = ""

    def summary(self) -> str:
        """One line for the training log."""
        total = len(self.loaded) + len(self.new)
        line = f"Loaded {len(self.loaded)}/{total} variables from {self.source}"
        line += f"; kept fresh: {_shorten(self.new)}" if self.new else "; none kept fresh"
        if self.unused:
            line += f"; unused from the checkpoint: {_shorten(self.unused)}"
        if self.adapted:
            line += f"; {self.adapted}"
        return line + "."


def torchvision_to_flax(path_or_state_dict: str | Path | StateDict, arch: str) -> Variables:
    """Convert a torchvision ResNet state_dict to Flax `{"params": ..., "batch_stats": ...}`.

    Accepts a state_dict (torch tensors or numpy arrays), a `torch.save` file (.pth/.pt, also a
    checkpoint dict wrapping it under "state_dict" or "model"), a .safetensors file (torchvision
    or timm key names), or a directory written by this module's CLI. The number of classes is
    taken from `fc.weight`. Raises `ConversionError` naming every missing, unexpected or wrongly
    shaped key. Returns nested dicts of float32 numpy arrays.
    """
    _check_arch(arch)
    if isinstance(path_or_state_dict, Mapping):
        source_name, state_dict = "The state_dict", path_or_state_dict
    else:
        path = Path(path_or_state_dict)
        source_name, state_dict = f"'{path}'", _read(path, arch)
    state_dict = {
        key: _to_numpy(value)
        for key, value in state_dict.items()
        if not key.endswith("num_batches_tracked")  # a BN step counter; Flax has no use for it
    }
    expected = _expected_torch_shapes(arch, num_classes=_num_classes(state_dict))
    _check_fits(state_dict, expected, arch, source_name)
    flat = {}
    for key, (flax_path, _) in expected.items():
        array = state_dict[key]
        flat[flax_path] = np.ascontiguousarray(array.transpose(_FLAX_FROM_TORCH[array.ndim]))
    return traverse_util.unflatten_dict(flat)


def load_pretrained(
    variables: Variables, source: str | Path, arch: str
) -> tuple[Variables, LoadReport]:
    """Merge converted `arch` weights from `source` into freshly initialized model `variables`.

    Layers load whole: a layer whose variables all match the checkpoint's shapes is loaded, any
    other stays as initialized and is listed in the report's `new` (typically the `fc` head when
    num_classes differs, or `conv1` when the model has the CIFAR 3x3 stem). A model of gray
    images (one channel) gets the stem's RGB kernel summed over RGB (`adapt_input_conv`), which
    the report's `adapted` says. `source` is anything `torchvision_to_flax` reads from disk.
    Other collections than params and batch_stats pass through unchanged.
    """
    converted = _flatten(torchvision_to_flax(source, arch))
    fresh = _flatten({collection: variables[collection] for collection in _COLLECTIONS})
    gray_stem, adapted = adapt_input_conv(converted[_STEM_KERNEL]), ""
    if fresh[_STEM_KERNEL].shape == gray_stem.shape != converted[_STEM_KERNEL].shape:
        converted[_STEM_KERNEL] = gray_stem
        adapted = "conv1/kernel summed over RGB for gray images (timm's adapt_input_conv)"
    mismatched_layers = {
        _layer_of(path)
        for path, value in fresh.items()
        if path not in converted or converted[path].shape != value.shape
    }
    merged, loaded, new = {}, [], []
    for path, value in fresh.items():
        if _layer_of(path) in mismatched_layers:
            merged[path] = value
            new.append(_report_name(path))
        else:
            merged[path] = jnp.asarray(converted[path], dtype=value.dtype)
            loaded.append(_report_name(path))
    if not loaded:
        raise ConversionError(
            f"None of the model's layers has the shapes of {arch}'s in '{source}', so nothing "
            f"would be loaded. Build the model as {arch} with the default width, or pass weights "
            "for the model you built."
        )
    unused = [_report_name(path) for path in converted if path not in fresh]
    report = LoadReport(str(source), loaded, new, unused, adapted)
    return {**variables, **traverse_util.unflatten_dict(merged)}, report


def adapt_input_conv(kernel: np.ndarray) -> np.ndarray:
    """An RGB first-conv kernel (H, W, 3, O) for gray images (H, W, 1, O), as timm's
    `adapt_input_conv` for one channel: summed over RGB, so a gray image gives what the same
    image repeated in R, G and B gives the RGB kernel."""
    return kernel.sum(axis=2, keepdims=True)


def check_frozen_layers_loaded(report: LoadReport, frozen_stages: int, allowed: bool) -> None:
    """Raise ConversionError if a frozen stage (the stem and stages 1..`frozen_stages`) has a
    layer that the weights did not cover, which would stay at its random initialization, unless
    the config `allowed` it (model.freeze_random_layers)."""
    frozen_new = [
        name
        for name in report.new
        if (stage := models.stage_of(name.split("/"))) is not None and stage <= frozen_stages
    ]
    if not frozen_new or allowed:
        return
    raise ConversionError(
        f"model.freeze would freeze layers that {report.source} does not cover, so they would "
        f"stay random: {_shorten(frozen_new)}. The CIFAR stem's 3x3 conv1 has no counterpart in "
        "ImageNet weights: use model.stem=imagenet to load the pretrained stem, or "
        'model.freeze="none" to train every layer, or set model.freeze_random_layers=True if a '
        "frozen random layer is what you want."
    )


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ConversionError(
            f"Cannot convert weights for arch {arch!r}: only torchvision's ImageNet ResNets have "
            f"published weights. Valid choices are: {', '.join(ARCHS)}."
        )


def _read(path: Path, arch: str) -> StateDict:
    """A state_dict in torch layout from a .safetensors file, a torch file, or a converted dir."""
    if not path.exists():
        url = TORCHVISION_URLS[arch]
        raise ConversionError(
            f"No weights found at '{path}'. Download torchvision's ImageNet weights for {arch} "
            f"from {url} (e.g. `curl -LO {url}`) and pass that file, or convert it once with "
            f"`python -m resnet_jax.convert --arch {arch} --input {url.rsplit('/', 1)[1]} "
            "--output DIR` and pass DIR; resnet_jax never downloads weights itself."
        )
    if path.is_dir():
        return _read_converted_dir(path)
    if path.suffix == ".safetensors":
        try:
            return safetensors.numpy.load_file(path)
        except Exception as error:  # safetensors' own error type for a damaged header or data
            raise ConversionError(
                f"Could not read '{path}' as safetensors ({error}): the file is damaged or not "
                "safetensors. Download or save the weights again (safetensors.torch.save_file)."
            ) from None
    return _read_torch_file(path)


def _read_torch_file(path: Path) -> StateDict:
    import torch  # Only .pth/.pt files need torch; training never imports it.

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways on files it does not accept
        raise ConversionError(
            f"Could not read '{path}' with torch.load(weights_only=True): it is not a torch file, "
            "or it pickles whole objects (e.g. `torch.save(model)`) rather than tensors. Re-save "
            "the weights with `torch.save(model.state_dict(), path)` or as a .safetensors file."
        ) from error
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(
            f"'{path}' holds a {type(checkpoint).__name__}, not a state_dict. Save the weights "
            "with `torch.save(model.state_dict(), path)`."
        )
    for wrapper_key in ("state_dict", "model"):  # training checkpoints that wrap the weights
        if isinstance(checkpoint.get(wrapper_key), Mapping):
            checkpoint = checkpoint[wrapper_key]
    # DataParallel/DDP checkpoints prefix every key with "module.".
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key.removeprefix("module."): value for key, value in checkpoint.items()}
    return checkpoint


def _read_converted_dir(path: Path) -> StateDict:
    """The torch-layout state_dict back from a directory written by `python -m ...convert`."""
    if not (path / METADATA_FILE).is_file():
        raise ConversionError(
            f"'{path}' is a directory but not one written by `python -m resnet_jax.convert` (it "
            f"has no {METADATA_FILE}). Pass a .pth/.pt or .safetensors file, or convert one into "
            "a new directory with that command."
        )
    try:
        with checkpoint.quiet_abandoned_reads(), ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(path.resolve())
    except Exception as error:  # orbax/TensorStore's errors for missing or truncated files
        reason = checkpoint.error_reason(error)
        raise ConversionError(
            f"'{path}' is damaged: its arrays cannot be read back ({reason}). Convert the "
            "original weights again into a new directory with `python -m resnet_jax.convert`, "
            "or pass the .pth/.safetensors file itself."
        ) from None
    state_dict = {}
    for (_, *flax_path), array in _flatten(variables).items():
        array = np.asarray(array)
        state_dict[_torch_key(flax_path)] = array.transpose(_TORCH_FROM_FLAX[array.ndim])
    return state_dict


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; .float() also covers float16/bfloat16 ones
        return value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def _num_classes(state_dict: StateDict) -> int:
    fc_weight = state_dict.get("fc.weight")
    return fc_weight.shape[0] if fc_weight is not None and fc_weight.ndim == 2 else 1000


def _torch_key(flax_path: tuple[str, ...] | list[str]) -> str:
    """("layer1_0", "downsample_bn", "mean") -> "layer1.0.downsample.1.running_mean"."""
    *modules, leaf = flax_path
    names = [_TORCH_MODULE.get(module, module.replace("_", ".")) for module in modules]
    return ".".join([*names, _TORCH_LEAF[leaf]])


def _expected_torch_shapes(arch: str, num_classes: int) -> ExpectedShapes:
    """torch key -> (Flax path with its collection, torch-layout shape), from the Flax model."""
    shapes = models.init_shapes(models.get_model(arch, num_classes=num_classes), (1, 224, 224, 3))
    expected = {}
    for path, leaf in _flatten({c: shapes[c] for c in _COLLECTIONS}).items():
        torch_shape = tuple(leaf.shape[axis] for axis in _TORCH_FROM_FLAX[len(leaf.shape)])
        expected[_torch_key(path[1:])] = (path, torch_shape)
    return expected


def _check_fits(
    state_dict: StateDict, expected: ExpectedShapes, arch: str, source_name: str
) -> None:
    """Raise `ConversionError` listing every missing, unexpected or wrongly shaped key."""
    missing = [
        f"{key} (expected {shape}, not found)"
        for key, (_, shape) in expected.items()
        if key not in state_dict
    ]
    unexpected = [
        f"{key} (found {state_dict[key].shape}, not expected)"
        for key in state_dict
        if key not in expected
    ]
    wrong_shape = [
        f"{key} (expected {shape}, found {state_dict[key].shape})"
        for key, (_, shape) in expected.items()
        if key in state_dict and state_dict[key].shape != shape
    ]
    problems = [
        f"{kind} {_shorten(keys)}"
        for kind, keys in (
            ("missing keys:", missing),
            ("unexpected keys:", unexpected),
            ("keys with the wrong shape:", wrong_shape),
        )
        if keys
    ]
    if not problems:
        return
    guess, layout = _guess_arch(state_dict)
    if guess == arch:
        verdict = (
            f"It has {arch}'s block layout ({layout}), so it is likely damaged or a modified "
            "variant (e.g. a wide ResNet), which this converter does not support"
        )
    elif guess is not None:
        verdict = (
            f"It looks like {guess} ({layout}): convert it with arch={guess!r} (--arch {guess}; "
            f"when training, --config.model.name={guess}) or pass a {arch} checkpoint"
        )
    else:
        verdict = (
            f"It matches no torchvision ResNet ({layout}); only torchvision's ResNets (and "
            f"timm's, which use the same key names) can be converted: {', '.join(ARCHS)}"
        )
    raise ConversionError(
        f"{source_name} does not fit torchvision's {arch}: {'; '.join(problems)}. {verdict}."
    )


def _guess_arch(state_dict: StateDict) -> tuple[str | None, str]:
    """The torchvision ResNet a state_dict's key set looks like, and its layout in words."""
    blocks = tuple(
        len({key.split(".")[1] for key in state_dict if key.startswith(f"layer{stage}.")})
        for stage in range(1, 5)
    )
    if not any(blocks):
        return None, "it has no layer1..layer4 blocks"
    bottleneck = any(key.endswith(".conv3.weight") for key in state_dict)
    layout = f"{'bottleneck' if bottleneck else 'basic'} blocks, {'-'.join(map(str, blocks))} "
    layout += f"per stage, {_num_classes(state_dict)} classes"
    for name, (block_cls, stage_sizes) in models.IMAGENET_FAMILY.items():
        if stage_sizes == blocks and (block_cls is models.Bottleneck) == bottleneck:
            return name, layout
    return None, layout


def _report_name(path: tuple[str, ...]) -> str:
    """("params", "layer1_0", "conv1", "kernel") -> "layer1_0/conv1/kernel"."""
    return "/".join(path[1:])


def _layer_of(path: tuple[str, ...]) -> tuple[str, ...]:
    """("batch_stats", "layer1_0", "bn1", "mean") -> ("layer1_0", "bn1")."""
    return path[1:-1]


def _flatten(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(dict(tree))


def _shorten(names: list[str]) -> str:
    listed = ", ".join(names[:_NAMES_SHOWN])
    extra = len(names) - _NAMES_SHOWN
    return f"{listed} and {extra} more" if extra > 0 else listed


def _require_new_directory(output: Path) -> None:
    """Refuse an existing --output, and one that cannot be written, before converting."""
    if output.exists():
        raise ConversionError(
            f"Output directory '{output}' already exists. Choose a new --output path or remove "
            "the old directory first; conversions never overwrite."
        )
    files.check_writable(output.absolute().parent, "--output's parent directory")


def _remove_staging(staging: Path) -> None:
    """A staging directory and orbax's own temporary directories beside it."""
    for leftover in staging.parent.glob(f"{staging.name}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _save(variables: Variables, output: Path, arch: str, source: Path) -> None:
    """Write `variables` as an orbax checkpoint at `output`, plus metadata.json describing it.

    Both are written into a staging directory that is renamed to `output` once whole, so a
    conversion that fails (a full disk) or is killed leaves no `output` to be read back.
    """
    staging = output.absolute().with_name(f".{output.name}.partial")
    _remove_staging(staging)  # what an earlier, failed conversion left
    metadata = {
        "arch": arch,
        "num_classes": int(variables["params"]["fc"]["bias"].shape[0]),
        "source": str(source.resolve()),
    }
    try:
        with files.explain_write_errors(output):
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(staging, variables)
                checkpointer.wait_until_finished()
            (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
            staging.rename(output)
    finally:
        _remove_staging(staging)


def _define_flags() -> None:
    # Defined only when run as a script: the trainer imports this module and must not inherit
    # required flags.
    flags.DEFINE_enum("arch", None, list(ARCHS), "Architecture of the input weights.")
    flags.DEFINE_string("input", None, "A torchvision .pth/.pt or .safetensors file.")
    flags.DEFINE_string("output", None, "New directory for the converted orbax checkpoint.")
    flags.mark_flags_as_required(["arch", "input", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    arch, source, output = flags.FLAGS.arch, Path(flags.FLAGS.input), Path(flags.FLAGS.output)
    try:
        _require_new_directory(output)
        variables = torchvision_to_flax(source, arch)
        _save(variables, output, arch, source)
    except (ConversionError, files.WriteError) as error:
        sys.exit(f"error: {error}")
    num_classes = variables["params"]["fc"]["bias"].shape[0]
    print(f"Wrote {arch} ({num_classes} classes) from {source} to {output}.")


if __name__ == "__main__":
    from resnet_jax import cli  # only as a program: the library never loads the command line

    _define_flags()
    cli.quiet_library_info()
    app.run(main)
