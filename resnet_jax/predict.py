"""Top-k classes of image files, from a trained run's checkpoint.

    python -m resnet_jax.predict --workdir W cat.png truck.jpg --top_k 3
    python -m resnet_jax.predict --exported DIR cat.png   # a `resnet_jax.export` output

Each image is loaded with PIL in the channels the model was trained on (a colour photo becomes
gray, PIL's L, for a model of a gray dataset; a gray one RGB for an RGB model) and brought to the
size of the run's images: resized (bilinear, as memory mode resizes image folders on load) or, for
a stream-mode run, resized and centre-cropped as its evaluation did; then preprocessed exactly as
evaluation does (the on-device resize, if any, and the normalization the run recorded, measured
statistics included). A run that kept an EMA of its weights predicts with them, unless its
ema.weights is "raw", as its results.json reports. With --exported, the model and its
preprocessing are the exported artifact's: nothing is built from the model's code.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from absl import flags
from PIL import Image

from resnet_jax import evaluate, export, transforms
from resnet_jax.errors import ConfigError, UserError


class ImageError(UserError):
    """An image file that is missing or that PIL cannot read."""


def load_images(
    paths: list[str], image_shape: tuple[int, int, int], fit: str = "resize"
) -> np.ndarray:
    """uint8 (N, H, W, C) images of `image_shape`: each converted to its C channels (gray or
    RGB), then resized, or for fit="eval_crop" (square shapes) resized and centre-cropped as
    stream-mode evaluation does."""
    height, width, channels = image_shape
    images = []
    for path in map(Path, paths):
        try:
            with Image.open(path) as image:
                converted = image.convert(transforms.MODES[channels])
        except OSError as error:  # missing file, unknown format, truncated data
            raise ImageError(
                f"Cannot read the image {path}: {error.strerror or error}. Pass existing PNG or "
                "JPEG files (any size; they are resized to the size the model was trained on)."
            ) from None
        if fit == "eval_crop":
            images.append(transforms.eval_crop(converted, height))
            continue
        if converted.size != (width, height):
            converted = converted.resize((width, height), Image.Resampling.BILINEAR)
        images.append(transforms.to_array(converted))
    return np.stack(images)


def predict(
    image_paths: list[str],
    workdir: str | None = None,
    checkpoint_path: str | None = None,
    top_k: int = 5,
) -> list[list[tuple[str, float]]]:
    """For each image, the `top_k` (class name, probability) pairs, most likely first."""
    check_request(image_paths, top_k)
    run = evaluate.load_saved_run(workdir, checkpoint_path)
    class_names, image_shape = run.meta["class_names"], tuple(run.meta["image_shape"])
    images = load_images(image_paths, image_shape, run.meta.get("image_fit", "resize"))
    probabilities = jax.nn.softmax(jax.jit(evaluate.logits_of(run))(images))
    return top_classes(np.asarray(probabilities), class_names, top_k)


def predict_exported(
    image_paths: list[str], exported_dir: str, top_k: int = 5
) -> list[list[tuple[str, float]]]:
    """`predict` with a `resnet_jax.export` artifact instead of a checkpoint."""
    check_request(image_paths, top_k)
    exported, manifest = export.load_exported(exported_dir)
    shape, fit = tuple(manifest["input"]["shape"][1:]), manifest["input"].get("fit", "resize")
    images = load_images(image_paths, shape, fit)
    probabilities = np.asarray(jax.nn.softmax(exported.call(images)))
    return top_classes(probabilities, manifest["class_names"], top_k)


def check_request(image_paths: list[str], top_k: int) -> None:
    """A ConfigError for no images or a top_k below 1."""
    if not image_paths:
        raise ConfigError("Name at least one image file to classify, e.g. ... --workdir W cat.png.")
    if top_k < 1:
        raise ConfigError(f"--top_k must be at least 1, got {top_k}.")


def top_classes(
    probabilities: np.ndarray, class_names: list[str], top_k: int
) -> list[list[tuple[str, float]]]:
    """For each row of (N, classes) `probabilities`, the `top_k` (name, probability) pairs."""
    ranked = np.argsort(-probabilities, axis=1)[:, :top_k]
    return [
        [(class_names[c], float(p[c])) for c in row]
        for p, row in zip(probabilities, ranked, strict=True)
    ]


@jax.jit
def define_flags() -> None:
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string("workdir", None, "A training run's directory: use its reported checkpoint.")
    flags.DEFINE_string("checkpoint", None, "A checkpoint step directory (W/checkpoints/<step>).")
    flags.DEFINE_string("exported", None, "A `python -m resnet_jax.export` output directory.")
    flags.DEFINE_integer("top_k", 5, "How many classes to print per image.")


def main(argv: list[str]) -> int:
    paths, options = argv[1:], flags.FLAGS
    if options.exported:
        if options.workdir or options.checkpoint:
            raise ConfigError(
                "Pass either --exported (an export directory) or --workdir/--checkpoint (a "
                "training run's checkpoint), not both."
            )
        predictions = predict_exported(paths, options.exported, options.top_k)
    else:
        predictions = predict(paths, options.workdir, options.checkpoint, options.top_k)
    for path, top in zip(paths, predictions, strict=True):
        ranked = ", ".join(f"{name} {probability:.3f}" for name, probability in top)
        print(f"{path}: {ranked}")
    return 0


if __name__ == "__main__":
    from resnet_jax import cli  # only as a program: the library never loads the command line

    define_flags()
    cli.run_cli(main)
