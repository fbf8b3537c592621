"""Test-split results of a saved checkpoint, recomputed from the config it was trained with.

    python -m resnet_jax.evaluate --workdir W            # the checkpoint results.json reports
    python -m resnet_jax.evaluate --checkpoint W/checkpoints/7020 --output eval.json
    python -m resnet_jax.evaluate --workdir W --tta flip  # test-time augmentation

With an EMA of the weights the run's chosen weights are tested (its ema.weights: the average
unless "raw"), as results.json's headline figures are; "weights" in the output says which.
Prints loss, accuracy, macro precision/recall/F1, the per-class figures and the confusion matrix;
`--output` also writes them as JSON (results.json's format) and `confusion_matrix.png` beside it.
`--tta flip` classifies each test image by the mean of the logits of the image and of its mirror
image (left-right) as the model sees them (after the eval preprocessing); its results go to
`results_tta_flip.json` (and .png) in the run's workdir unless `--output` says where, never over
the plain results.json.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging

from resnet_jax import builders, checkpoint, config_utils, evaluation, files, parallel, reporting
from resnet_jax import train_state as ts
from resnet_jax.errors import ConfigError
from resnet_jax.workdir import reported_checkpoint


def open_checkpoints(
    workdir: str | None, checkpoint_path: str | None
) -> tuple[checkpoint.Checkpoints, int | None]:
    """The checkpoints of a run, and the step `checkpoint_path` names (a step directory), or None
    for a workdir (whose run says which step it reports)."""
    if bool(workdir) == bool(checkpoint_path):
        raise ConfigError(
            "Pass either --workdir (a training run's directory) or --checkpoint (one of its "
            "checkpoints/<step> directories), not both or neither."
        )
    if checkpoint_path:
        path = Path(checkpoint_path).expanduser().absolute()
        if not (path.is_dir() and path.name.isdigit()):
            raise ConfigError(
                f"--checkpoint {path} is not a checkpoint: pass a step directory such as "
                "WORKDIR/checkpoints/7020 (ls WORKDIR/checkpoints lists them)."
            )
        return checkpoint.Checkpoints(path.parent, read_only=True), int(path.name)
    directory = Path(workdir).expanduser().absolute() / "checkpoints"
    if not directory.is_dir():
        raise ConfigError(
            f"{directory.parent} holds no checkpoints/: pass the --workdir of a training run "
            "(python -m resnet_jax.train --config ... --workdir W)."
        )
    checkpoints = checkpoint.Checkpoints(directory, read_only=True)
    if checkpoints.latest_step() is None:
        checkpoints.close()
        raise ConfigError(
            f"{directory} holds no complete checkpoint: its run has not saved one yet (it saves "
            "at the end of each epoch; a run that failed or stopped earlier saved none). Train "
            "it first, or pass another --workdir."
        )
    return checkpoints, None


def saved_config(meta: dict[str, Any], data_dir: str | None) -> ml_collections.ConfigDict:
    """The run's config as saved with the checkpoint, with the dataset directory overridden."""
    config = config_utils.resolve(meta["config"])
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    return config


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """What evaluate, predict and export read from a checkpoint: which one and why, its meta and
    config, the variables of the weights the run reports ("ema" or "raw"), and the normalization
    it trained with (builders.normalization's record)."""

    step: int
    why: str
    meta: dict[str, Any]
    config: ml_collections.ConfigDict
    variables: dict[str, Any]
    weights: str
    normalization: dict[str, Any]


def load_saved_run(
    workdir: str | None, checkpoint_path: str | None, data_dir: str | None = None
) -> SavedRun:
    """The checkpoint `checkpoint_path` names, or the one the run in `workdir` reports
    (workdir.reported_checkpoint), with its config (data_dir overridden if given) and the
    variables of the weights it reports (workdir.reported_weights)."""
    checkpoints, step = open_checkpoints(workdir, checkpoint_path)
    try:
        if step is None:
            _, newest = checkpoints.latest_meta()
            selection = config_utils.resolve(newest["config"]).results_checkpoint
            step, why = reported_checkpoint(checkpoints, selection)
        else:
            why = f"step {step}"
        meta = checkpoints.meta(step)
        config = saved_config(meta, data_dir)
        weights = builders.reported_weights(config)
        variables = checkpoints.restore_variables(step, ema=weights == "ema")
    finally:
        checkpoints.close()
    # Checkpoints from before the record had RGB images and named statistics, which the config
    # names ("auto" meant then what it means for RGB now).
    normalization = meta.get("normalization") or builders.named_normalization(
        builders.normalization_name(config, channels=3)
    )
    return SavedRun(step, why, meta, config, variables, weights, normalization)


def saved_model(
    run: SavedRun, num_classes: int, image_shape: tuple[int, int, int]
) -> tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """The saved run's model apply and eval preprocessing (with the run's normalization), for
    images of `image_shape` in `num_classes` classes."""
    model = builders.build_model(run.config, num_classes)
    preprocess, _ = builders.build_preprocess(run.config, image_shape, run.normalization)
    return model.apply, preprocess


def logits_of(run: SavedRun) -> Callable[[jax.Array], jax.Array]:
    """uint8 NHWC images of the run's shape -> the reported weights' logits, preprocessed as the
    run's evaluation was (what predict and export compute)."""
    apply, preprocess = saved_model(
        run, len(run.meta["class_names"]), tuple(run.meta["image_shape"])
    )
    return lambda images: apply(run.variables, preprocess(images, None), train=False)


