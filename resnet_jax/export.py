"""A trained checkpoint as a serialized `jax.export` artifact that runs without the model's code.

    python -m resnet_jax.export --workdir W --output DIR    # the checkpoint evaluate reports
    python -m resnet_jax.export --checkpoint W/checkpoints/7020 --output DIR
    python -m resnet_jax.predict --exported DIR cat.png     # deserializes and calls it

DIR holds `model.jaxexport`, StableHLO of `logits = model(preprocess(images))` with the weights
inside, and `manifest.json` (the format and its version, the jax version, the input's shape and
dtype, the class names, the platforms it was lowered for and the artifact's sha256). The input is
uint8 images (N, H, W, C) at the size and channels the run's images had (C = 3, RGB, or 1 for a
gray dataset), any batch size N (symbolic); the preprocessing is evaluation's (the config's centre
crop or on-device resize, if any, and the normalization the run recorded, which the manifest
repeats); the output is float32 logits (N, classes). It is lowered for the CPU and for CUDA
GPUs by default (`--platforms`), which needs no GPU here. The model is lowered with plain XLA ops
(model.kernels = "xla"): the CPU plug-in's custom calls exist only in this package's build.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags

from resnet_jax import evaluate, files
from resnet_jax.errors import ConfigError, UserError

FORMAT = "resnet_jax.export"
FORMAT_VERSION = 1
ARTIFACT_FILE = "model.jaxexport"
MANIFEST_FILE = "manifest.json"
PLATFORMS = ("cpu", "cuda")
# The manifest's words for the input's channels (transforms.MODES: what predict converts to).
LAYOUTS = {1: "gray", 2: "gray + alpha", 3: "RGB", 4: "RGBA"}
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # jax.export's lowering platforms


class ExportError(UserError):
    """An export directory that is missing, damaged or foreign; the message says what to do."""


def export_checkpoint(
    output: str | Path,
    workdir: str | None = None,
    checkpoint_path: str | None = None,
    platforms: Sequence[str] = PLATFORMS,
) -> dict[str, Any]:
    """Write the checkpoint `evaluate` would test (or `checkpoint_path`) to the new directory
    `output` as an exported artifact and its manifest; returns the manifest."""
    output = Path(output).expanduser().absolute()
    unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
    if unknown or not platforms:
        raise ConfigError(
            f"--platforms {','.join(platforms)}: name one or more of {', '.join(KNOWN_PLATFORMS)} "
            "(e.g. --platforms=cpu,cuda)."
        )
    if output.exists():
        raise ExportError(
            f"--output {output} already exists. Choose a new directory, or remove the old one "
            "first; exports never overwrite."
        )
    files.check_writable(output.parent, "--output's parent directory")
    run = evaluate.load_saved_run(workdir, checkpoint_path)
    config, meta = run.config, run.meta
    config.model.kernels = "xla"  # plain XLA ops lower for every platform
    class_names, image_shape = meta["class_names"], tuple(meta["image_shape"])
    logits = evaluate.logits_of(run)

    (batch,) = jax.export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.uint8)
    exported = jax.export.export(jax.jit(logits), platforms=tuple(platforms))(images)
    artifact = bytes(exported.serialize())
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "artifact": ARTIFACT_FILE,
        "sha256": hashlib.sha256(artifact).hexdigest(),
        "jax_version": jax.__version__,
        "platforms": list(exported.platforms),
        "input": {
            "shape": [None, *image_shape],
            "dtype": "uint8",
            "layout": f"NHWC {LAYOUTS[image_shape[-1]]} 0-255",
            # How a photo of another size was brought to that shape (data.IMAGE_FITS).
            "fit": meta.get("image_fit", "resize"),
        },
        "normalization": run.normalization,  # what the artifact does to its input, for reference
        "output": {"shape": [None, len(class_names)], "dtype": "float32", "meaning": "logits"},
        "class_names": class_names,
        "model": config.model.name,
        "dataset": config.dataset.name,
        "checkpoint_step": run.step,
        "checkpoint_selection": run.why,
        "weights": run.weights,  # "ema" or "raw", as the run's results.json reports
    }
    _write_new_directory(output, artifact, manifest)
    return manifest


def _write_new_directory(output: Path, artifact: bytes, manifest: dict[str, Any]) -> None:
    # Written into a staging directory renamed once whole: a failed export leaves no `output`.
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with files.explain_write_errors(output):
            staging.mkdir()
            (staging / ARTIFACT_FILE).write_bytes(artifact)
            (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            staging.rename(output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_exported(directory: str | Path) -> tuple[jax.export.Exported, dict[str, Any]]:
    """The exported function and the manifest in `directory`; an ExportError that says what is
    wrong if it is not an intact export this jax can run here."""
    path = Path(directory).expanduser().absolute()
    manifest = _read_manifest(path)
    artifact_path = path / str(manifest.get("artifact", ARTIFACT_FILE))
    try:
        artifact = artifact_path.read_bytes()
    except OSError as error:
        raise ExportError(
            f"Cannot read the exported model {artifact_path}: {error.strerror or error}. The "
            f"export in {path} is incomplete: export the run again (python -m resnet_jax.export "
            "--workdir W --output NEW_DIR)."
        ) from None
    if hashlib.sha256(artifact).hexdigest() != manifest.get("sha256"):
        raise ExportError(
            f"The exported model {artifact_path} is damaged: its contents ({len(artifact)} bytes) "
            "are not those the manifest records (cut short, or changed since the export). Copy "
            "it again from where it was exported, or export the run again (python -m "
            "resnet_jax.export --workdir W --output NEW_DIR)."
        )
    try:
        exported = jax.export.deserialize(bytearray(artifact))
    except Exception as error:  # jax's own errors for a serialization it cannot read
        reason = " ".join(str(error).split())[:200]
        raise ExportError(
            f"jax {jax.__version__} cannot read the exported model {artifact_path}, exported "
            f"with jax {manifest.get('jax_version')} ({type(error).__name__}: {reason}). Export "
            "the run again with this jax, or run it with the jax it was exported with."
        ) from None
    here = _platform_here()
    if here not in exported.platforms:
        raise ExportError(
            f"The model in {path} was exported for {', '.join(exported.platforms)}, not for "
            f"this machine's {here}: export it again with --platforms={here} (or run it on one "
            "of those)."
        )
    return exported, manifest


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest_path = path / MANIFEST_FILE
    export_again = "python -m resnet_jax.export --workdir W --output NEW_DIR"
    if not path.is_dir():
        raise ExportError(
            f"--exported {path} is not a directory: pass the --output directory of "
            f"`{export_again}`."
        )
    if not manifest_path.exists():
        if (path / "checkpoints").is_dir() or (path / "config.json").exists():
            raise ExportError(
                f"{path} is a training run's workdir, not an export: predict from it with "
                f"--workdir {path}, or export it first (python -m resnet_jax.export --workdir "
                f"{path} --output NEW_DIR) and pass --exported NEW_DIR."
            )
        raise ExportError(
            f"{path} holds no {MANIFEST_FILE}, so it is not an export (or an incomplete copy of "
            f"one): pass the --output directory of `{export_again}`."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(
            f"Cannot read {manifest_path} ({type(error).__name__}): it is damaged. Copy the "
            f"export again, or export the run again (`{export_again}`)."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(
            f"{manifest_path} is not the manifest of a resnet_jax export: pass the --output "
            f"directory of `{export_again}`."
        )
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(
            f"{path} is an export of format version {manifest['format_version']}, newer than "
            f"this resnet_jax reads ({FORMAT_VERSION}): upgrade resnet_jax, or export the run "
            "again with this one."
        )
    return manifest


def _platform_here() -> str:
    """The jax.export platform name of the default backend ("cpu", "cuda", "rocm" or "tpu")."""
    device = jax.devices()[0]
    if device.platform == "gpu":
        return "rocm" if "rocm" in device.client.platform_version.lower() else "cuda"
    return device.platform


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string(
        "workdir", None, "A training run's directory: export its reported checkpoint."
    )
    flags.DEFINE_string("checkpoint", None, "A checkpoint step directory (W/checkpoints/<step>).")
    flags.DEFINE_string("output", None, "New directory for the exported model and its manifest.")
    flags.DEFINE_list(
        "platforms", list(PLATFORMS), "Platforms to lower for (cpu, cuda, rocm, tpu)."
    )
    flags.mark_flags_as_required(["output"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise ConfigError(f"Unexpected arguments: {' '.join(argv[1:])}.")
    options = flags.FLAGS
    manifest = export_checkpoint(
        options.output, options.workdir, options.checkpoint, options.platforms
    )
    print(
        f"Exported {manifest['model']} ({len(manifest['class_names'])} classes, checkpoint step "
        f"{manifest['checkpoint_step']}, {manifest['checkpoint_selection']}) for "
        f"{', '.join(manifest['platforms'])} to {Path(options.output).expanduser().absolute()}."
    )
    return 0


if __name__ == "__main__":
    from resnet_jax import cli  # only as a program: the library never loads the command line

    define_flags()
    cli.run_cli(main)