def evaluate_checkpoint(
    workdir: str | None = None,
    checkpoint_path: str | None = None,
    data_dir: str | None = None,
    tta: str = "none",
) -> dict[str, Any]:
    """results.json's figures for a checkpoint, on the test split of the dataset it trained on,
    with the weights the run reports (its EMA unless ema.weights = "raw", when it kept one).

    `tta`: "none", or a test-time augmentation of `evaluation.TTA` (its name is then in the
    results' "tta").
    """
    if tta != "none" and tta not in evaluation.TTA:
        raise ConfigError(f"Unknown --tta {tta!r}: use none or {' or '.join(evaluation.TTA)}.")
    run = load_saved_run(workdir, checkpoint_path, data_dir)
    config, step, why, weights = run.config, run.step, run.why, run.weights
    par = parallel.Parallel("jit")  # BatchNorm uses running statistics: no cross-device sync
    # Evaluation pads and masks its last batch, so any multiple of the device count is as exact.
    batch_size = max(1, config.eval_batch_size // par.num_devices) * par.num_devices
    batches = builders.load_batches(config, eval_batch_size=batch_size)
    apply, preprocess = saved_model(run, len(batches.class_names), batches.image_shape)
    if tta != "none":
        apply = evaluation.TTA[tta](apply)
    logging.info(
        "Testing %s's checkpoint at step %d (%s), %s weights%s.", config.model.name, step, why,
        weights, "" if tta == "none" else f", test-time augmentation {tta}",
    )  # fmt: skip
    test_batches = batches.eval_batches("test")
    variables = par.place_state(run.variables)
    figures = evaluation.evaluate_split(
        par.compile_eval_step(ts.EvalStep(apply, preprocess)), variables, test_batches, par
    )
    return {
        **evaluation.summarize_test(figures, batches.class_names),
        "weights": weights,
        "checkpoint_step": step,
        "checkpoint_epoch": run.meta["epoch"],
        "checkpoint_selection": why,
        "model": config.model.name,
        "dataset": config.dataset.name,
        **({} if tta == "none" else {"tta": tta}),
    }


def tta_output(
    workdir: str | None, checkpoint_path: str | None, output: str | None, tta: str
) -> Path:
    """Where `--tta` results go: `output`, or results_tta_<name>.json in the run's workdir; never
    the plain results.json."""
    run_dir = Path(workdir or Path(checkpoint_path).parent.parent).expanduser().absolute()
    path = Path(output).expanduser().absolute() if output else run_dir / f"results_tta_{tta}.json"
    if path == run_dir / reporting.RESULTS_FILE:
        raise ConfigError(
            f"--output {path} is the run's plain results.json, which --tta {tta} must not "
            f"replace: leave --output out (the results go to {run_dir}/results_tta_{tta}.json) "
            "or pass another file."
        )
    return path


def format_results(results: dict[str, Any]) -> str:
    """The results as a readable table: headline figures, per-class figures, confusion matrix."""
    names = results["class_names"]
    width = max(12, *(len(name) for name in names))
    lines = [
        f"{results['model']} on {results['dataset']}, checkpoint step "
        f"{results['checkpoint_step']} (epoch {results['checkpoint_epoch']}, "
        f"{results['checkpoint_selection']}), {results['num_test_examples']} test examples"
        + (f", test-time augmentation {results['tta']}" if "tta" in results else ""),
        f"loss {results['test_loss']:.4f}   accuracy {results['test_accuracy']:.2%}   "
        f"macro precision {results['precision']:.4f}  recall {results['recall']:.4f}  "
        f"F1 {results['f1']:.4f}",
        "",
        f"{'class':<{width}} precision  recall      f1",
    ]
    for name in names:
        row = results["per_class"][name]
        lines.append(
            f"{name:<{width}} {row['precision']:9.4f} {row['recall']:7.4f} {row['f1']:7.4f}"
        )
    lines += ["", "confusion matrix (rows: true class, columns: predicted):"]
    for name, counts in zip(names, results["confusion_matrix"], strict=True):
        lines.append(f"{name:<{width}} " + " ".join(f"{c:5d}" for c in counts))
    return "\n".join(lines)


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program)."""
    flags.DEFINE_string(
        "workdir", None, "A training run's directory: test its reported checkpoint."
    )
    flags.DEFINE_string("checkpoint", None, "A checkpoint step directory (W/checkpoints/<step>).")
    flags.DEFINE_string("data_dir", None, "Override the run's dataset.data_dir (data moved).")
    flags.DEFINE_string("output", None, "Also write the results as JSON here, and a confusion PNG.")
    flags.DEFINE_enum(
        "tta", "none", ["none", *evaluation.TTA],
        "Test-time augmentation: flip = mean logits of each image and its mirror; written to "
        "W/results_tta_flip.json unless --output is given.",
    )  # fmt: skip


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise ConfigError(f"Unexpected arguments: {' '.join(argv[1:])}.")
    options = flags.FLAGS
    output = Path(options.output).expanduser() if options.output else None
    if options.tta != "none" and (options.workdir or options.checkpoint):
        output = tta_output(options.workdir, options.checkpoint, options.output, options.tta)
    # Checked before the evaluation, which can take minutes; a workdir that does not exist is
    # find_checkpoint's to explain.
    if options.output:
        files.check_writable(output.absolute().parent, "--output's directory")
    elif output is not None and output.parent.is_dir():
        files.check_writable(output.parent, "the run's workdir (for the --tta results)")
    results = evaluate_checkpoint(
        options.workdir, options.checkpoint, options.data_dir, options.tta
    )
    print(format_results(results))
    if output is not None:
        reporting.write_results(results, output, output.with_suffix(".png"))
        logging.info("Wrote %s and %s.", output, output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    from resnet_jax import cli  # only as a program: the library never loads the command line

    define_flags()
    cli.run_cli(main)
